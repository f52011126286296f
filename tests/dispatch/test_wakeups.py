"""The local dispatcher's feeder never loses a wake-up: a delivery dispatched while a claim is in flight is
claimed at once, not at the next poll, however full the workers' queue is.

The test sets a 30 s poll interval, so a delivery sent within seconds can only have been claimed because
something woke the feeder. The runner is the service's own; only the moment a dispatch lands is arranged.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from notifier.db.models import Delivery
from notifier.delivery.messages import ClaimedBatches
from notifier.delivery.runner import DeliveryRunner
from notifier.dispatch.base import DispatchItem
from notifier.dispatch.local import LocalDispatcher
from tests.conftest import Service, make_settings, running_service
from tests.dispatch.test_local import PAYMENT
from tests.reliability.ledger import eventually

SLOW_POLL = 30.0
PROMPT = 5.0


class CommitDuringClaim:
    """The service's runner, except that once, after a claim has read the due rows and before the feeder sees
    its result, ``late`` runs: it commits more deliveries and dispatches them, as a NOTIFY landing mid-claim does.
    """

    def __init__(self, runner: DeliveryRunner, late: Callable[[], Awaitable[None]]) -> None:
        self._runner = runner
        self._late: Callable[[], Awaitable[None]] | None = late

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    async def claim_due(self, **kwargs: Any) -> ClaimedBatches:
        claimed = await self._runner.claim_due(**kwargs)
        if self._late is not None:
            late, self._late = self._late, None
            await late()
        return claimed


async def post_payment(svc: Service, user_id: str) -> uuid.UUID:
    response = await svc.post_event({"type": "payment.received", "recipients": [user_id], "data": PAYMENT})
    assert response.status_code == 202, response.text
    return uuid.UUID(response.json()["event_id"])


async def in_app_deliveries(svc: Service, event_id: uuid.UUID) -> list[Delivery]:
    async with svc.runtime.sessions() as session:
        rows = await session.execute(
            sa.select(Delivery).where(col(Delivery.event_id) == event_id, col(Delivery.channel) == "in_app")
        )
        return list(rows.scalars())


async def test_a_dispatch_during_a_short_claim_is_claimed_although_the_queue_is_over_half_full(
    database_url: str,
) -> None:
    # Two workers, a queue of four. The first claim asks for four rows and finds three (three events, one
    # in-app delivery each: no provider is configured), which leaves the queue over half full; a fourth event
    # commits meanwhile. The feeder must not take "fewer than asked" to mean "nothing more is due".
    settings = make_settings(database_url, poll_interval_seconds=SLOW_POLL, workers=2)
    async with running_service(settings) as svc:
        await svc.runtime.dispatcher.aclose()  # only the dispatcher below claims
        early = [await post_payment(svc, f"early-{i}") for i in range(3)]
        assert [len(await in_app_deliveries(svc, event_id)) for event_id in early] == [1, 1, 1]
        late_event: list[uuid.UUID] = []

        async def commit_and_dispatch() -> None:
            late_event.append(await post_payment(svc, "late"))
            [delivery] = await in_app_deliveries(svc, late_event[0])
            await dispatcher.dispatch([DispatchItem(delivery.id)])

        runner = CommitDuringClaim(svc.runtime.runner, commit_and_dispatch)
        dispatcher = LocalDispatcher(
            sessions=svc.runtime.sessions,
            runner=runner,  # type: ignore[arg-type]
            workers=2,
            poll_interval=SLOW_POLL,
            lease_seconds=60,
            grace_seconds=1,
        )
        await dispatcher.start()
        try:

            async def all_sent() -> bool:
                events = [*early, *late_event]
                return [d.status for event_id in events for d in await in_app_deliveries(svc, event_id)] == ["sent"] * 4

            await eventually(all_sent, timeout=PROMPT, what="the late delivery to be claimed without a poll")
        finally:
            await dispatcher.aclose()
