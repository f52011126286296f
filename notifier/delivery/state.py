"""Every status change of a delivery, in one place: the rule of each move, its transition row, its log line,
and its count in the ``notifier_deliveries`` metric.

A change is made in two steps. A rule below changes a locked, detached ``Delivery`` object and returns a
``Move`` (from which status, why); ``DeliveryStates.record`` then writes the changed rows, one transition row
and one log line per move, and counts each new status once the transaction has committed (a rolled-back
transaction counts nothing). New deliveries go through ``DeliveryStates.create`` the same way. An attempt's
outcome may be written without a lock (``DeliveryStates.record_unlocked``): settled on a copy of the row as its
claim left it, and written only where the row is still so; a QStash attempt's claim likewise
(``DeliveryStates.claim_unlocked``), made on rows read without a lock and written only if none changed since.
Nothing else writes a delivery's status.

::

    (new) ─▶ queued ─┬─▶ sending ─┬─▶ sent ◀─▶ read (in-app, by its reader)
             deferred ┘    ▲      ├─▶ failed ─▶ queued (operator retry: alone, a new dispatch generation)
    (new) ─▶ suppressed    │      ├─▶ suppressed (no provider, no address)
                           │      └─▶ queued (retry at the backoff; released at shutdown; lease expired and
                           │                  taken over by the QStash sweep: a new dispatch generation)
                           └── taken over when its lease expires (local dispatcher)
    queued / deferred / sending ─▶ failed (retries exhausted: the retry budget spent before a claim, or
                                           QStash giving up once more than NOTIFIER_MAX_RETRIES times)

A send group's members move one by one: each gets its own transition, attempt row and status.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.orm import Session

from notifier.channels.base import Outcome, SendResult
from notifier.db import claiming, deliveries, driver, settling
from notifier.db.models import Delivery
from notifier.delivery.retry import retry_delay
from notifier.metrics import Metrics
from notifier.routing import Decision
from notifier.types import DeliveryStatus, Reason

log = logging.getLogger("notifier.delivery")

NOTE_LIMIT = 500  # delivery_transitions.note
ERROR_LIMIT = 1000  # deliveries.last_error

Settled = Literal["sent", "retry", "failed", "suppressed"]


@dataclass(frozen=True)
class Move:
    """One status change of ``delivery`` (already changed in Python), for ``DeliveryStates.record``.

    ``context`` (attempt, via, elapsed_ms, …) goes into the log line only.
    """

    delivery: Delivery
    from_status: str | None
    note: str | None = None
    context: Mapping[str, object] = field(default_factory=dict)
    # The status and reason this move left, kept apart from ``delivery``, which a later move may change again
    # before both are recorded (sent, then read).
    to_status: str = field(init=False)
    reason: str | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "to_status", self.delivery.status)
        object.__setattr__(self, "reason", self.delivery.reason)


@dataclass(frozen=True)
class NewDelivery:
    """A delivery to create: its row (all columns) and the note of its first transition."""

    row: Mapping[str, Any]
    note: str | None


@dataclass(frozen=True)
class Unlocked:
    """A settled attempt to write without locking its row (``DeliveryStates.record_unlocked``): the ``settle``
    move, made on a copy of the row as its claim left it; the claim's ``token``; and the attempt row's end."""

    move: Move
    token: uuid.UUID
    claimed_at: dt.datetime  # the row's updated_at as the claim left it
    attempt: Mapping[str, object]  # number, started_at, finished_at, outcome, http_status, provider_message_id, error


@dataclass(frozen=True)
class UnlockedClaim:
    """A claim to write without a transaction (``DeliveryStates.claim_unlocked``): the ``claim`` move, made on a
    row read without a lock; the row's ``updated_at`` as read; its attempt row (the columns ``insert_attempts``
    takes)."""

    move: Move
    read_at: dt.datetime
    attempt: Mapping[str, object]


def planned(
    decision: Decision,
    *,
    event_id: uuid.UUID,
    event_type: str,
    now: dt.datetime,
    fallback_of: uuid.UUID | None = None,
    note: str | None = None,
    send_group: uuid.UUID | None = None,
    digest_head: uuid.UUID | None = None,
) -> NewDelivery:
    """The new delivery routing decided on (``decision.creates_delivery`` must be true); its first transition's
    note is ``note``, else routing's explanation. ``digest_head``: the head a ``digested`` decision folds into."""
    assert decision.status is not None
    row = {
        "id": uuid.uuid4(),
        "event_id": event_id,
        "event_type": event_type,
        "user_id": decision.user_id,
        "channel": str(decision.channel),
        "provider": decision.provider,
        "status": str(decision.status),
        "reason": str(decision.reason) if decision.reason else None,
        "not_before": decision.not_before,
        "digest_key": decision.digest_key,
        "digest_head": digest_head,
        "fallback_of": fallback_of,
        "send_group": send_group,
        "created_at": now,
        "updated_at": now,
    }
    return NewDelivery(row, note or decision.explanation)


