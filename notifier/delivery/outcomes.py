"""Recording attempts' outcomes: one statement, or one transaction, for the outcomes of every batch finished
meanwhile.

``OutcomeRecorder.submit`` queues a finished batch; ``GroupCommit`` writes everything queued together (on a small
machine the cost of a delivery is mostly its round trips to the database). Each member gets its attempt row closed,
its own status and transition (``notifier.delivery.state``), and its fallback planned when it failed for good.

On PostgreSQL the outcomes are first written without locking their rows (``DeliveryStates.record_unlocked``): one
statement, committed by itself, settles every member whose row is still as its claim left it. The rest -- a member
that failed for good (its fallback is planned from the locked row), a row changed since its claim (taken over,
given up on by QStash and claimed again, read by its reader while the attempt was out) -- are recorded in one
transaction from the locked rows, as on SQLite, where every outcome is. There a member whose claim was taken over
while it was sent is reported ``lost`` and left to its new owner (its attempt row is still closed: the attempt
happened). The writes are shielded from cancellation, so a shutdown never leaves a row half-recorded.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from notifier import db
from notifier.batching import GroupCommit
from notifier.channels.base import Outcome, SendResult
from notifier.channels.registry import ChannelRegistry
from notifier.config import Settings
from notifier.db import deliveries, driver, inbox
from notifier.db.models import Delivery, Event
from notifier.delivery import state
from notifier.delivery.messages import Batch, Claim
from notifier.delivery.state import DeliveryStates, Move, Settled, Unlocked
from notifier.metrics import Metrics
from notifier.types import ChannelName, DispatchItem, Reason, utcnow

log = logging.getLogger("notifier.delivery")

ReportKind = Literal[
    "sent", "retry", "failed", "suppressed", "terminal", "busy", "missing", "lost", "superseded", "noted"
]
PROVIDER_ID_LIMIT = 200  # deliveries.provider_message_id, delivery_attempts.provider_message_id
ERROR_LIMIT = 1000  # delivery_attempts.error

Fallback = Callable[[AsyncSession, Delivery, Event, dt.datetime], Awaitable[list[DispatchItem]]]
"""Plans the fallback of a failed delivery within the caller's transaction; returns what to dispatch."""


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


@dataclass(frozen=True)
class Finished:
    """A batch sent: one result per claim, in order."""

    batch: Batch
    results: list[SendResult]
    started_at: dt.datetime  # when the worker began the attempt (the claim may have waited in a queue)
    elapsed: float
    # The reports of members already recorded without a lock by an earlier write of this batch: a group commit
    # that fails after that write is written again item by item, and those members must not be recorded twice.
    settled: dict[uuid.UUID, AttemptReport] = field(default_factory=dict)


