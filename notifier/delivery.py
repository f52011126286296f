"""Attempting one delivery: claim → render → send → record → classify.

Both dispatchers call ``DeliveryRunner.attempt``: the local workers with the claim token of their
batch, the QStash endpoint without one. Every step that changes a delivery writes a transition
row in the same transaction, every attempt writes an attempt row, and the outcome write is
shielded from cancellation so a shutdown never leaves a row half-recorded.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from notifier import store
from notifier.catalog import Catalog, EventType
from notifier.channels.base import Message, Outcome, Recipient, SendResult
from notifier.channels.registry import ChannelRegistry
from notifier.config import Settings
from notifier.dispatch.base import DispatchItem
from notifier.errors import Conflict, NotFound, TemplateError
from notifier.fallback import plan_fallback
from notifier.metrics import Metrics
from notifier.models import Delivery, DeliveryAttempt, Event, User, utcnow
from notifier.types import TERMINAL_STATUSES, ChannelName, DeliveryStatus, Reason

log = logging.getLogger("notifier.delivery")

MAX_BACKOFF_SECONDS = 86400.0
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
class _Claim:
    delivery: Delivery
    event: Event
    user: User | None
    token: uuid.UUID
    number: int
    digest_count: int
    via: str


def backoff_seconds(retries_so_far: int, *, scale: float = 1.0, retry_after: float | None = None) -> float:
    """QStash's default schedule, min(1 day, e^(2.5·n)) s for the n-th retry (12 s, 2m28s, 30m…), scaled.

    A provider's Retry-After wins (capped at a day).
    """
    if retry_after is not None and retry_after >= 0:
        return min(retry_after, MAX_BACKOFF_SECONDS)
    return min(MAX_BACKOFF_SECONDS, math.exp(2.5 * retries_so_far)) * scale


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

    async def attempt(self, delivery_id: uuid.UUID, *, via: str, claim_token: uuid.UUID | None = None) -> AttemptReport:
        """Attempt ``delivery_id`` once. Never raises for provider faults; returns what happened."""
        started = time.perf_counter()
        claim = await self._begin(delivery_id, via=via, claim_token=claim_token)
        if isinstance(claim, AttemptReport):
            return claim
        try:
            result = await self._prepare_and_send(claim)
        except asyncio.CancelledError:
            await asyncio.shield(self._release(claim, "attempt interrupted by shutdown"))
            raise
        return await asyncio.shield(self._finish(claim, result, time.perf_counter() - started))

    async def _begin(
        self, delivery_id: uuid.UUID, *, via: str, claim_token: uuid.UUID | None
    ) -> _Claim | AttemptReport:
        now = utcnow()
        async with self._sessions() as session, session.begin():
            # One round trip for the row, its event and its recipient (the attempt needs all three).
            locked = await _lock_with_context(session, delivery_id)
            if locked is None:
                return AttemptReport("missing", delivery_id, detail="no such delivery")
            delivery, event, user = locked
            if delivery.status in TERMINAL_STATUSES:
                return AttemptReport("terminal", delivery_id, delivery.status, delivery.reason)
            if claim_token is not None and delivery.claim_token != claim_token:
                return AttemptReport("lost", delivery_id, delivery.status, detail="claimed by another worker")
            if claim_token is None and delivery.status == DeliveryStatus.sending and delivery.claimed_until:
                remaining = (delivery.claimed_until - now).total_seconds()
                if remaining > 0:
                    return AttemptReport("busy", delivery_id, delivery.status, retry_after=math.ceil(remaining))
            if delivery.status == DeliveryStatus.sending:
                await _close_interrupted_attempts(session, delivery.id, now)
            token = claim_token or uuid.uuid4()
            from_status = delivery.status
            delivery.status = DeliveryStatus.sending
            delivery.claim_token = token
            delivery.claimed_until = now + dt.timedelta(seconds=self._settings.claim_lease_seconds)
            delivery.attempts += 1
            delivery.updated_at = now
            session.add(DeliveryAttempt(delivery_id=delivery.id, number=delivery.attempts, started_at=now, via=via))
            _record_move(
                session,
                delivery,
                from_status=from_status,
                note=f"attempt {delivery.attempts} via {via}",
                now=now,
                attempt=delivery.attempts,
                via=via,
            )
            digest_count = await _digest_count(session, delivery) if delivery.digest_key else 0
            return _Claim(delivery, event, user, token, delivery.attempts, digest_count, via)

    def _message(self, claim: _Claim, event_type: EventType) -> Message | SendResult:
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

    async def _prepare_and_send(self, claim: _Claim) -> SendResult:
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

    async def _finish(self, claim: _Claim, result: SendResult, elapsed: float) -> AttemptReport:
        now = utcnow()
        delivery_id = claim.delivery.id
        async with self._sessions() as session, session.begin():
            delivery = await _lock(session, delivery_id)
            # The attempt row is recorded even when the claim was lost: it happened. A plain UPDATE, not
            # a SELECT and an ORM flush: one round trip instead of two.
            await session.execute(
                sa.update(DeliveryAttempt)
                .where(col(DeliveryAttempt.delivery_id) == delivery_id, col(DeliveryAttempt.number) == claim.number)
                .values(
                    finished_at=now,
                    outcome=str(result.outcome),
                    http_status=result.http_status,
                    provider_message_id=result.provider_message_id,
                    error=result.detail[:1000] if result.outcome is not Outcome.sent else None,
                )
                .execution_options(synchronize_session=False)
            )
            channel = claim.delivery.channel
            self._metrics.attempts.labels(channel=channel, outcome=str(result.outcome)).inc()
            if delivery is None or delivery.claim_token != claim.token:
                return AttemptReport("lost", delivery_id, detail="the claim was taken over while sending")
            report = self._apply(
                session,
                delivery,
                result,
                now,
                attempt=claim.number,
                via=claim.via,
                elapsed_ms=round(elapsed * 1000, 1),
                outcome=str(result.outcome),
                http_status=result.http_status,
            )
            if report.status == DeliveryStatus.failed:
                report.follow_up.extend(
                    await plan_fallback(
                        session,
                        delivery=delivery,
                        event=claim.event,
                        catalog=self._catalog,
                        live_channels=self._channels.live,
                        now=now,
                    )
                )
            return report

    def _apply(
        self, session: AsyncSession, delivery: Delivery, result: SendResult, now: dt.datetime, **context: object
    ) -> AttemptReport:
        """Move the claimed delivery to its next status according to ``result``; ``context`` goes to the log."""
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
            retry_after = backoff_seconds(
                delivery.attempts - delivery.retry_base,
                scale=self._settings.retry_backoff_scale,
                retry_after=result.retry_after,
            )
            delivery.status, delivery.reason = DeliveryStatus.queued, None
            delivery.not_before = now + dt.timedelta(seconds=retry_after)
            delivery.last_error = result.detail[:1000]
            kind = "retry"
        _record_move(
            session,
            delivery,
            from_status=from_status,
            note=result.detail or None,
            now=now,
            **context,
        )
        self._metrics.delivery_status(delivery.channel, delivery.status, delivery.reason)
        return AttemptReport(kind, delivery.id, delivery.status, delivery.reason, retry_after, result.detail)

    async def _release(self, claim: _Claim, note: str) -> None:
        """Give an interrupted claim back (status queued, due now); the next attempt reuses the idempotency key."""
        now = utcnow()
        async with self._sessions() as session, session.begin():
            delivery = await _lock(session, claim.delivery.id)
            if delivery is None or delivery.claim_token != claim.token:
                return
            await _close_interrupted_attempts(session, delivery.id, now)
            delivery.status = DeliveryStatus.queued
            delivery.claim_token = None
            delivery.claimed_until = None
            delivery.not_before = None
            delivery.updated_at = now
            _record_move(
                session,
                delivery,
                from_status=DeliveryStatus.sending,
                note=note,
                now=now,
            )

    async def exhaust(self, delivery_id: uuid.UUID, *, note: str) -> AttemptReport:
        """Mark a delivery failed with ``retries_exhausted`` (QStash gave up) and plan its fallback."""
        now = utcnow()
        async with self._sessions() as session, session.begin():
            delivery = await _lock(session, delivery_id)
            if delivery is None:
                return AttemptReport("missing", delivery_id)
            if delivery.status in TERMINAL_STATUSES:
                return AttemptReport("terminal", delivery_id, delivery.status, delivery.reason)
            from_status = delivery.status
            if from_status == DeliveryStatus.sending:
                await _close_interrupted_attempts(session, delivery.id, now)
            delivery.status, delivery.reason = DeliveryStatus.failed, str(Reason.retries_exhausted)
            delivery.claim_token = None
            delivery.claimed_until = None
            delivery.updated_at = now
            delivery.last_error = note[:1000]
            _record_move(
                session,
                delivery,
                from_status=from_status,
                note=note,
                now=now,
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
            delivery = await _lock(session, delivery_id)
            if delivery is None:
                raise NotFound(f"delivery '{delivery_id}' not found")
            if delivery.status != DeliveryStatus.failed:
                raise Conflict(f"only failed deliveries can be retried; this one is {delivery.status}")
            delivery.status, delivery.reason = DeliveryStatus.queued, None
            delivery.not_before = None
            delivery.retry_base = delivery.attempts
            delivery.updated_at = now
            _record_move(
                session,
                delivery,
                from_status=DeliveryStatus.failed,
                note=note,
                now=now,
                via="operator",
            )
            return DispatchItem(delivery.id, None)


async def _lock_with_context(
    session: AsyncSession, delivery_id: uuid.UUID
) -> tuple[Delivery, Event, User | None] | None:
    """Lock the delivery row (only it: ``FOR UPDATE OF deliveries``) and load its event and user with it."""
    statement = (
        sa.select(Delivery, Event, User)
        .join(Event, col(Event.id) == col(Delivery.event_id))
        .outerjoin(User, col(User.id) == col(Delivery.user_id))
        .where(col(Delivery.id) == delivery_id)
        .with_for_update(of=Delivery)
    )
    row = (await session.execute(statement)).first()
    return None if row is None else (row[0], row[1], row[2])


async def _lock(session: AsyncSession, delivery_id: uuid.UUID) -> Delivery | None:
    statement = sa.select(Delivery).where(col(Delivery.id) == delivery_id).with_for_update()
    return (await session.execute(statement)).scalar_one_or_none()


def _record_move(
    session: AsyncSession,
    delivery: Delivery,
    *,
    from_status: str | None,
    note: str | None,
    now: dt.datetime,
    **context: object,
) -> None:
    """Record the move of ``delivery`` from ``from_status`` to its current status (row + log line)."""
    store.transition(
        session,
        delivery_id=delivery.id,
        from_status=from_status,
        to_status=delivery.status,
        reason=delivery.reason,
        note=note,
        at=now,
        channel=delivery.channel,
        event_id=str(delivery.event_id),
        **context,
    )


async def _close_interrupted_attempts(session: AsyncSession, delivery_id: uuid.UUID, now: dt.datetime) -> None:
    await session.execute(
        sa.update(DeliveryAttempt)
        .where(col(DeliveryAttempt.delivery_id) == delivery_id, col(DeliveryAttempt.finished_at).is_(None))
        .values(finished_at=now, outcome="interrupted", error="the attempt did not record an outcome")
    )


async def _digest_count(session: AsyncSession, head: Delivery) -> int:
    """1 for the head plus every delivery folded into it since it was created."""
    folded = await session.execute(
        sa.select(sa.func.count())
        .select_from(Delivery)
        .where(
            col(Delivery.digest_key) == head.digest_key,
            col(Delivery.reason) == Reason.digested,
            col(Delivery.created_at) >= head.created_at,
        )
    )
    return 1 + int(folded.scalar_one())