# The rules. Each changes ``delivery`` and returns the move; none touches the database.


def _clear_claim(delivery: Delivery, now: dt.datetime) -> None:
    delivery.claim_token = None
    delivery.claimed_until = None
    delivery.updated_at = now


def claim(delivery: Delivery, *, token: uuid.UUID, claimed_until: dt.datetime, via: str, now: dt.datetime) -> Move:
    """Lease ``delivery`` to one attempt (``sending`` under ``token``) and count the attempt."""
    from_status = delivery.status
    delivery.status = DeliveryStatus.sending
    delivery.claim_token = token
    delivery.claimed_until = claimed_until
    delivery.attempts += 1
    delivery.updated_at = now
    return Move(
        delivery, from_status, f"attempt {delivery.attempts} via {via}", {"attempt": delivery.attempts, "via": via}
    )


def settle(
    delivery: Delivery,
    result: SendResult,
    *,
    now: dt.datetime,
    max_retries: int,
    backoff_scale: float,
    dedupe_window: dt.timedelta | None,
    context: Mapping[str, object] = {},
) -> tuple[Move, Settled, float | None]:
    """Move a claimed delivery on by its attempt's ``result``; return the move, what it amounted to, and the
    retry delay in seconds (for a retry).

    A retry past the budget (1 + ``max_retries`` attempts since the last operator retry) fails the delivery
    ``retries_exhausted``; a retry within it is queued at the backoff, kept inside ``dedupe_window``.
    """
    from_status = delivery.status
    _clear_claim(delivery, now)
    retry_after: float | None = None
    if result.outcome is Outcome.sent:
        delivery.status, delivery.reason = DeliveryStatus.sent, None
        delivery.sent_at = now
        delivery.provider_message_id = result.provider_message_id
        delivery.last_error = None
        kind: Settled = "sent"
    elif result.outcome is Outcome.failed and result.reason in (Reason.channel_unavailable, Reason.no_address):
        delivery.status, delivery.reason = DeliveryStatus.suppressed, str(result.reason)
        kind = "suppressed"
    elif result.outcome is Outcome.failed:
        delivery.status, delivery.reason = DeliveryStatus.failed, str(result.reason or Reason.rejected)
        delivery.last_error = result.detail[:ERROR_LIMIT]
        kind = "failed"
    elif delivery.attempts - delivery.retry_base >= 1 + max_retries:
        delivery.status, delivery.reason = DeliveryStatus.failed, str(Reason.retries_exhausted)
        delivery.last_error = result.detail[:ERROR_LIMIT]
        kind = "failed"
    else:
        retry_after, kept = retry_delay(
            delivery.attempts - delivery.retry_base,
            scale=backoff_scale,
            retry_after=result.retry_after,
            window=dedupe_window,
            since=delivery.created_at,  # no later than the first attempt, which opened the window
            now=now,
        )
        delivery.status, delivery.reason = DeliveryStatus.queued, None
        delivery.not_before = now + dt.timedelta(seconds=retry_after)
        delivery.last_error = result.detail[:ERROR_LIMIT]
        kind = "retry"
        result = result.noted(kept)  # the transition's note says why the retry comes early
    return Move(delivery, from_status, result.detail or None, context), kind, retry_after


def release(delivery: Delivery, *, note: str, now: dt.datetime, unsent: bool = False) -> Move:
    """Give a claim back: ``queued``, due now; the next attempt reuses the idempotency key.

    ``unsent``: the claim never reached the provider (it waited in a worker's queue), so it was no attempt and
    does not count against the retry budget; a claim released mid-send may have reached it, and counts.
    """
    from_status = delivery.status
    delivery.status = DeliveryStatus.queued
    delivery.not_before = None
    if unsent:
        delivery.retry_base += 1
    _clear_claim(delivery, now)
    return Move(delivery, from_status, note)


def exhaust(delivery: Delivery, *, note: str, now: dt.datetime) -> Move:
    """Fail a pending delivery ``retries_exhausted`` (QStash gave up on it)."""
    from_status = delivery.status
    delivery.status, delivery.reason = DeliveryStatus.failed, str(Reason.retries_exhausted)
    delivery.last_error = note[:ERROR_LIMIT]
    _clear_claim(delivery, now)
    return Move(delivery, from_status, note)


