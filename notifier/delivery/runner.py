"""Attempting deliveries: claim → render → send → record → classify.

The QStash endpoint calls ``DeliveryRunner.attempt`` for one delivery. The local dispatcher claims due
deliveries in batches (``claim_due``: lease, attempt rows and transitions for the whole batch in one
transaction) and hands each ``Claim`` to ``complete``. Outcomes from concurrent attempts are recorded
together (``GroupCommit``: one transaction for everything finished meanwhile), because on a small machine
the cost of a delivery is mostly its transactions. Every status change goes through
``notifier.delivery.state``; every attempt writes an attempt row; the outcome write is shielded from
cancellation so a shutdown never leaves a row half-recorded.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from notifier.catalog import Catalog, EventType
from notifier.channels.base import Message, Outcome, Recipient, SendResult
from notifier.channels.registry import ChannelRegistry
from notifier.config import Settings
from notifier.db import deliveries
from notifier.db.models import Delivery, Event, User
from notifier.delivery import state
from notifier.delivery.batching import GroupCommit
from notifier.delivery.fallback import plan_fallback
from notifier.delivery.state import DeliveryStates, Move
from notifier.errors import Conflict, NotFound, TemplateError
from notifier.metrics import Metrics
from notifier.types import TERMINAL_STATUSES, ChannelName, DeliveryStatus, DispatchItem, Reason, utcnow

log = logging.getLogger("notifier.delivery")

ReportKind = Literal["sent", "retry", "failed", "suppressed", "terminal", "busy", "missing", "lost"]


@dataclass(frozen=True)
class AttemptReport:
    """What an attempt amounted to, for the dispatcher (and QStash's HTTP answer)."""

    kind: ReportKind
    delivery_id: uuid.UUID
    status: str | None = None
    reason: str | None = None
    retry_after: float | None = None
    detail: str = ""
    follow_up: list[DispatchItem] = field(default_factory=list)


@dataclass
class Claim:
    """A delivery leased to one attempt: its row, what rendering needs, and the fencing token."""

    delivery: Delivery
    event: Event
    user: User | None
    token: uuid.UUID
    number: int
    digest_count: int
    via: str


@dataclass(frozen=True)
class _Finished:
    claim: Claim
    result: SendResult
    started_at: dt.datetime  # when the worker began the attempt (the claim may have waited in a queue)
    elapsed: float


class DeliveryRunner:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        catalog: Catalog,
        channels: ChannelRegistry,
        settings: Settings,
        metrics: Metrics,
        states: DeliveryStates,
    ) -> None:
        self._sessions = sessions
        self._catalog = catalog
        self._channels = channels
        self._settings = settings
        self._metrics = metrics
        self._states = states
        # A 2 ms linger lets the outcomes of concurrent workers share one transaction; tuned in bench/.
        self._outcomes = GroupCommit(self._record_outcomes, max_batch=max(16, settings.workers), linger=0.002)

    async def attempt(self, delivery_id: uuid.UUID, *, via: str) -> AttemptReport:
        """Attempt ``delivery_id`` once. Never raises for provider faults; returns what happened."""
        claim = await self._begin(delivery_id, via=via)
        if isinstance(claim, AttemptReport):
            return claim
        return await self.complete(claim)

    async def claim_due(self, *, limit: int, lease: dt.timedelta, via: str = "local") -> list[Claim]:
        """Lease up to ``limit`` due deliveries and start an attempt on each, all in one transaction."""
        now = utcnow()
        async with self._sessions() as session, session.begin():
            rows = await deliveries.claim_due(session, now=now, limit=limit)
            return await self._start(session, rows, token=uuid.uuid4(), via=via, lease=lease, now=now)

    async def complete(self, claim: Claim) -> AttemptReport:
        """Send a claimed delivery and record the outcome (in one transaction with other workers' outcomes)."""
        started_at, started = utcnow(), time.perf_counter()
        try:
            result = await self._prepare_and_send(claim)
        except asyncio.CancelledError:
            await asyncio.shield(self.release([claim], "attempt interrupted by shutdown"))
            raise
        return await self._outcomes.submit(_Finished(claim, result, started_at, time.perf_counter() - started))

    async def renew(self, claim: Claim, lease: dt.timedelta) -> bool:
        """Extend ``claim``'s lease from now; False if the row was taken over (the token no longer matches)."""
        claimed_until = utcnow() + lease
        async with self._sessions() as session, session.begin():
            renewed = await deliveries.renew_lease(
                session, delivery_id=claim.delivery.id, token=claim.token, claimed_until=claimed_until
            )
        if renewed:
            claim.delivery.claimed_until = claimed_until
        return renewed

    async def _begin(self, delivery_id: uuid.UUID, *, via: str) -> Claim | AttemptReport:
        now = utcnow()
        async with self._sessions() as session, session.begin():
            # One round trip for the row, its event and its recipient (the attempt needs all three).
            row = await deliveries.lock_with_context(session, delivery_id)
            if row is None:
                return AttemptReport("missing", delivery_id, detail="no such delivery")
            delivery = row[0]
            if delivery.status in TERMINAL_STATUSES:
                return AttemptReport("terminal", delivery_id, delivery.status, delivery.reason)
            if (busy := _busy(delivery, now)) is not None:
                return busy
            lease = dt.timedelta(seconds=self._settings.claim_lease_seconds)
            [claim] = await self._start(session, [row], token=uuid.uuid4(), via=via, lease=lease, now=now)
            return claim

    async def _start(
        self,
        session: AsyncSession,
        rows: Sequence[deliveries.DeliveryContext],
        *,
        token: uuid.UUID,
        via: str,
        lease: dt.timedelta,
        now: dt.datetime,
    ) -> list[Claim]:
        """Move locked rows to ``sending`` under ``token`` and open an attempt row for each."""
        abandoned = [delivery.id for delivery, _, _ in rows if delivery.status == DeliveryStatus.sending]
        await deliveries.close_interrupted_attempts(session, delivery_ids=abandoned, now=now)
        claimed_until = now + lease
        digest_counts = await deliveries.digest_counts(session, heads=[d for d, _, _ in rows if d.digest_key])
        claims: list[Claim] = []
        moves: list[Move] = []
        for delivery, event, user in rows:
            moves.append(state.claim(delivery, token=token, claimed_until=claimed_until, via=via, now=now))
            digest_count = digest_counts.get(delivery.id, 0)
            claims.append(Claim(delivery, event, user, token, delivery.attempts, digest_count, via))
        await self._states.record(session, moves, now=now)
        await deliveries.insert_attempts(
            session,
            rows=[
                {"id": uuid.uuid4(), "delivery_id": c.delivery.id, "number": c.number, "started_at": now, "via": via}
                for c in claims
            ],
        )
        return claims

    def _message(self, claim: Claim, event_type: EventType) -> Message | SendResult:
        delivery, user = claim.delivery, claim.user
        channel = ChannelName(delivery.channel)
        implementation = self._channels.get(channel)
        if implementation is None:
            return SendResult.failed(Reason.channel_unavailable, f"no provider is configured for {channel}")
        if implementation.needs_email and not (user and user.email):
            return SendResult.failed(Reason.no_address, "the recipient has no email address")
        try:
            rendered = event_type.render(
                channel, user.locale if user else None, claim.event.data, digest_count=claim.digest_count
            )
        except TemplateError as exc:
            return SendResult.failed(Reason.template_error, exc.detail)
        return Message(
            delivery_id=delivery.id,
            event_id=claim.event.id,
            event_type=claim.event.type,
            channel=channel,
            recipient=Recipient(
                id=delivery.user_id,
                email=user.email if user else None,
                name=user.name if user else None,
                locale=user.locale if user else None,
                timezone=user.timezone if user else None,
            ),
            title=rendered.title,
            body=rendered.body,
            html=rendered.html,
            data={**claim.event.data, "event_id": str(claim.event.id), "event_type": claim.event.type},
            action_url=rendered.action_url,
        )

    async def _prepare_and_send(self, claim: Claim) -> SendResult:
        event_type = self._catalog.get(claim.event.type)
        if event_type is None:
            return SendResult.failed(
                Reason.template_error, f"event type '{claim.event.type}' is no longer in the catalog"
            )
        message = self._message(claim, event_type)
        if isinstance(message, SendResult):
            return message
        channel = self._channels.get(message.channel)
        assert channel is not None  # checked in _message
        started = time.perf_counter()
        try:
            # Channels bound their own provider calls; this outer bound only guards against a channel bug.
            result = await asyncio.wait_for(channel.send(message), self._settings.provider_timeout_seconds * 3 + 5)
        except TimeoutError:
            result = SendResult.retry("provider call did not finish in time")
        except Exception as exc:  # a channel must classify, but a bug there must not kill the worker
            log.exception("channel %s raised instead of classifying", channel.provider)
            result = SendResult.retry(f"channel error: {type(exc).__name__}")
        self._metrics.provider_latency.labels(channel=str(message.channel), provider=channel.provider).observe(
            time.perf_counter() - started
        )
        return result

    async def _record_outcomes(self, finished: Sequence[_Finished]) -> list[AttemptReport]:
        """Record the outcomes of attempts in one transaction (``GroupCommit`` batches concurrent ones)."""
        now = utcnow()
        async with self._sessions() as session, session.begin():
            locked = await deliveries.lock_many(session, [f.claim.delivery.id for f in finished])
            # The attempt row is recorded even when the claim was lost: it happened.
            await deliveries.finish_attempts(
                session,
                outcomes=[
                    {
                        "b_delivery_id": f.claim.delivery.id,
                        "b_number": f.claim.number,
                        # The attempt's own span, not the claim's queue wait or the group commit's linger:
                        # the dashboard's p95 attempt latency is computed from these two.
                        "started_at": f.started_at,
                        "finished_at": f.started_at + dt.timedelta(seconds=f.elapsed),
                        "outcome": str(f.result.outcome),
                        "http_status": f.result.http_status,
                        "provider_message_id": f.result.provider_message_id,
                        "error": f.result.detail[:1000] if f.result.outcome is not Outcome.sent else None,
                    }
                    for f in finished
                ],
            )
            reports: list[AttemptReport] = []
            moves: list[Move] = []
            for f in finished:
                self._metrics.attempts.labels(channel=f.claim.delivery.channel, outcome=str(f.result.outcome)).inc()
                delivery = locked.get(f.claim.delivery.id)
                if delivery is None or delivery.claim_token != f.claim.token:
                    reports.append(
                        AttemptReport("lost", f.claim.delivery.id, detail="the claim was taken over while sending")
                    )
                    continue
                channel = self._channels.get(delivery.channel)
                move, kind, retry_after = state.settle(
                    delivery,
                    f.result,
                    now=now,
                    max_retries=self._settings.max_retries,
                    backoff_scale=self._settings.retry_backoff_scale,
                    dedupe_window=channel.dedupe_window if channel is not None else None,
                    context={
                        "attempt": f.claim.number,
                        "via": f.claim.via,
                        "elapsed_ms": round(f.elapsed * 1000, 1),
                        "outcome": str(f.result.outcome),
                        "http_status": f.result.http_status,
                    },
                )
                moves.append(move)
                report = AttemptReport(
                    kind, delivery.id, delivery.status, delivery.reason, retry_after, move.note or ""
                )
                if kind == "failed":
                    report.follow_up.extend(await self._fallback(session, delivery, f.claim.event, now))
                reports.append(report)
            await self._states.record(session, moves, now=now)
            return reports

    async def _fallback(
        self, session: AsyncSession, delivery: Delivery, event: Event, now: dt.datetime
    ) -> list[DispatchItem]:
        return await plan_fallback(
            session,
            states=self._states,
            delivery=delivery,
            event=event,
            catalog=self._catalog,
            live_channels=self._channels.live,
            now=now,
        )

    async def release(self, claims: Sequence[Claim], note: str) -> None:
        """Give claims back (status queued, due now); the next attempt reuses the idempotency key.

        Their open attempt rows are closed as ``interrupted``. A claim taken over meanwhile is left to
        its new owner.
        """
        now = utcnow()
        tokens = {claim.delivery.id: claim.token for claim in claims}
        async with self._sessions() as session, session.begin():
            locked = await deliveries.lock_many(session, list(tokens))
            owned = [delivery for delivery in locked.values() if delivery.claim_token == tokens[delivery.id]]
            await deliveries.close_interrupted_attempts(session, delivery_ids=[d.id for d in owned], now=now)
            await self._states.record(session, [state.release(d, note=note, now=now) for d in owned], now=now)

    async def exhaust(self, delivery_id: uuid.UUID, *, note: str) -> AttemptReport:
        """Fail a pending delivery ``retries_exhausted`` (QStash gave up) and plan its fallback.

        A delivery an attempt is sending right now is left to that attempt's outcome (``busy``, with the
        seconds left on its lease).
        """
        now = utcnow()
        async with self._sessions() as session, session.begin():
            row = await deliveries.lock_with_context(session, delivery_id)
            if row is None:
                return AttemptReport("missing", delivery_id)
            delivery, event, _ = row
            if delivery.status in TERMINAL_STATUSES:
                return AttemptReport("terminal", delivery_id, delivery.status, delivery.reason)
            if (busy := _busy(delivery, now)) is not None:
                return busy
            if delivery.status == DeliveryStatus.sending:
                await deliveries.close_interrupted_attempts(session, delivery_ids=[delivery.id], now=now)
            await self._states.record(session, [state.exhaust(delivery, note=note, now=now)], now=now)
            follow_up = await self._fallback(session, delivery, event, now)
            return AttemptReport("failed", delivery_id, delivery.status, delivery.reason, follow_up=follow_up)

    async def requeue_failed(self, delivery_id: uuid.UUID, *, note: str = "retried by an operator") -> DispatchItem:
        """Give a failed delivery a fresh retry budget; raise ``NotFound``, or ``Conflict`` unless it is ``failed``."""
        now = utcnow()
        async with self._sessions() as session, session.begin():
            delivery = (await deliveries.lock_many(session, [delivery_id])).get(delivery_id)
            if delivery is None:
                raise NotFound(f"delivery '{delivery_id}' not found")
            if delivery.status != DeliveryStatus.failed:
                raise Conflict(f"only failed deliveries can be retried; this one is {delivery.status}")
            await self._states.record(session, [state.requeue(delivery, note=note, now=now)], now=now)
            return DispatchItem(delivery.id, None)


def _busy(delivery: Delivery, now: dt.datetime) -> AttemptReport | None:
    """``busy`` (with the seconds left) while an attempt holds ``delivery``'s lease, else None."""
    if delivery.status != DeliveryStatus.sending or delivery.claimed_until is None:
        return None
    remaining = (delivery.claimed_until - now).total_seconds()
    if remaining <= 0:
        return None
    return AttemptReport("busy", delivery.id, delivery.status, retry_after=math.ceil(remaining))
