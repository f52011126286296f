"""Outcomes written without a lock (PostgreSQL): one statement, committed by itself, settles every row still as its
claim left it; a row changed since -- taken over, read by its reader while its attempt was out -- is recorded from
the locked row in a transaction, as every outcome is on SQLite. The tests that run on both databases hold there
too."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from notifier.channels.base import SendResult
from notifier.db import deliveries, inbox
from notifier.db.models import Delivery, DeliveryAttempt, DeliveryTransition
from notifier.delivery import state
from notifier.delivery.messages import Batch
from notifier.delivery.outcomes import AttemptReport, Finished, OutcomeRecorder
from notifier.types import Reason, utcnow
from tests.conftest import Service, booking_event, make_settings, running_service
from tests.db_faults import inserts_refused
from tests.dispatch.test_local import PAYMENT, push_settings
from tests.fakes.ably import AblyFake
from tests.fakes.base import Fault
from tests.fakes.onesignal import OneSignalFake
from tests.sql_statements import recorded_statements

LEASE = dt.timedelta(seconds=30)


@contextlib.contextmanager
def commits_of(svc: Service) -> Iterator[list[object]]:
    """The transactions the service's engine commits meanwhile."""
    seen: list[object] = []
    engine = svc.runtime.engine.sync_engine

    def record(connection: object) -> None:
        seen.append(connection)

    sa.event.listen(engine, "commit", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "commit", record)


@contextlib.asynccontextmanager
async def by_hand(url: str, onesignal_fake: OneSignalFake, *recipients: str) -> AsyncIterator[Service]:
    """The service with push live and its dispatcher stopped (attempts are made by hand), once a payment to
    ``recipients`` is accepted."""
    async with running_service(make_settings(url, **push_settings(url, onesignal_fake))) as svc:
        await svc.runtime.dispatcher.aclose()
        await svc.post_event({"type": "payment.received", "recipients": list(recipients), "data": PAYMENT})
        yield svc


async def claimed(svc: Service, channel: str) -> list[Batch]:
    batches = await svc.runtime.runner.claim_due(limit=50, lease=LEASE)
    return [batch for batch in batches if batch.claims[0].delivery.channel == channel]


async def row(svc: Service, delivery_id: uuid.UUID) -> Delivery:
    async with svc.runtime.sessions() as session:
        return (await session.execute(sa.select(Delivery).where(col(Delivery.id) == delivery_id))).scalar_one()


async def history(svc: Service, delivery_id: uuid.UUID) -> list[tuple[str | None, str]]:
    async with svc.runtime.sessions() as session:
        rows = await session.execute(
            sa.select(DeliveryTransition.from_status, DeliveryTransition.to_status)
            .where(col(DeliveryTransition.delivery_id) == delivery_id)
            .order_by(col(DeliveryTransition.at), col(DeliveryTransition.id))
        )
        return [(from_status, to_status) for from_status, to_status in rows]


async def attempt_outcomes(svc: Service, delivery_id: uuid.UUID) -> list[str | None]:
    async with svc.runtime.sessions() as session:
        rows = await session.execute(
            sa.select(DeliveryAttempt.outcome)
            .where(col(DeliveryAttempt.delivery_id) == delivery_id)
            .order_by(col(DeliveryAttempt.number))
        )
        return list(rows.scalars())


async def test_an_outcome_is_one_statement_without_a_transaction_block(
    postgres_url: str, onesignal_fake: OneSignalFake
) -> None:
    async with by_hand(postgres_url, onesignal_fake, "u-1", "u-2") as svc:
        [batch] = await claimed(svc, "push")
        with commits_of(svc) as commits, recorded_statements(svc.runtime.engine) as statements:
            reports = await svc.runtime.runner.complete(batch)
        assert [report.kind for report in reports] == ["sent", "sent"]
        assert commits == []  # no BEGIN ... COMMIT: PostgreSQL committed the one statement by itself
        [written] = statements
        assert written.on_driver
        assert "FOR UPDATE" in written.sql
        for claim in batch.claims:
            assert (await row(svc, claim.delivery.id)).status == "sent"
            assert (await history(svc, claim.delivery.id))[-1] == ("sending", "sent")
            assert await attempt_outcomes(svc, claim.delivery.id) == ["sent"]