def requeue(delivery: Delivery, *, note: str, now: dt.datetime) -> Move:
    """Queue a ``failed`` delivery again with a fresh retry budget (an operator's retry).

    It leaves its send group and goes alone, under its own idempotency key, as a new dispatch generation.
    """
    from_status = delivery.status
    delivery.status, delivery.reason = DeliveryStatus.queued, None
    delivery.not_before = None
    delivery.retry_base = delivery.attempts
    delivery.gave_up_count = 0
    delivery.send_group = None
    redispatch(delivery)
    delivery.updated_at = now
    return Move(delivery, from_status, note, {"via": "operator"})


def reclaim(delivery: Delivery, *, note: str, now: dt.datetime) -> Move:
    """Take over a ``sending`` delivery whose lease expired: ``queued`` again, due now, as a new dispatch
    generation (the attempt that held it is presumed dead, and its QStash message may be spent)."""
    from_status = delivery.status
    delivery.status = DeliveryStatus.queued
    delivery.not_before = None
    _clear_claim(delivery, now)
    redispatch(delivery)
    return Move(delivery, from_status, note)


def redispatch(delivery: Delivery) -> None:
    """Start a new dispatch generation: the next QStash message for the delivery is not a duplicate of the last.

    Not a status change; the caller records the move (or the row) it is part of.
    """
    delivery.dispatch_generation += 1
    delivery.gave_up_generation = None


def mark_read(delivery: Delivery, *, read: bool, now: dt.datetime, note: str | None = None) -> Move | None:
    """Keep an in-app delivery in step with its inbox message: ``sent`` → ``read`` (or back); None if not in step."""
    source, target = (DeliveryStatus.sent, DeliveryStatus.read) if read else (DeliveryStatus.read, DeliveryStatus.sent)
    if delivery.status != source:
        return None
    delivery.status = target
    delivery.updated_at = now
    return Move(delivery, source, note or ("inbox item read" if read else "inbox item marked unread"))


def read_while_sending(delivery: Delivery, *, now: dt.datetime) -> bool:
    """Mark an in-app delivery whose inbox message was read while its attempt is out (``sending``); return whether
    it was marked. Not a move: its ``updated_at`` changes, so the attempt's outcome, written without a lock
    (``DeliveryStates.record_unlocked``), finds the row changed and is recorded from the locked row, which sees
    the read (``sent``, then ``read``)."""
    if delivery.status != DeliveryStatus.sending:
        return False
    delivery.updated_at = now
    return True


# The writer.

_PENDING_COUNTS = "notifier.delivery_status_counts"
# The settled columns read from the moved row itself: its status and reason are the move's (``Move.to_status``).
_SETTLED_ELSE = tuple(name for name in settling.SETTLED_COLUMNS if name not in ("status", "reason"))


def _count_committed(session: Session | driver.Lent) -> None:
    for metrics, channel, status, reason in session.info.pop(_PENDING_COUNTS, ()):
        metrics.delivery_status(channel, status, reason)


def _forget_counts(session: Session) -> None:
    session.info.pop(_PENDING_COUNTS, None)


