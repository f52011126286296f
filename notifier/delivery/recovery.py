"""QStash mode's recovery: what to do when QStash gives up on a message, and the sweep that re-dispatches what
QStash will not call back for. Both decide from the rows' state, never from timing guesses.

A delivery (or a send group, whose members move together) is published to QStash under the deduplication id
``{id}.{dispatch generation}``. The same generation is published again for the *same intent* -- a producer's
retry, the sweep re-publishing a row whose publish may have been lost -- so QStash drops true duplicates. A
*new intent* starts a new generation, in the transaction that changes the row:

- an operator's retry of a failed delivery (``state.requeue``; it also leaves its send group);
- the sweep taking over a ``sending`` row whose lease expired (``state.reclaim``: the attempt that held it is
  presumed dead, and the message QStash was delivering may be spent);
- the sweep re-dispatching a row whose message QStash gave up on (``gave_up_generation`` equals the row's
  generation: QStash's failure callback was recorded, not acted on).

QStash gives up on a message when its retries are spent, and it spends them on calls that never became an
attempt as readily as on attempts: a restarting service refusing connections, a lease held by an attempt
(503), a database outage. So its giving up does not fail a delivery while the delivery's own budget (1 +
NOTIFIER_MAX_RETRIES attempts, counted in the database) lasts: it is recorded, and the sweep re-dispatches
the delivery as a new generation -- at most NOTIFIER_MAX_RETRIES times (``gave_up_count``); QStash giving up
once more than that fails it ``retries_exhausted``, its fallback planned. A delivery that an attempt is
sending is never failed from under it.

Nothing else moves a pending row's ``not_before`` in QStash mode: a retry is QStash redelivering the same
message after our ``Retry-After``. The provider sees one idempotency key per delivery (or group) whatever the
generation, so a new generation never doubles an effect.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from notifier.db import deliveries
from notifier.db.models import Delivery
from notifier.delivery import state
from notifier.delivery.outcomes import AttemptReport
from notifier.delivery.runner import DeliveryRunner
from notifier.delivery.state import DeliveryStates, Move
from notifier.types import (
    DISPATCHABLE_STATUSES,
    TERMINAL_STATUSES,
    DeliveryStatus,
    DispatchItem,
    dispatch_units,
    utcnow,
)


@dataclass(frozen=True)
class Swept:
    """What one sweep found stuck (by status, before it changed them) and what it hands to the dispatcher."""

    found: dict[str, int]
    dispatch: list[DispatchItem]


class QStashRecovery:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        states: DeliveryStates,
        runner: DeliveryRunner,
        max_retries: int,
    ) -> None:
        self._sessions = sessions
        self._states = states
        self._runner = runner
        self._max_retries = max_retries

    async def gave_up(
        self,
        *,
        delivery_id: uuid.UUID | None,
        send_group: uuid.UUID | None,
        generation: int | None,
        note: str,
    ) -> list[AttemptReport]:
        """QStash's failure callback for a delivery's (or a group's) message of ``generation``.

        QStash's giving up is recorded on each pending member (``noted``): the sweep re-dispatches it as a new
        generation once no attempt holds it. A pending member QStash has already given up on
        NOTIFIER_MAX_RETRIES times, and that no attempt holds, is failed ``retries_exhausted`` instead (its
        fallback planned). A message of an earlier generation, or a terminal member, changes nothing.
        """
        async with self._sessions() as session, session.begin():
            rows = await deliveries.lock_unit(session, delivery_id=delivery_id, send_group=send_group)
            now = utcnow()  # once the rows are locked: after every transition of theirs committed before
            reports: list[AttemptReport] = []
            noted: list[Delivery] = []
            for row in rows:
                delivery = row[0]
                if generation is not None and delivery.dispatch_generation > generation:
                    reports.append(AttemptReport("superseded", delivery.id, delivery.status, delivery.reason))
                elif delivery.status in TERMINAL_STATUSES:
                    reports.append(AttemptReport("terminal", delivery.id, delivery.status, delivery.reason))
                elif delivery.gave_up_count >= self._max_retries and delivery.status != DeliveryStatus.sending:
                    reports.append(await self._runner.exhaust(session, row, now=now, note=note))
                else:
                    delivery.gave_up_generation = delivery.dispatch_generation
                    delivery.gave_up_count += 1
                    noted.append(delivery)
                    reports.append(AttemptReport("noted", delivery.id, delivery.status, detail=note))
            await deliveries.write(session, noted)
            return reports or [AttemptReport("missing", delivery_id or send_group or uuid.UUID(int=0))]

    async def sweep(self, *, grace: dt.timedelta, limit: int) -> Swept:
        """Re-dispatch up to ``limit`` deliveries stuck past due for ``grace`` (with the rest of their groups):
        pending rows QStash may never have got, ``sending`` rows whose lease expired (taken over), rows whose
        message QStash gave up on. Changes and hands over in one transaction; the caller dispatches."""
        now = utcnow()
        async with self._sessions() as session, session.begin():
            stuck = await deliveries.find_stuck(session, now=now, grace=grace, limit=limit)
            found = {
                status: sum(1 for s in stuck if s.status == status) for status in ("queued", "deferred", "sending")
            }
            ids = [s.id for s in stuck]
            groups = {s.send_group for s in stuck if s.send_group is not None}
            ids += await deliveries.pending_members(session, send_groups=groups)
            locked = await deliveries.lock_many(session, ids)
            now = utcnow()  # once the rows are locked (a lease may have ended, or been taken, meanwhile)
            moves: list[Move] = []
            units: dict[uuid.UUID, list[Delivery]] = {}
            for delivery in locked.values():
                if delivery.status in TERMINAL_STATUSES:
                    continue
                if delivery.status == DeliveryStatus.sending:
                    if delivery.claimed_until is not None and delivery.claimed_until >= now:
                        continue  # an attempt took it meanwhile
                    note = "lease expired: taken over by the sweep and dispatched again"
                    moves.append(state.reclaim(delivery, note=note, now=now))
                units.setdefault(delivery.send_group or delivery.id, []).append(delivery)
            await deliveries.close_interrupted_attempts(session, delivery_ids=[m.delivery.id for m in moves], now=now)
            regenerated = [d for members in units.values() for d in _new_generation(members)]
            await self._states.record(session, moves, now=now)
            moved = {m.delivery.id for m in moves}
            await deliveries.write(session, [d for d in regenerated if d.id not in moved])
            dispatch = dispatch_units(
                (d.id, d.not_before, d.send_group, d.dispatch_generation)
                for members in units.values()
                for d in members
                if d.status in DISPATCHABLE_STATUSES
            )
            return Swept(found, dispatch)


def _new_generation(members: Sequence[Delivery]) -> list[Delivery]:
    """Give a unit (a delivery, or a group's pending members) one generation for its next message: a new one
    when any member's was taken over (``reclaim`` already started it) or given up on by QStash. Returns the
    members whose generation changed here."""
    newest = max(member.dispatch_generation for member in members)
    spent = any(member.gave_up_generation == member.dispatch_generation for member in members)
    target = newest + 1 if spent else newest
    changed = [member for member in members if member.dispatch_generation != target]
    for member in changed:
        member.dispatch_generation = target
        member.gave_up_generation = None
    return changed