async def test_a_claim_taken_over_while_sending_is_reported_lost_and_left_to_its_new_owner(
    database_url: str, onesignal_fake: OneSignalFake
) -> None:
    async with by_hand(database_url, onesignal_fake, "u-1") as svc:
        runner = svc.runtime.runner
        briefly = await runner.claim_due(limit=10, lease=dt.timedelta(milliseconds=1))
        [first] = [batch for batch in briefly if batch.claims[0].delivery.channel == "push"]
        await asyncio.sleep(0.05)  # the lease ends; another worker takes the row over
        [second] = await claimed(svc, "push")
        assert [report.kind for report in await runner.complete(first)] == ["lost"]
        [claim] = first.claims
        taken = await row(svc, claim.delivery.id)
        assert (taken.status, taken.claim_token) == ("sending", second.token)  # as its new owner claimed it
        # The lost attempt's row says what it did (it happened); the new one is still out.
        assert await attempt_outcomes(svc, claim.delivery.id) == ["sent", None]
        assert [report.kind for report in await runner.complete(second)] == ["sent"]
        assert (await row(svc, claim.delivery.id)).status == "sent"


async def test_qstash_giving_up_on_a_row_being_sent_is_kept_by_its_outcome(
    database_url: str, onesignal_fake: OneSignalFake
) -> None:
    # QStash's failure callback marks a row it gave up on even while an attempt holds it; the attempt's outcome
    # must keep the mark (the sweep re-dispatches the row by it), whichever way the outcome is written.
    async with by_hand(database_url, onesignal_fake, "u-1") as svc:
        [batch] = await claimed(svc, "push")
        [claim] = batch.claims
        async with svc.runtime.sessions() as session, session.begin():
            [(held, _, _)] = await deliveries.lock_unit(session, delivery_id=claim.delivery.id)
            held.gave_up_generation, held.gave_up_count = held.dispatch_generation, 1
            await deliveries.write(session, [held])
        onesignal_fake.fail_next(Fault.http(503, {"errors": ["try later"]}))
        assert [report.kind for report in await svc.runtime.runner.complete(batch)] == ["retry"]
        after = await row(svc, claim.delivery.id)
    assert (after.status, after.gave_up_generation, after.gave_up_count) == ("queued", after.dispatch_generation, 1)


async def test_a_message_read_while_its_attempt_is_out_ends_read(database_url: str, ably_fake: AblyFake) -> None:
    # The inbox message is stored, then announced: its reader may open it before the announcement returns.
    async with announcing_late(database_url, ably_fake, seconds=1.0) as (svc, batch, attempt):
        item = await stored_message(svc)
        read = await svc.client.post(f"/v1/users/user-1/inbox/{item['id']}/read", headers=svc.auth)
        assert read.status_code == 200
        assert not attempt.done()  # read while the attempt is out
        assert [report.kind for report in await attempt] == ["sent"]
        delivery_id = batch.claims[0].delivery.id
        assert (await row(svc, delivery_id)).status == "read"
        assert (await history(svc, delivery_id))[-2:] == [("sending", "sent"), ("sent", "read")]


@contextlib.asynccontextmanager
async def announcing_late(
    url: str, ably_fake: AblyFake, *, seconds: float
) -> AsyncIterator[tuple[Service, Batch, asyncio.Task[list[AttemptReport]]]]:
    """The service with the inbox channel live, a booking's in-app delivery claimed by hand and its attempt under
    way: its message is stored, and its announcement answered ``seconds`` late."""
    settings = make_settings(url, ably_api_key=ably_fake.api_key, ably_rest_url=ably_fake.url)
    async with running_service(settings) as svc:
        await svc.runtime.dispatcher.aclose()
        assert (await svc.post_event(booking_event())).status_code == 202
        [batch] = await claimed(svc, "in_app")
        ably_fake.fail_next(Fault.delay(seconds))
        yield svc, batch, asyncio.create_task(svc.runtime.runner.complete(batch))


