"""Attempting deliveries: claim → render → send → record → classify.

The unit of an attempt is a ``Batch``: the members of one send group, sent with one provider call under the
group's idempotency key, or one delivery alone under its own. The QStash endpoints call ``attempt`` (a
delivery, or the group it belongs to) and ``attempt_group``; the local dispatcher claims due batches
(``claim_due``: leases, attempt rows and transitions for all of them in one transaction) and hands each to
``complete``. Outcomes of concurrent attempts are recorded together (``GroupCommit``: one transaction for
everything finished meanwhile), because on a small machine the cost of a delivery is mostly its
transactions. Every status change goes through ``notifier.delivery.state``; every member of an attempt gets
its own attempt row, status and transition; the outcome write is shielded from cancellation, so a shutdown
never leaves a row half-recorded.

The retry budget (1 + NOTIFIER_MAX_RETRIES attempts since the last operator retry) is enforced when an
outcome is recorded and again when a delivery is claimed: a delivery whose attempts are spent (its last
outcome could not be stored) is failed ``retries_exhausted`` by the claim and never sent again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from notifier import db
from notifier.catalog import Catalog
from notifier.channels.base import Outcome, SendResult
from notifier.channels.registry import ChannelRegistry
from notifier.config import Settings
from notifier.db import deliveries
from notifier.db.deliveries import DeliveryContext
from notifier.db.models import Delivery, Event
from notifier.delivery import state
from notifier.delivery.batching import GroupCommit
from notifier.delivery.fallback import plan_fallback
from notifier.delivery.messages import Claim, group_message
from notifier.delivery.state import DeliveryStates, Move
from notifier.errors import Conflict, NotFound
from notifier.metrics import Metrics
from notifier.types import TERMINAL_STATUSES, DeliveryStatus, DispatchItem, Reason, utcnow

log = logging.getLogger("notifier.delivery")

ReportKind = Literal[
    "sent", "retry", "failed", "suppressed", "terminal", "busy", "missing", "lost", "superseded", "noted"
]
PROVIDER_ID_LIMIT = 200  # deliveries.provider_message_id, delivery_attempts.provider_message_id
ERROR_LIMIT = 1000  # delivery_attempts.error


@dataclass(frozen=True)
class AttemptReport:
    """What an attempt amounted to for one delivery, for the dispatcher (and QStash's HTTP answer)."""

    kind: ReportKind
    delivery_id: uuid.UUID
    status: str | None = None
    reason: str | None = None
    retry_after: float | None = None
    detail: str = ""
    follow_up: list[DispatchItem] = field(default_factory=list)


@dataclass
class Batch:
    """Claims attempted with one provider call under one lease (``token``): a send group's members, or one
    delivery alone."""

    claims: list[Claim]
    token: uuid.UUID
    via: str

    @property
    def key(self) -> str:
        """The provider idempotency key: the send group's id, or the delivery's when it goes alone."""
        first = self.claims[0].delivery
        return str(first.send_group or first.id)

    @property
    def delivery_ids(self) -> list[uuid.UUID]:
        return [claim.delivery.id for claim in self.claims]


@dataclass(frozen=True)
class _Finished:
    batch: Batch
    results: list[SendResult]  # one per claim, in order
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

    @property
    def lease(self) -> dt.timedelta:
        return dt.timedelta(seconds=self._settings.claim_lease_seconds)

    async def attempt(self, delivery_id: uuid.UUID, *, via: str, generation: int | None = None) -> list[AttemptReport]:
        """Attempt ``delivery_id`` once -- with its whole send group, when it is in one. Never raises for
        provider faults; returns what happened to each delivery attempted (or why none was)."""
        return await self._attempt_unit(delivery_id=delivery_id, via=via, generation=generation)

    async def attempt_group(
        self, group_id: uuid.UUID, *, via: str, generation: int | None = None
    ) -> list[AttemptReport]:
        """Attempt the members of send group ``group_id`` once, with one provider call."""
        return await self._attempt_unit(send_group=group_id, via=via, generation=generation)

    async def claim_due(self, *, limit: int, lease: dt.timedelta, via: str = "local") -> list[Batch]:
        """Lease about ``limit`` due deliveries (whole send groups) and start an attempt on each, in one transaction.

        Deliveries whose retry budget is already spent are failed here instead (their fallbacks are queued).
        """
        now = utcnow()
        async with self._sessions() as session, session.begin():
            rows = await deliveries.claim_due(session, now=now, limit=limit)
            batches, _ = await self._start(session, rows, via=via, lease=lease, now=now)
            return batches

    async def complete(self, batch: Batch) -> list[AttemptReport]:
        """Send a claimed batch and record the outcomes (in one transaction with other workers' outcomes)."""
        started_at, started = utcnow(), time.perf_counter()
        try:
            results = await self._prepare_and_send(batch)
        except asyncio.CancelledError:
            await asyncio.shield(self.release([batch], "attempt interrupted by shutdown"))
            raise
        return await self._outcomes.submit(_Finished(batch, results, started_at, time.perf_counter() - started))

    async def renew(self, batch: Batch, lease: dt.timedelta) -> bool:
        """Extend ``batch``'s lease from now; False if any of its rows was taken over (the token no longer matches)."""
        claimed_until = utcnow() + lease
        async with self._sessions() as session, session.begin():
            renewed = await deliveries.renew_lease(
                session, delivery_ids=batch.delivery_ids, token=batch.token, claimed_until=claimed_until
            )
        if renewed:
            for claim in batch.claims:
                claim.delivery.claimed_until = claimed_until
        return renewed

    async def _attempt_unit(
        self,
        *,
        via: str,
        generation: int | None,
        delivery_id: uuid.UUID | None = None,
        send_group: uuid.UUID | None = None,
    ) -> list[AttemptReport]:
        begun = await self._begin(via=via, generation=generation, delivery_id=delivery_id, send_group=send_group)
        if not isinstance(begun, Batch):
            return begun
        return await self.complete(begun)

    async def _begin(
        self,
        *,
        via: str,
        generation: int | None,
        delivery_id: uuid.UUID | None,
        send_group: uuid.UUID | None,
    ) -> Batch | list[AttemptReport]:
        """Claim a delivery (its group, when it is in one) or a group for one attempt; or say why not."""
        now = utcnow()
        async with self._sessions() as session, session.begin():
            rows = await deliveries.lock_unit(session, delivery_id=delivery_id, send_group=send_group)
            if rows and send_group is None and (group := rows[0][0].send_group) is not None:
                rows = await deliveries.lock_unit(session, send_group=group)
            if not rows:
                return [AttemptReport("missing", delivery_id or send_group or uuid.UUID(int=0), detail="none found")]
            if generation is not None and rows[0][0].dispatch_generation > generation:
                # A message of an earlier dispatch generation: a newer one was published and is answered instead.
                return [AttemptReport("superseded", d.id, d.status, d.reason) for d, _, _ in rows]
            pending = [row for row in rows if row[0].status not in TERMINAL_STATUSES]
            if not pending:
                return [AttemptReport("terminal", d.id, d.status, d.reason) for d, _, _ in rows]
            busy = [report for d, _, _ in pending if (report := _busy(d, now)) is not None]
            if busy:  # never a part of a group: its members go together, under one key
                return busy
            batches, exhausted = await self._start(session, pending, via=via, lease=self.lease, now=now)
            return batches[0] if batches else exhausted

    async def _start(
        self,
        session: AsyncSession,
        rows: Sequence[DeliveryContext],
        *,
        via: str,
        lease: dt.timedelta,
        now: dt.datetime,
    ) -> tuple[list[Batch], list[AttemptReport]]:
        """Move locked rows to ``sending``, each batch under a token of its own, and open an attempt row for each;
        fail the ones whose retry budget is spent. Returns the batches and the reports of the failed ones."""
        spent = [row for row in rows if self._budget_spent(row[0])]
        exhausted = [await self.exhaust(session, row, now=now, note=_SPENT) for row in spent]
        claimable = [row for row in rows if not self._budget_spent(row[0])]
        abandoned = [delivery.id for delivery, _, _ in claimable if delivery.status == DeliveryStatus.sending]
        await deliveries.close_interrupted_attempts(session, delivery_ids=abandoned, now=now)
        claimed_until = now + lease
        digest_counts = await deliveries.digest_counts(session, heads=[d for d, _, _ in claimable if d.digest_key])
        units: dict[uuid.UUID, Batch] = {}
        moves: list[Move] = []
        attempts: list[dict[str, object]] = []
        for delivery, event, user in claimable:
            unit = delivery.send_group or delivery.id
            batch = units.setdefault(unit, Batch([], uuid.uuid4(), via))
            moves.append(state.claim(delivery, token=batch.token, claimed_until=claimed_until, via=via, now=now))
            batch.claims.append(Claim(delivery, event, user, delivery.attempts, digest_counts.get(delivery.id, 0)))
            attempts.append(
                {
                    "id": uuid.uuid4(),
                    "delivery_id": delivery.id,
                    "number": delivery.attempts,
                    "started_at": now,
                    "via": via,
                    "send_group": delivery.send_group,
                }
            )
        await self._states.record(session, moves, now=now)
        await deliveries.insert_attempts(session, rows=attempts)
        return list(units.values()), exhausted

    def _budget_spent(self, delivery: Delivery) -> bool:
        return delivery.attempts - delivery.retry_base >= 1 + self._settings.max_retries

    async def _prepare_and_send(self, batch: Batch) -> list[SendResult]:
        """One result per claim: the provider's, or why the member was not sent."""
        group, results = group_message(batch.key, batch.claims, catalog=self._catalog, channels=self._channels)
        if group is None:
            return [result or SendResult.retry("not sent") for result in results]
        channel = self._channels.get(batch.claims[0].delivery.channel)
        assert channel is not None  # checked in group_message
        started = time.perf_counter()
        try:
            # Channels bound their own provider calls; this outer bound only guards against a channel bug.
            timeout = self._settings.provider_timeout_seconds * 3 + 5
            sent = await asyncio.wait_for(channel.send_group(group), timeout)
        except TimeoutError:
            sent = [SendResult.retry("provider call did not finish in time")] * len(group.messages)
        except Exception as exc:  # a channel must classify, but a bug there must not kill the worker
            log.exception("channel %s raised instead of classifying", channel.provider)
            sent = [SendResult.retry(f"channel error: {type(exc).__name__}")] * len(group.messages)
        self._metrics.provider_latency.labels(channel=str(channel.channel), provider=channel.provider).observe(
            time.perf_counter() - started
        )
        answers = iter(sent)
        return [result if result is not None else next(answers) for result in results]

    async def _record_outcomes(self, finished: Sequence[_Finished]) -> list[list[AttemptReport]]:
        """Record the outcomes of batches in one transaction (``GroupCommit`` batches concurrent ones).

        Values go in cut to their columns and without NUL characters (PostgreSQL refuses them in text). If the
        database still refuses a single batch's values, it is stored once more with each member failed, naming
        the error: a delivery whose attempt may have reached the provider is never left to be sent again
        unrecorded. (A lost connection is not that: the claim stays, and is taken over when its lease expires.)
        """
        try:
            return await self._write_outcomes(finished)
        except Exception as exc:
            if len(finished) > 1 or not db.refused_values(exc):
                raise  # a batch: GroupCommit writes each on its own next; anything else: the lease covers it
            [unstorable] = finished
            log.error("the outcome of an attempt could not be stored (%s); storing it as failed", type(exc).__name__)
            note = f"the attempt's outcome could not be stored ({type(exc).__name__}); not sent again"
            failed = SendResult.failed(Reason.retries_exhausted, note)
            return await self._write_outcomes([replace(unstorable, results=[failed] * len(unstorable.results))])

    async def _write_outcomes(self, finished: Sequence[_Finished]) -> list[list[AttemptReport]]:
        now = utcnow()
        async with self._sessions() as session, session.begin():
            locked = await deliveries.lock_many(session, [i for f in finished for i in f.batch.delivery_ids])
            # The attempt rows are recorded even when the claim was lost: they happened. Plain UPDATEs in
            # one executemany, not a SELECT and an ORM flush per row.
            await deliveries.finish_attempts(
                session,
                outcomes=[
                    {
                        "b_delivery_id": claim.delivery.id,
                        "b_number": claim.number,
                        # The attempt's own span, not the claim's queue wait or the group commit's linger:
                        # the dashboard's p95 attempt latency is computed from these two.
                        "started_at": f.started_at,
                        "finished_at": f.started_at + dt.timedelta(seconds=f.elapsed),
                        "outcome": str(result.outcome),
                        "http_status": result.http_status,
                        "provider_message_id": _storable(result.provider_message_id, PROVIDER_ID_LIMIT),
                        "error": _storable(result.detail, ERROR_LIMIT) if result.outcome is not Outcome.sent else None,
                    }
                    for f in finished
                    for claim, result in zip(f.batch.claims, f.results, strict=True)
                ],
            )
            reports: list[list[AttemptReport]] = []
            moves: list[Move] = []
            for f in finished:
                batch_reports = []
                for claim, result in zip(f.batch.claims, f.results, strict=True):
                    self._metrics.attempts.labels(channel=claim.delivery.channel, outcome=str(result.outcome)).inc()
                    delivery = locked.get(claim.delivery.id)
                    if delivery is None or delivery.claim_token != f.batch.token:
                        lost = AttemptReport("lost", claim.delivery.id, detail="the claim was taken over while sending")
                        batch_reports.append(lost)
                        continue
                    storable = replace(
                        result,
                        provider_message_id=_storable(result.provider_message_id, PROVIDER_ID_LIMIT),
                        detail=_storable(result.detail, ERROR_LIMIT) or "",
                    )
                    move, report = await self._settle(session, claim, delivery, storable, f, now=now)
                    moves.append(move)
                    batch_reports.append(report)
                reports.append(batch_reports)
            await self._states.record(session, moves, now=now)
            return reports

    async def _settle(
        self,
        session: AsyncSession,
        claim: Claim,
        delivery: Delivery,
        result: SendResult,
        f: _Finished,
        *,
        now: dt.datetime,
    ) -> tuple[Move, AttemptReport]:
        channel = self._channels.get(delivery.channel)
        move, kind, retry_after = state.settle(
            delivery,
            result,
            now=now,
            max_retries=self._settings.max_retries,
            backoff_scale=self._settings.retry_backoff_scale,
            dedupe_window=channel.dedupe_window if channel is not None else None,
            context={
                "attempt": claim.number,
                "via": f.batch.via,
                "elapsed_ms": round(f.elapsed * 1000, 1),
                "outcome": str(result.outcome),
                "http_status": result.http_status,
                "send_group": str(delivery.send_group) if delivery.send_group else None,
            },
        )
        report = AttemptReport(kind, delivery.id, delivery.status, delivery.reason, retry_after, move.note or "")
        if kind == "failed":
            report.follow_up.extend(await self.fallback(session, delivery, claim.event, now))
        return move, report

    async def fallback(
        self, session: AsyncSession, delivery: Delivery, event: Event, now: dt.datetime
    ) -> list[DispatchItem]:
        """Plan the fallback of a failed ``delivery`` within the caller's transaction; return what to dispatch."""
        return await plan_fallback(
            session,
            states=self._states,
            delivery=delivery,
            event=event,
            catalog=self._catalog,
            live_channels=self._channels.live,
            now=now,
        )

    async def exhaust(
        self, session: AsyncSession, row: DeliveryContext, *, now: dt.datetime, note: str
    ) -> AttemptReport:
        """Fail one locked, pending delivery ``retries_exhausted`` and plan its fallback, within the caller's
        transaction."""
        delivery, event, _ = row
        if delivery.status == DeliveryStatus.sending:
            await deliveries.close_interrupted_attempts(session, delivery_ids=[delivery.id], now=now)
        await self._states.record(session, [state.exhaust(delivery, note=note, now=now)], now=now)
        follow_up = await self.fallback(session, delivery, event, now)
        return AttemptReport("failed", delivery.id, delivery.status, delivery.reason, detail=note, follow_up=follow_up)

    async def release(self, batches: Sequence[Batch], note: str) -> None:
        """Give claims back (status queued, due now); the next attempt reuses the idempotency key.

        Their open attempt rows are closed as ``interrupted``. A claim taken over meanwhile is left to
        its new owner.
        """
        now = utcnow()
        tokens = {delivery_id: batch.token for batch in batches for delivery_id in batch.delivery_ids}
        async with self._sessions() as session, session.begin():
            locked = await deliveries.lock_many(session, list(tokens))
            owned = [delivery for delivery in locked.values() if delivery.claim_token == tokens[delivery.id]]
            await deliveries.close_interrupted_attempts(session, delivery_ids=[d.id for d in owned], now=now)
            await self._states.record(session, [state.release(d, note=note, now=now) for d in owned], now=now)

    async def requeue_failed(self, delivery_id: uuid.UUID, *, note: str = "retried by an operator") -> DispatchItem:
        """Give a failed delivery a fresh retry budget; raise ``NotFound``, or ``Conflict`` unless it is ``failed``.

        It goes alone (it leaves its send group) under its own idempotency key, as a new dispatch generation.
        """
        now = utcnow()
        async with self._sessions() as session, session.begin():
            delivery = (await deliveries.lock_many(session, [delivery_id])).get(delivery_id)
            if delivery is None:
                raise NotFound(f"delivery '{delivery_id}' not found")
            if delivery.status != DeliveryStatus.failed:
                raise Conflict(f"only failed deliveries can be retried; this one is {delivery.status}")
            await self._states.record(session, [state.requeue(delivery, note=note, now=now)], now=now)
            return DispatchItem(delivery.id, None, generation=delivery.dispatch_generation)


_SPENT = "the retry budget was spent before this attempt (the last outcome could not be stored); not sent again"


def _storable(text: str | None, limit: int) -> str | None:
    """``text`` as a column can hold it: no NUL characters, at most ``limit`` characters."""
    return text.replace("\x00", "")[:limit] if text is not None else None


def _busy(delivery: Delivery, now: dt.datetime) -> AttemptReport | None:
    """``busy`` (with the seconds left) while an attempt holds ``delivery``'s lease, else None."""
    if delivery.status != DeliveryStatus.sending or delivery.claimed_until is None:
        return None
    remaining = (delivery.claimed_until - now).total_seconds()
    if remaining <= 0:
        return None
    return AttemptReport("busy", delivery.id, delivery.status, retry_after=math.ceil(remaining))