class OutcomeRecorder:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        channels: ChannelRegistry,
        settings: Settings,
        metrics: Metrics,
        states: DeliveryStates,
        fallback: Fallback,
    ) -> None:
        self._sessions = sessions
        self._channels = channels
        self._settings = settings
        self._metrics = metrics
        self._states = states
        self._fallback = fallback
        # A 2 ms linger lets the outcomes of concurrent workers share one transaction; tuned in bench/.
        self._commit = GroupCommit(self._record, max_batch=max(16, settings.workers), linger=0.002)

    async def submit(self, finished: Finished) -> list[AttemptReport]:
        """Record ``finished`` (in one transaction with other workers' outcomes); one report per claim."""
        return await self._commit.submit(finished)

    async def _record(self, finished: Sequence[Finished]) -> list[list[AttemptReport]]:
        """Record the outcomes of batches in one transaction (``GroupCommit`` batches concurrent ones).

        Values go in cut to their columns and without NUL characters (PostgreSQL refuses them in text). If the
        database still refuses a single batch's values, it is stored once more with each member failed, naming
        the error: a delivery whose attempt may have reached the provider is never left to be sent again
        unrecorded. (A lost connection is not that: the claim stays, and is taken over when its lease expires.)
        """
        try:
            return await self._write(finished)
        except Exception as exc:
            if len(finished) > 1 or not db.refused_values(exc):
                raise  # a batch: GroupCommit writes each on its own next; anything else: the lease covers it
            [unstorable] = finished
            log.error("the outcome of an attempt could not be stored (%s); storing it as failed", type(exc).__name__)
            note = f"the attempt's outcome could not be stored ({type(exc).__name__}); not sent again"
            failed = SendResult.failed(Reason.retries_exhausted, note)
            return await self._write([replace(unstorable, results=[failed] * len(unstorable.results))])

    async def _write(self, finished: Sequence[Finished]) -> list[list[AttemptReport]]:
        async with driver.alone(self._sessions) as connection:
            if connection is not None:  # PostgreSQL
                await self._write_unlocked(connection, finished)
        parts = [(f, part) for f in finished if (part := _unsettled(f)) is not None]
        recorded: dict[int, dict[uuid.UUID, AttemptReport]] = {}
        if parts:
            locked_reports = await self._write_locked([part for _, part in parts])
            for (f, part), part_reports in zip(parts, locked_reports, strict=True):
                recorded[id(f)] = {
                    claim.delivery.id: r for claim, r in zip(part.batch.claims, part_reports, strict=True)
                }
        reports = [
            [f.settled.get(claim.delivery.id) or recorded[id(f)][claim.delivery.id] for claim in f.batch.claims]
            for f in finished
        ]
        # Counted once everything is committed: a group commit that fails is written again item by item
        # (``_record``), and an attempt must not be counted by both writes.
        for f in finished:
            for claim, result in zip(f.batch.claims, f.results, strict=True):
                self._metrics.attempts.labels(channel=claim.delivery.channel, outcome=str(result.outcome)).inc()
        return reports

    async def _write_unlocked(self, connection: driver.Lent, finished: Sequence[Finished]) -> None:
        """Settle every member that did not fail for good on a copy of its row as its claim left it, and write them
        all in one statement that skips the rows changed since (``DeliveryStates.record_unlocked``); put the
        reports of those written in their batch's ``settled``."""
        now = utcnow()
        outcomes: list[Unlocked] = []
        reports: list[tuple[Finished, AttemptReport]] = []
        for f in finished:
            for claim, result in zip(f.batch.claims, f.results, strict=True):
                if claim.delivery.id in f.settled:
                    continue
                claimed, kept = deliveries.copy(claim.delivery), _storable(result)
                move, kind, retry_after = self._rule(claim, claimed, kept, f, now=now)
                if kind == "failed":  # its fallback is planned in the transaction, from the locked row
                    continue
                end = {"number": claim.number, **_attempt_end(kept, f)}
                outcomes.append(Unlocked(move, f.batch.token, claim.delivery.updated_at, end))
                report = AttemptReport(kind, claimed.id, claimed.status, claimed.reason, retry_after, move.note or "")
                reports.append((f, report))
        if not outcomes:
            return
        written = await self._states.record_unlocked(connection, outcomes, now=now)
        for (f, report), done in zip(reports, written, strict=True):
            if done:
                f.settled[report.delivery_id] = report

    async def _write_locked(self, finished: Sequence[Finished]) -> list[list[AttemptReport]]:
        async with self._sessions() as session, session.begin():
            locked = await deliveries.lock_many(session, [i for f in finished for i in f.batch.delivery_ids])
            now = utcnow()  # once the rows are locked: after every transition of theirs committed before
            reports: list[list[AttemptReport]] = []
            moves: list[Move] = []
            delivered_in_app: list[Delivery] = []
            for f in finished:
                batch_reports = []
                for claim, result in zip(f.batch.claims, f.results, strict=True):
                    delivery = locked.get(claim.delivery.id)
                    if delivery is None or delivery.claim_token != f.batch.token:
                        lost = AttemptReport("lost", claim.delivery.id, detail="the claim was taken over while sending")
                        batch_reports.append(lost)
                        continue
                    move, report = await self._settle(session, claim, delivery, _storable(result), f, now=now)
                    moves.append(move)
                    batch_reports.append(report)
                    if report.kind == "sent" and delivery.channel == ChannelName.in_app:
                        delivered_in_app.append(delivery)
                reports.append(batch_reports)
            moves += await _read_meanwhile(session, delivered_in_app, now=now)
            async with driver.together(session):  # attempt, delivery and transition rows: one statement
                # The attempt rows are recorded even when the claim was lost: they happened. Plain UPDATEs in
                # one statement, not a SELECT and an ORM flush per row.
                await deliveries.finish_attempts(session, outcomes=_attempt_outcomes(finished))
                await self._states.record(session, moves, now=now)
        return reports

    def _rule(
        self, claim: Claim, delivery: Delivery, result: SendResult, f: Finished, *, now: dt.datetime
    ) -> tuple[Move, Settled, float | None]:
        """``state.settle`` of ``delivery`` (claimed by ``claim``) by ``result``, with this attempt's log context."""
        channel = self._channels.get(delivery.channel)
        return state.settle(
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

    async def _settle(
        self,
        session: AsyncSession,
        claim: Claim,
        delivery: Delivery,
        result: SendResult,
        f: Finished,
        *,
        now: dt.datetime,
    ) -> tuple[Move, AttemptReport]:
        move, kind, retry_after = self._rule(claim, delivery, result, f, now=now)
        report = AttemptReport(kind, delivery.id, delivery.status, delivery.reason, retry_after, move.note or "")
        if kind == "failed":
            report.follow_up.extend(await self._fallback(session, delivery, claim.event, now))
        return move, report


def _unsettled(f: Finished) -> Finished | None:
    """``f`` without its members already recorded (``settled``); None when none is left."""
    if not f.settled:
        return f
    left = [(c, r) for c, r in zip(f.batch.claims, f.results, strict=True) if c.delivery.id not in f.settled]
    if not left:
        return None
    return replace(f, batch=replace(f.batch, claims=[c for c, _ in left]), results=[r for _, r in left])


def _storable(result: SendResult) -> SendResult:
    """``result`` with its provider id and detail as the delivery's columns can hold them."""
    return replace(
        result,
        provider_message_id=storable(result.provider_message_id, PROVIDER_ID_LIMIT),
        detail=storable(result.detail, ERROR_LIMIT) or "",
    )


async def _read_meanwhile(session: AsyncSession, delivered: Sequence[Delivery], *, now: dt.datetime) -> list[Move]:
    """``read`` moves for in-app deliveries just recorded ``sent`` whose inbox message was read before that.

    The in-app channel stores the message (in its own commit) before it announces it and before the outcome is
    written, so a reader may open it while its delivery is still ``sending``, or ``queued`` for a retry when the
    announcement failed; reading it then moves nothing. A statement of its own, after the rows are locked: every
    reader that locked a delivery before has committed by then, and any later one finds it ``sent``.
    """
    read = await inbox.read_among(session, delivery_ids=[delivery.id for delivery in delivered])
    note = "inbox item read before its delivery was recorded sent"
    return [
        move
        for delivery in delivered
        if delivery.id in read and (move := state.mark_read(delivery, read=True, now=now, note=note)) is not None
    ]


def _attempt_outcomes(finished: Sequence[Finished]) -> list[dict[str, object]]:
    """The finished attempt rows' columns (``deliveries.finish_attempts``), one per claim of each batch."""
    return [
        {"b_delivery_id": claim.delivery.id, "b_number": claim.number, **_attempt_end(_storable(result), f)}
        for f in finished
        for claim, result in zip(f.batch.claims, f.results, strict=True)
    ]


def _attempt_end(kept: SendResult, f: Finished) -> dict[str, object]:
    """How an attempt row ends (``deliveries.FINISHED_COLUMNS``), by a result already cut to its columns
    (``_storable``)."""
    return {
        # The attempt's own span, not the claim's queue wait or the group commit's linger: the dashboard's p95
        # attempt latency is computed from these two.
        "started_at": f.started_at,
        "finished_at": f.started_at + dt.timedelta(seconds=f.elapsed),
        "outcome": str(kept.outcome),
        "http_status": kept.http_status,
        "provider_message_id": kept.provider_message_id,
        "error": kept.detail if kept.outcome is not Outcome.sent else None,
    }


def storable(text: str | None, limit: int) -> str | None:
    """``text`` as a column can hold it: no NUL characters, at most ``limit`` characters."""
    return text.replace("\x00", "")[:limit] if text is not None else None
