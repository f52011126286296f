"""Attempting deliveries: claim → render → send → record → classify.

The QStash endpoint calls ``DeliveryRunner.attempt`` for one delivery. The local dispatcher claims
due deliveries in batches (``claim_due``: lease, attempt rows and transitions for the whole batch
in one transaction) and hands each ``Claim`` to ``complete``. Outcomes from concurrent attempts are
recorded together (``GroupCommit``: one transaction for everything finished meanwhile), because on
a small machine the cost of a delivery is mostly its transactions. Every step that changes a
delivery writes a transition row in the same transaction, every attempt writes an attempt row, and
the outcome write is shielded from cancellation so a shutdown never leaves a row half-recorded.
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

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from notifier import delivery_rows, store
from notifier.batching import GroupCommit
from notifier.catalog import Catalog, EventType
from notifier.channels.base import Message, Outcome, Recipient, SendResult
from notifier.channels.registry import ChannelRegistry
from notifier.config import Settings
from notifier.dispatch.base import DispatchItem
from notifier.errors import Conflict, NotFound, TemplateError
from notifier.fallback import plan_fallback
from notifier.metrics import Metrics
from notifier.models import Delivery, Event, User, utcnow
from notifier.retry import retry_delay
from notifier.types import TERMINAL_STATUSES, ChannelName, DeliveryStatus, Reason

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
    ) -> None:
        self._sessions = sessions
        self._catalog = catalog
        self._channels = channels
        self._settings = settings
        self._metrics = metrics
        # A 2 ms linger lets the outcomes of concurrent workers share one transaction; tuned in bench/.
        self._outcomes = GroupCommit(self._record_outcomes, max_batch=max(16, settings.workers), linger=0.002)

    async def attempt(self, delivery_id: uuid.UUID, *, via: str) -> AttemptReport:
        """Attempt ``delivery_id`` once. Never raises for provider faults; returns what happened."""
        claim = await self._begin(delivery_id, via=via)
        if isinstance(claim, AttemptReport):
            return claim
        return await self.complete(claim)

    async def claim_due(self, *, limit: int, lease: dt.timedelta, via: str = "local") -> list[Claim]:
        """Lease up to ``limit`` due deliveries and start an attempt on each, all in one transaction.

        ``SKIP LOCKED`` on PostgreSQL, so replicas never take the same row. Rows come in the table's
        physical order (roughly oldest first), not sorted: sorting every due row to take the first
        ``limit`` made each claim cost O(backlog) -- 16 ms at an 8,000-row backlog -- where an
        unsorted scan stops after ``limit`` rows.
        """
        now = utcnow()
        async with self._sessions() as session, session.begin():
            statement = (
                delivery_rows.with_context(delivery_rows.due_condition(now))
                .limit(limit)
                .with_for_update(of=Delivery, skip_locked=True)
            )
            rows = [(row[0], row[1], row[2]) for row in (await session.execute(statement)).all()]
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
            renewed = await delivery_rows.renew_lease(
                session, claim.delivery.id, token=claim.token, claimed_until=claimed_until
            )
        if renewed:
            claim.delivery.claimed_until = claimed_until
        return renewed

    async def _begin(self, delivery_id: uuid.UUID, *, via: str) -> Claim | AttemptReport:
        now = utcnow()
        async with self._sessions() as session, session.begin():
            # One round trip for the row, its event and its recipient (the attempt needs all three).
            row = (
                await session.execute(
                    delivery_rows.with_context(col(Delivery.id) == delivery_id).with_for_update(of=Delivery)
                )
            ).first()
            if row is None:
                return AttemptReport("missing", delivery_id, detail="no such delivery")
            delivery: Delivery = row[0]
            if delivery.status in TERMINAL_STATUSES:
                return AttemptReport("terminal", delivery_id, delivery.status, delivery.reason)
            if delivery.status == DeliveryStatus.sending and delivery.claimed_until:
                remaining = (delivery.claimed_until - now).total_seconds()
                if remaining > 0:
                    return AttemptReport("busy", delivery_id, delivery.status, retry_after=math.ceil(remaining))
            lease = dt.timedelta(seconds=self._settings.claim_lease_seconds)
            [claim] = await self._start(
                session, [(row[0], row[1], row[2])], token=uuid.uuid4(), via=via, lease=lease, now=now
            )
            return claim

    async def _start(
        self,
        session: AsyncSession,
        rows: Sequence[tuple[Delivery, Event, User | None]],
        *,
        token: uuid.UUID,
        via: str,
        lease: dt.timedelta,
        now: dt.datetime,
    ) -> list[Claim]:
        """Move locked rows to ``sending`` under ``token`` and open an attempt row for each.

        The rows are written with one UPDATE and one INSERT for the whole batch, not an ORM flush per
        object (the unit of work cost more CPU than the statements; measured in bench/).
        """
        session.expunge_all()  # the objects below are the claim's copies; delivery_rows writes the rows
        abandoned = [delivery.id for delivery, _, _ in rows if delivery.status == DeliveryStatus.sending]
        if abandoned:
            await delivery_rows.close_interrupted_attempts(session, abandoned, now)
        claimed_until = now + lease
        digest_counts = await delivery_rows.digest_counts(session, [d for d, _, _ in rows if d.digest_key])
        claims: list[Claim] = []
        attempts: list[dict[str, object]] = []
        moves: list[store.NewTransition] = []
        for delivery, event, user in rows:
            from_status = delivery.status
            delivery.status = DeliveryStatus.sending
            delivery.claim_token = token
            delivery.claimed_until = claimed_until
            delivery.attempts += 1
            delivery.updated_at = now
            attempts.append(
                {
                    "id": uuid.uuid4(),
                    "delivery_id": delivery.id,
                    "number": delivery.attempts,
                    "started_at": now,
                    "via": via,
                }
            )
            moves.append(
                _move(
                    delivery,
                    from_status=from_status,
                    note=f"attempt {delivery.attempts} via {via}",
                    attempt=delivery.attempts,
                    via=via,
                )
            )
            digest_count = digest_counts.get(delivery.id, 0)
            claims.append(Claim(delivery, event, user, token, delivery.attempts, digest_count, via))
        await delivery_rows.open_attempts(session, attempts, token=token, claimed_until=claimed_until, now=now)
        await store.record_transitions(session, transitions=moves, at=now)
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
            deliveries = await delivery_rows.lock_many(session, [f.claim.delivery.id for f in finished])
            session.expunge_all()  # changed below in Python, written by one executemany UPDATE
            # The attempt row is recorded even when the claim was lost: it happened. Plain UPDATEs in
            # one executemany, not a SELECT and an ORM flush per row.
            await delivery_rows.finish_attempts(
                session,
                [
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
            moves: list[store.NewTransition] = []
            for f in finished:
                self._metrics.attempts.labels(channel=f.claim.delivery.channel, outcome=str(f.result.outcome)).inc()
                delivery = deliveries.get(f.claim.delivery.id)
                if delivery is None or delivery.claim_token != f.claim.token:
                    reports.append(
                        AttemptReport("lost", f.claim.delivery.id, detail="the claim was taken over while sending")
                    )
                    continue
                report = self._apply(
                    delivery,
                    f.result,
                    now,
                    moves,
                    attempt=f.claim.number,
                    via=f.claim.via,
                    elapsed_ms=round(f.elapsed * 1000, 1),
                    outcome=str(f.result.outcome),
                    http_status=f.result.http_status,
                )
                if report.status == DeliveryStatus.failed:
                    report.follow_up.extend(
                        await plan_fallback(
                            session,
                            delivery=delivery,
                            event=f.claim.event,
                            catalog=self._catalog,
                            live_channels=self._channels.live,
                            now=now,
                        )
                    )
                reports.append(report)
            await delivery_rows.write_outcomes(
                session, [deliveries[r.delivery_id] for r in reports if r.kind != "lost"]
            )
            await store.record_transitions(session, transitions=moves, at=now)
            return reports

    def _apply(
        self,
        delivery: Delivery,
        result: SendResult,
        now: dt.datetime,
        moves: list[store.NewTransition],
        **context: object,
    ) -> AttemptReport:
        """Move the claimed delivery to its next status according to ``result`` (the move goes to ``moves``).

        ``context`` goes to the move's log line.
        """
        from_status = delivery.status
        delivery.claim_token = None
        delivery.claimed_until = None
        delivery.updated_at = now
        retry_after: float | None = None
        if result.outcome is Outcome.sent:
            delivery.status, delivery.reason = DeliveryStatus.sent, None
            delivery.sent_at = now
            delivery.provider_message_id = result.provider_message_id
            delivery.last_error = None
            kind: ReportKind = "sent"
        elif result.outcome is Outcome.failed and result.reason in (Reason.channel_unavailable, Reason.no_address):
            delivery.status, delivery.reason = DeliveryStatus.suppressed, str(result.reason)
            kind = "suppressed"
        elif result.outcome is Outcome.failed:
            delivery.status, delivery.reason = DeliveryStatus.failed, str(result.reason or Reason.rejected)
            delivery.last_error = result.detail[:1000]
            kind = "failed"
        elif delivery.attempts - delivery.retry_base >= 1 + self._settings.max_retries:
            delivery.status, delivery.reason = DeliveryStatus.failed, str(Reason.retries_exhausted)
            delivery.last_error = result.detail[:1000]
            kind = "failed"
        else:
            channel = self._channels.get(delivery.channel)
            retry_after, kept = retry_delay(
                delivery.attempts - delivery.retry_base,
                scale=self._settings.retry_backoff_scale,
                retry_after=result.retry_after,
                window=channel.dedupe_window if channel is not None else None,
                since=delivery.created_at,  # no later than the first attempt, which opened the window
                now=now,
            )
            delivery.status, delivery.reason = DeliveryStatus.queued, None
            delivery.not_before = now + dt.timedelta(seconds=retry_after)
            delivery.last_error = result.detail[:1000]
            kind = "retry"
            result = result.noted(kept)  # the transition's note says why the retry comes early
        moves.append(_move(delivery, from_status=from_status, note=result.detail or None, **context))
        self._metrics.delivery_status(delivery.channel, delivery.status, delivery.reason)
        return AttemptReport(kind, delivery.id, delivery.status, delivery.reason, retry_after, result.detail)

    async def release(self, claims: Sequence[Claim], note: str) -> None:
        """Give claims back (status queued, due now); the next attempt reuses the idempotency key.

        Their open attempt rows are closed as ``interrupted``. A claim taken over meanwhile is left to
        its new owner.
        """
        now = utcnow()
        tokens = {claim.delivery.id: claim.token for claim in claims}
        async with self._sessions() as session, session.begin():
            locked = await delivery_rows.lock_many(session, list(tokens))
            owned = [delivery for delivery in locked.values() if delivery.claim_token == tokens[delivery.id]]
            if not owned:
                return
            await delivery_rows.close_interrupted_attempts(session, [delivery.id for delivery in owned], now)
            moves = []
            for delivery in owned:
                delivery.status = DeliveryStatus.queued
                delivery.claim_token = None
                delivery.claimed_until = None
                delivery.not_before = None
                delivery.updated_at = now
                moves.append(_move(delivery, from_status=DeliveryStatus.sending, note=note))
            await store.record_transitions(session, transitions=moves, at=now)

    async def exhaust(self, delivery_id: uuid.UUID, *, note: str) -> AttemptReport:
        """Mark a delivery failed with ``retries_exhausted`` (QStash gave up) and plan its fallback."""
        now = utcnow()
        async with self._sessions() as session, session.begin():
            delivery = await delivery_rows.lock(session, delivery_id)
            if delivery is None:
                return AttemptReport("missing", delivery_id)
            if delivery.status in TERMINAL_STATUSES:
                return AttemptReport("terminal", delivery_id, delivery.status, delivery.reason)
            from_status = delivery.status
            if from_status == DeliveryStatus.sending:
                await delivery_rows.close_interrupted_attempts(session, [delivery.id], now)
            delivery.status, delivery.reason = DeliveryStatus.failed, str(Reason.retries_exhausted)
            delivery.claim_token = None
            delivery.claimed_until = None
            delivery.updated_at = now
            delivery.last_error = note[:1000]
            await store.record_transitions(
                session, transitions=[_move(delivery, from_status=from_status, note=note)], at=now
            )
            self._metrics.delivery_status(delivery.channel, delivery.status, delivery.reason)
            event = (await session.execute(sa.select(Event).where(col(Event.id) == delivery.event_id))).scalar_one()
            follow_up = await plan_fallback(
                session,
                delivery=delivery,
                event=event,
                catalog=self._catalog,
                live_channels=self._channels.live,
                now=now,
            )
            return AttemptReport("failed", delivery_id, delivery.status, delivery.reason, follow_up=follow_up)

    async def requeue_failed(self, delivery_id: uuid.UUID, *, note: str = "retried by an operator") -> DispatchItem:
        """Give a failed delivery a fresh retry budget; raise ``Conflict`` unless it is ``failed``."""
        now = utcnow()
        async with self._sessions() as session, session.begin():
            delivery = await delivery_rows.lock(session, delivery_id)
            if delivery is None:
                raise NotFound(f"delivery '{delivery_id}' not found")
            if delivery.status != DeliveryStatus.failed:
                raise Conflict(f"only failed deliveries can be retried; this one is {delivery.status}")
            delivery.status, delivery.reason = DeliveryStatus.queued, None
            delivery.not_before = None
            delivery.retry_base = delivery.attempts
            delivery.updated_at = now
            move = _move(delivery, from_status=DeliveryStatus.failed, note=note, via="operator")
            await store.record_transitions(session, transitions=[move], at=now)
            return DispatchItem(delivery.id, None)


def _move(delivery: Delivery, *, from_status: str | None, note: str | None, **context: object) -> store.NewTransition:
    """The move of ``delivery`` from ``from_status`` to its current status, for ``store.record_transitions``."""
    return store.NewTransition(
        delivery_id=delivery.id,
        from_status=from_status,
        to_status=delivery.status,
        reason=delivery.reason,
        note=note,
        context={"channel": delivery.channel, "event_id": str(delivery.event_id), **context},
    )