async def stored_message(svc: Service) -> dict[str, Any]:
    for _ in range(100):
        page = (await svc.get("/v1/users/user-1/inbox")).json()["data"]
        if page:
            return dict(page[0])
        await asyncio.sleep(0.01)
    raise AssertionError("the in-app channel stored no message")


async def test_a_reader_who_holds_the_row_as_the_outcome_is_written_is_seen(
    postgres_url: str, ably_fake: AblyFake
) -> None:
    # The reader's transaction has read the message and holds the delivery (``sending``) when the outcome's
    # statement starts; it commits while the statement waits for the row. The statement's snapshot predates the
    # read, so only the reader's mark on the row (``state.read_while_sending``) can tell it: the outcome is then
    # recorded from the locked row, and the delivery ends read.
    async with announcing_late(postgres_url, ably_fake, seconds=0.5) as (svc, batch, attempt):
        item = await stored_message(svc)
        delivery_id = batch.claims[0].delivery.id
        async with svc.runtime.sessions() as reader, reader.begin():
            message = await inbox.lock(reader, message_id=uuid.UUID(item["id"]))
            assert message is not None
            message.read_at = utcnow()
            locked = await deliveries.lock_many(reader, [delivery_id])
            assert state.read_while_sending(locked[delivery_id], now=utcnow())
            await deliveries.write(reader, list(locked.values()))
            await reader.flush()
            while not await waiting_for_a_lock(reader):  # the outcome's statement is waiting for this row
                await asyncio.sleep(0.02)
        assert [report.kind for report in await attempt] == ["sent"]
        assert (await row(svc, delivery_id)).status == "read"
        assert (await history(svc, delivery_id))[-2:] == [("sending", "sent"), ("sent", "read")]


async def waiting_for_a_lock(session: Any) -> bool:
    """Whether another backend on this session's database waits for a lock (one this session's transaction
    holds, in the tests that ask)."""
    waiting = await session.execute(
        sa.text(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE NOT l.granted AND a.datname = current_database() AND l.pid <> pg_backend_pid()"
        )
    )
    return bool(waiting.scalar_one())


async def test_a_batch_written_again_after_its_group_commit_failed_keeps_what_was_settled(
    database_url: str, onesignal_fake: OneSignalFake
) -> None:
    # Two batches share a group commit; the second's fallback cannot be stored, so the group commit fails after
    # the first was settled and is written again batch by batch: the first keeps its settlement (not "lost").
    async with by_hand(database_url, onesignal_fake, "u-1") as svc:
        chat = {"conversation_id": "c-1", "sender_name": "Ann", "preview": "Are you there?"}
        recipient = {"id": "u-2", "email": "u2@example.com"}
        await svc.post_event({"type": "chat.message.offline", "recipients": [recipient], "data": chat})
        by_user = {b.claims[0].delivery.user_id: b for b in await claimed(svc, "push")}
        runtime = svc.runtime
        recorder = OutcomeRecorder(
            sessions=runtime.sessions,
            channels=runtime.channels,
            settings=runtime.settings,
            metrics=runtime.metrics,
            states=runtime.states,
            fallback=runtime.runner.fallback,
        )
        now = utcnow()
        sent = Finished(by_user["u-1"], [SendResult.sent("n-1")], now, 0.01)
        refused = Finished(by_user["u-2"], [SendResult.failed(Reason.not_subscribed, "no device")], now, 0.01)
        async with inserts_refused(runtime.engine, "deliveries"):  # the fallback's email delivery
            reports = await asyncio.gather(recorder.submit(sent), recorder.submit(refused), return_exceptions=True)
        assert isinstance(reports[1], Exception)
        assert [report.kind for report in reports[0]] == ["sent"]  # type: ignore[union-attr]
        delivery_id = by_user["u-1"].claims[0].delivery.id
        assert (await row(svc, delivery_id)).status == "sent"
        assert (await history(svc, delivery_id)).count(("sending", "sent")) == 1