class DeliveryStates:
    """Writes deliveries' status changes (``create``, ``record``) with their transition rows, log lines and metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # Counted after the commit, so a rolled-back transaction (a failed group commit that is then written
        # item by item) counts nothing twice. One listener for every session, registered once.
        if not sa.event.contains(Session, "after_commit", _count_committed):
            sa.event.listen(Session, "after_commit", _count_committed)
            sa.event.listen(Session, "after_rollback", _forget_counts)

    async def create(self, session: driver.Target, new: Sequence[NewDelivery], *, now: dt.datetime) -> None:
        """Insert new deliveries (rows with the same keys) and their first transitions: one statement on
        PostgreSQL (the transitions' foreign keys are checked at its end, when the deliveries are in)."""
        async with driver.together(session):
            await deliveries.insert(session, rows=[item.row for item in new])
            await self._transitions(session, [(item.row, None, item.note, {}) for item in new], now=now)

    async def create_unless_planned(self, session: driver.Target, new: NewDelivery, *, now: dt.datetime) -> bool:
        """Insert one delivery unless its (event, user, channel) exists; return whether it was created."""
        if not await deliveries.insert_unless_planned(session, row=new.row):
            return False
        await self._transitions(session, [(new.row, None, new.note, {})], now=now)
        return True

    async def record(self, session: driver.Target, moves: Sequence[Move], *, now: dt.datetime) -> None:
        """Write the moved deliveries and one transition row per move (a delivery moved twice is written once)."""
        await deliveries.write(session, list({id(move.delivery): move.delivery for move in moves}.values()))
        await self._transitions(
            session,
            [(_columns(m), m.from_status, m.note, m.context) for m in moves],
            now=now,
        )

    async def record_unlocked(
        self, connection: driver.Lent, outcomes: Sequence[Unlocked], *, now: dt.datetime
    ) -> list[bool]:
        """Write settled attempts with their attempt rows' ends and transitions, each only if its row is still as
        its claim left it, in one statement committed by itself (``notifier.db.settling``). Returns, per outcome,
        whether it was written; one written is logged and counted, one not is left as it was for the caller to
        record from the locked row."""
        rows = [
            {
                "position": position,
                "token": outcome.token,
                "claimed_at": outcome.claimed_at,
                **{name: getattr(outcome.move.delivery, name) for name in _SETTLED_ELSE},
                "status": outcome.move.to_status,
                "reason": outcome.move.reason,
                "id": outcome.move.delivery.id,
                **{f"attempt_{name}": value for name, value in outcome.attempt.items()},
                "transition_id": uuid.uuid4(),
                "transition_from_status": outcome.move.from_status,
                "transition_note": outcome.move.note[:NOTE_LIMIT] if outcome.move.note else None,
                "transition_at": now,
            }
            for position, outcome in enumerate(outcomes)
        ]
        written = await settling.settle(connection, rows)
        self._committed([outcome.move for position, outcome in enumerate(outcomes) if position in written])
        return [position in written for position in range(len(outcomes))]

    async def claim_unlocked(
        self,
        connection: driver.Lent,
        claims: Sequence[UnlockedClaim],
        revocation: Mapping[str, Any],
        *,
        now: dt.datetime,
    ) -> claiming.Spent:
        """Spend the credential ``revocation`` names and, on its first use, write ``claims`` with their attempt
        rows and transitions if every row is still as read, in one statement committed by itself
        (``notifier.db.claiming``). The claims written are logged and counted."""
        rows = [
            {
                "id": claim.move.delivery.id,
                "read_at": claim.read_at,
                "generation": claim.move.delivery.dispatch_generation,
                **{name: getattr(claim.move.delivery, name) for name in claiming.CLAIMED_COLUMNS},
                "transition_id": uuid.uuid4(),
                "transition_from_status": claim.move.from_status,
                "transition_reason": claim.move.reason,
                "transition_note": claim.move.note[:NOTE_LIMIT] if claim.move.note else None,
                "transition_at": now,
                **{f"attempt_{name}": value for name, value in claim.attempt.items() if name != "delivery_id"},
            }
            for claim in claims
        ]
        spent = await claiming.claim(connection, revocation, rows)
        if spent.claimed:
            self._committed([claim.move for claim in claims])
        return spent

    def _committed(self, moves: Sequence[Move]) -> None:
        """Log and count ``moves`` written by a statement that committed by itself."""
        for move in moves:
            _log(_columns(move), move.from_status, move.context)
            self._metrics.delivery_status(move.delivery.channel, move.to_status, move.reason)

    async def _transitions(
        self,
        session: driver.Target,
        changes: Sequence[tuple[Mapping[str, Any], str | None, str | None, Mapping[str, object]]],
        *,
        now: dt.datetime,
    ) -> None:
        rows = []
        if isinstance(session, driver.Lent) and _PENDING_COUNTS not in session.info:
            driver.after_commit(session, functools.partial(_count_committed, session))
        counts = session.info.setdefault(_PENDING_COUNTS, [])
        earlier: dict[uuid.UUID, int] = {}  # moves of one delivery in this call so far
        for delivery, from_status, note, context in changes:
            # A delivery moved twice at once (sent, then read) gets its transitions a microsecond apart: the
            # history is ordered by time.
            step = earlier[delivery["id"]] = earlier.get(delivery["id"], -1) + 1
            status, reason, channel = delivery["status"], delivery.get("reason"), delivery["channel"]
            _log(delivery, from_status, context)
            rows.append(
                {
                    "id": uuid.uuid4(),
                    "delivery_id": delivery["id"],
                    "from_status": from_status,
                    "to_status": status,
                    "reason": reason,
                    "note": note[:NOTE_LIMIT] if note else None,
                    "at": now + dt.timedelta(microseconds=step) if step else now,
                }
            )
            counts.append((self._metrics, channel, status, reason))
        await deliveries.insert_transitions(session, rows=rows)


def _log(delivery: Mapping[str, Any], from_status: str | None, context: Mapping[str, object]) -> None:
    """The log line of a delivery's move to the status in ``delivery`` (``_columns``, or a new row)."""
    log.info(
        "delivery %s -> %s",
        from_status or "new",
        delivery["status"],
        extra={
            "delivery_id": str(delivery["id"]),
            "event_id": str(delivery["event_id"]),
            "channel": delivery["channel"],
            "from_status": from_status,
            "to_status": delivery["status"],
            "reason": delivery.get("reason"),
            **context,
        },
    )


def _columns(move: Move) -> Mapping[str, Any]:
    delivery = move.delivery
    return {
        "id": delivery.id,
        "event_id": delivery.event_id,
        "channel": delivery.channel,
        "status": move.to_status,
        "reason": move.reason,
    }
