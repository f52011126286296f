"""Claim and write queries on deliveries, their attempt rows and their transition rows. None of them commits.
(Read-only listings, history and backlog: ``notifier.db.delivery_reads``.)

Batch-shaped on purpose: a claim or a group of outcomes is one statement per table, not an ORM flush per
object (the unit of work cost more CPU than the statements; measured in bench/). On PostgreSQL the batch
writes are one statement over arrays sent on the driver (``notifier.db.bulk``), on SQLite an executemany.
What a status change *means* is decided in ``notifier.delivery.state``; this module only reads and writes the rows.
"""

from __future__ import annotations

import datetime as dt
import operator
import uuid
from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from notifier.db import bulk, driver
from notifier.db.loading import Loader
from notifier.db.models import (
    ATTEMPTS,
    DELIVERIES,
    EVENTS,
    TRANSITIONS,
    USERS,
    Delivery,
    Event,
    User,
)
from notifier.db.sql import every_column, with_defaults
from notifier.types import DISPATCHABLE_STATUSES, PENDING_STATUSES, DeliveryStatus

# What a status change may alter on a delivery row; ``write`` sets all of them from the row's object.
MUTABLE_COLUMNS = (
    "status",
    "reason",
    "not_before",
    "claim_token",
    "claimed_until",
    "attempts",
    "retry_base",
    "provider_message_id",
    "last_error",
    "updated_at",
    "sent_at",
    "send_group",
    "dispatch_generation",
    "gave_up_generation",
    "gave_up_count",
)
_WRITE = (
    sa.update(DELIVERIES)
    .where(DELIVERIES.c.id == sa.bindparam("b_id"))
    .values({name: sa.bindparam(name) for name in MUTABLE_COLUMNS})
)
_WRITE_KEYS = ("b_id", *MUTABLE_COLUMNS)
_WRITTEN = operator.itemgetter("id", *MUTABLE_COLUMNS)
_WRITTEN_ATTRIBUTES = operator.attrgetter("id", *MUTABLE_COLUMNS)
FINISHED_COLUMNS = ("started_at", "finished_at", "outcome", "http_status", "provider_message_id", "error")
_FINISH_ATTEMPT = (
    sa.update(ATTEMPTS)
    .where(ATTEMPTS.c.delivery_id == sa.bindparam("b_delivery_id"), ATTEMPTS.c.number == sa.bindparam("b_number"))
    .values({name: sa.bindparam(name) for name in FINISHED_COLUMNS})
)
# Built once: building a statement took about as much CPU as running it, and ingest runs these per event.
_INSERT = {table: sa.insert(table) for table in (DELIVERIES, TRANSITIONS, ATTEMPTS)}
# The same writes as one statement over arrays, on PostgreSQL (``bulk.pays_off``).
_PG_WRITE = bulk.ArrayUpdate(DELIVERIES, keys=["id"], columns=MUTABLE_COLUMNS)
_PG_FINISH_ATTEMPT = bulk.ArrayUpdate(ATTEMPTS, keys=["delivery_id", "number"], columns=FINISHED_COLUMNS)
_FINISHED = operator.itemgetter("b_delivery_id", "b_number", *FINISHED_COLUMNS)
_PG_INSERT = {table: bulk.ArrayInsert(table) for table in _INSERT}


def transitions_from(v: sa.CTE, *, reason: sa.ColumnElement[Any], where: sa.ColumnElement[bool]) -> sa.CTE:
    """A ``WITH`` part inserting one transition per row of ``v`` (a part giving ``id``, ``status`` and the
    ``transition_id``, ``transition_from_status``, ``transition_note``, ``transition_at`` of each delivery) where
    ``where`` holds, with ``reason`` as the transition's reason; for the statements that write a delivery's move
    without a transaction block (``notifier.db.settling``, ``notifier.db.claiming``)."""
    moved = sa.select(
        v.c.transition_id,
        v.c.id,
        v.c.transition_from_status,
        v.c.status,
        reason,
        v.c.transition_note,
        v.c.transition_at,
    )
    columns = ["id", "delivery_id", "from_status", "to_status", "reason", "note", "at"]
    return sa.insert(TRANSITIONS).from_select(columns, moved.where(where)).cte("logged")


class StuckDelivery(NamedTuple):
    """A delivery the sweep re-dispatches."""

    id: uuid.UUID
    status: str
    send_group: uuid.UUID | None = None


def due_condition(now: dt.datetime, *, grace: dt.timedelta = dt.timedelta(0)) -> sa.ColumnElement[bool]:
    """Rows that should be attempted now: the one definition of "due".

    Pending (queued or deferred), unclaimed, and due for at least ``grace`` (``not_before``, else the last
    change); or ``sending`` with an expired lease (the attempt that held it is presumed dead). Workers claim
    with no grace; the QStash sweep uses one, so it does not double rows being published right now or rows
    QStash is about to deliver at their ``not_before``.
    """
    due_since = sa.func.coalesce(col(Delivery.not_before), col(Delivery.updated_at))
    pending = sa.and_(
        col(Delivery.status).in_(sorted(DISPATCHABLE_STATUSES)),
        (due_since <= now - grace)
        if grace
        else sa.or_(col(Delivery.not_before).is_(None), col(Delivery.not_before) <= now),
        sa.or_(col(Delivery.claimed_until).is_(None), col(Delivery.claimed_until) < now),
    )
    abandoned = sa.and_(col(Delivery.status) == DeliveryStatus.sending, col(Delivery.claimed_until) < now)
    return sa.or_(pending, abandoned)


_DELIVERY, _EVENT, _USER = Loader(Delivery), Loader(Event), Loader(User)
_EVENT_AT = _DELIVERY.width  # where a context row's event columns start, and then its user's
_USER_AT = _EVENT_AT + _EVENT.width


def _with_context(where: sa.ColumnElement[bool]) -> sa.Select[Any]:
    """Deliveries matching ``where`` with their event and (if known) their recipient, in one statement: the
    columns of the three tables, in ``Loader`` order (``_contexts`` makes the objects)."""
    return (
        sa.select(*_DELIVERY.columns, *_EVENT.columns, *_USER.columns)
        .select_from(
            DELIVERIES.join(EVENTS, EVENTS.c.id == DELIVERIES.c.event_id).outerjoin(
                USERS, USERS.c.id == DELIVERIES.c.user_id
            )
        )
        .where(where)
    )


DeliveryContext = tuple[Delivery, Event, User | None]
"""A delivery row with the event it belongs to and its recipient (None if the user was erased)."""


def _contexts(rows: Sequence[Sequence[Any]]) -> list[DeliveryContext]:
    """Detached objects of ``_with_context`` rows; an event or user in several rows is one object."""
    events: dict[Any, Event] = {}
    users: dict[Any, User] = {}
    found: list[DeliveryContext] = []
    for row in rows:
        event_id = row[_EVENT_AT + _EVENT.key_position]
        event = events.get(event_id) or events.setdefault(event_id, _EVENT.load(row[_EVENT_AT:_USER_AT]))
        user_id = row[_USER_AT + _USER.key_position]
        user = None if user_id is None else users.get(user_id) or users.setdefault(user_id, _USER.load(row[_USER_AT:]))
        found.append((_DELIVERY.load(row[:_EVENT_AT]), event, user))
    return found


# The claim and lock statements, built once with bound parameters: building them per call cost ~70-270 us
# of CPU each (the claim's was the most), about as much as running them. They run on the driver.
_DUE_NOW = due_condition(sa.bindparam("now"))  # type: ignore[arg-type]
_CLAIM = driver.Prepared(
    _with_context(_DUE_NOW)
    .limit(sa.bindparam("limit", type_=sa.Integer))
    .with_for_update(of=DELIVERIES, skip_locked=True)
)
_CLAIM_REST = driver.Prepared.both(
    lambda arrays: (
        _with_context(
            sa.and_(
                _DUE_NOW,
                driver.member(DELIVERIES.c.send_group, "groups", arrays=arrays),
                driver.member(DELIVERIES.c.id, "taken", arrays=arrays, negated=True),
            )
        )
        .order_by(DELIVERIES.c.id)
        .with_for_update(of=DELIVERIES, skip_locked=True)
    )
)
_DUE_MEMBERS = driver.Prepared.both(
    lambda arrays: (
        sa.select(DELIVERIES.c.send_group, sa.func.count())
        .where(_DUE_NOW, driver.member(DELIVERIES.c.send_group, "groups", arrays=arrays))
        .group_by(DELIVERIES.c.send_group)
    )
)
_ONE = _with_context(DELIVERIES.c.id == sa.bindparam("unit", type_=sa.Uuid())).order_by(DELIVERIES.c.id)
_GROUP = _with_context(DELIVERIES.c.send_group == sa.bindparam("unit", type_=sa.Uuid())).order_by(DELIVERIES.c.id)
_LOCK_ONE, _READ_ONE = driver.Prepared(_ONE.with_for_update(of=DELIVERIES)), driver.Prepared(_ONE)
_LOCK_GROUP, _READ_GROUP = driver.Prepared(_GROUP.with_for_update(of=DELIVERIES)), driver.Prepared(_GROUP)
_LOCK_MANY = driver.Prepared.both(
    lambda arrays: (
        sa.select(*_DELIVERY.columns)
        .where(driver.member(DELIVERIES.c.id, "ids", arrays=arrays))
        .order_by(DELIVERIES.c.id)
        .with_for_update()
    )
)
_CLOSE_INTERRUPTED = driver.Prepared.both(
    lambda arrays: (
        sa.update(ATTEMPTS)
        .where(driver.member(ATTEMPTS.c.delivery_id, "ids", arrays=arrays), ATTEMPTS.c.finished_at.is_(None))
        .values(
            finished_at=sa.bindparam("now", type_=ATTEMPTS.c.finished_at.type),
            outcome="interrupted",
            error="the attempt did not record an outcome",
        )
    )
)


class ClaimedRows(NamedTuple):
    """What ``claim_due`` locked, and whether it left out a send group another transaction holds a member of."""

    rows: list[DeliveryContext]
    contended: bool = False


async def claim_due(session: driver.Target, *, now: dt.datetime, limit: int) -> ClaimedRows:
    """Lock about ``limit`` due deliveries with their context, whole send groups only; ``SKIP LOCKED``, so
    replicas never take the same row. The objects are detached: change them, then ``write`` them.

    Rows are read in the table's physical order (roughly oldest first), not sorted in SQL: sorting every due
    row to take the first ``limit`` made each claim cost O(backlog) -- 16 ms at an 8,000-row backlog -- where an
    unsorted scan stops after ``limit`` rows. A group whose first members are among them is completed with its
    other due members; a group of which another transaction holds a due member is left out (it is claimed
    whole, later), because its members are sent with one call under one idempotency key; ``contended`` says so:
    the other claim commits in milliseconds, and the group is due again then. The claimed rows (at most about
    ``limit``) are returned in id order.
    """
    rows = _contexts(await driver.fetch(session, _CLAIM, {"now": now, "limit": limit}))
    groups = {delivery.send_group for delivery, _, _ in rows if delivery.send_group is not None}
    if not groups:
        return ClaimedRows(rows)
    taken = [delivery.id for delivery, _, _ in rows]
    rest = {"now": now, "groups": list(groups), "taken": taken}
    rows += _contexts(await driver.fetch(session, _CLAIM_REST, rest))
    counted = await driver.fetch(session, _DUE_MEMBERS, {"now": now, "groups": list(groups)})
    due_members = {group: int(count) for group, count in counted}
    locked: dict[uuid.UUID, int] = {}
    for delivery, _, _ in rows:
        if delivery.send_group is not None:
            locked[delivery.send_group] = locked.get(delivery.send_group, 0) + 1
    whole = {group for group, count in locked.items() if count == due_members.get(group)}
    # Members in id order, as ``lock_unit`` gives them: a group's request (its recipients' order) is then the same
    # at every attempt under its key, whatever order the table's rows are in by then.
    claimed = sorted((row for row in rows if row[0].send_group is None or row[0].send_group in whole), key=_by_id)
    return ClaimedRows(claimed, contended=whole != groups)


def _by_id(row: DeliveryContext) -> uuid.UUID:
    return row[0].id


async def lock_unit(
    session: AsyncSession, *, delivery_id: uuid.UUID | None = None, send_group: uuid.UUID | None = None
) -> list[DeliveryContext]:
    """Lock one delivery, or every member of a send group, with context (detached, by id); [] if none exist."""
    if send_group is None:
        rows = await driver.fetch(session, _LOCK_ONE, {"unit": delivery_id})
    else:
        rows = await driver.fetch(session, _LOCK_GROUP, {"unit": send_group})
    return _contexts(rows)


async def read_unit(
    connection: driver.Lent, *, delivery_id: uuid.UUID | None = None, send_group: uuid.UUID | None = None
) -> list[DeliveryContext]:
    """``lock_unit`` without the lock, in a statement of its own, for a claim made without one
    (``notifier.db.claiming``)."""
    statement, unit = (_READ_ONE, delivery_id) if send_group is None else (_READ_GROUP, send_group)
    return _contexts(await driver.fetch(connection, statement, {"unit": unit}))


async def lock_many(session: AsyncSession, delivery_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Delivery]:
    """Lock deliveries in id order (two writers with overlapping sets cannot deadlock); return them detached by id."""
    if not delivery_ids:
        return {}
    locked = await driver.fetch(session, _LOCK_MANY, {"ids": sorted(set(delivery_ids))})
    return {delivery.id: delivery for delivery in map(_DELIVERY.load, locked)}


def copy(delivery: Delivery) -> Delivery:
    """A detached copy of a loaded ``delivery``: a rule may change it while the original stays as it was read."""
    return _DELIVERY.copy(delivery)


async def write(session: driver.Target, deliveries: Sequence[Delivery]) -> None:
    """Write the ``MUTABLE_COLUMNS`` of each (detached, changed) delivery in one statement (see ``bulk``)."""
    if not deliveries:
        return
    rows = [_written(d) for d in deliveries]
    if (plain := bulk.without_arrays(session, rows)) is not None:
        await plain.execute(_WRITE, [dict(zip(_WRITE_KEYS, row, strict=True)) for row in rows])
    else:
        await _PG_WRITE.execute(session, rows)


def _written(delivery: Delivery) -> tuple[Any, ...]:
    """The delivery's id and ``MUTABLE_COLUMNS``, read from its ``__dict__``, where SQLAlchemy keeps the loaded
    values: through the instrumented attributes, the 16 reads cost ~4 us per row, 20x as much."""
    try:
        return _WRITTEN(delivery.__dict__)  # type: ignore[no-any-return]
    except KeyError:  # not loaded (expired): the attribute loads it, or says why it cannot
        return _WRITTEN_ATTRIBUTES(delivery)


async def _insert(session: driver.Target, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert rows (mappings with the same keys): one statement, one round trip (see ``bulk``)."""
    if rows:
        if (plain := bulk.without_arrays(session, rows)) is not None:
            await plain.execute(_INSERT[table], rows)
        else:
            await _PG_INSERT[table].execute(session, rows)


async def insert(session: driver.Target, *, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert new deliveries (mappings with the same keys) in one statement: one round trip."""
    await _insert(session, DELIVERIES, rows)


def _insert_unless_planned(dialect: str) -> Any:
    statement = every_column(dialect, DELIVERIES)
    return statement.on_conflict_do_nothing(index_elements=["event_id", "user_id", "channel"]).returning(
        DELIVERIES.c.id
    )


_INSERT_UNLESS_PLANNED = driver.Prepared(
    _insert_unless_planned("postgresql"), portable=_insert_unless_planned("sqlite")
)


async def insert_unless_planned(session: driver.Target, *, row: Mapping[str, Any]) -> bool:
    """Insert one delivery unless its (event, user, channel) exists; return whether it was inserted."""
    return bool(await driver.fetch(session, _INSERT_UNLESS_PLANNED, with_defaults(DELIVERIES, row)))


async def insert_transitions(session: driver.Target, *, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert transition rows in one statement."""
    await _insert(session, TRANSITIONS, rows)


async def insert_attempts(session: driver.Target, *, rows: Sequence[Mapping[str, Any]]) -> None:
    """Open attempt rows (``delivery_id``, ``number``, ``started_at``, ``via``) in one statement."""
    await _insert(session, ATTEMPTS, rows)


async def finish_attempts(session: AsyncSession, *, outcomes: Sequence[Mapping[str, object]]) -> None:
    """Close attempt rows (``b_delivery_id``, ``b_number`` and ``FINISHED_COLUMNS``) in one statement."""
    if not outcomes:
        return
    if bulk.pays_off(session, outcomes):
        await _PG_FINISH_ATTEMPT.execute(session, [_FINISHED(o) for o in outcomes])
    else:
        await session.execute(_FINISH_ATTEMPT, outcomes)


async def close_interrupted_attempts(
    session: driver.Target, *, delivery_ids: Sequence[uuid.UUID], now: dt.datetime
) -> None:
    """Close the open attempt rows of these deliveries as ``interrupted`` (their attempt never recorded an end)."""
    if delivery_ids:
        await driver.execute(session, _CLOSE_INTERRUPTED, {"ids": list(delivery_ids), "now": now})


async def renew_lease(
    session: AsyncSession, *, delivery_ids: Sequence[uuid.UUID], token: uuid.UUID, claimed_until: dt.datetime
) -> bool:
    """Extend the lease of every delivery while ``token`` still holds it; False if any was taken over."""
    renewed = await session.execute(
        sa.update(Delivery)
        .where(col(Delivery.id).in_(delivery_ids), col(Delivery.claim_token) == token)
        .values(claimed_until=claimed_until)
        .execution_options(synchronize_session=False)
    )
    return renewed.rowcount == len(delivery_ids)  # type: ignore[attr-defined,no-any-return]


async def find_stuck(
    session: AsyncSession, *, now: dt.datetime, grace: dt.timedelta, limit: int
) -> list[StuckDelivery]:
    """Up to ``limit`` deliveries the QStash sweep should dispatch again, longest overdue first: due for at least
    ``grace`` (see ``due_condition``), or pending and unclaimed with QStash having given up on their current
    generation's message (nothing will call them back, whenever they are due)."""
    due_since = sa.func.coalesce(col(Delivery.not_before), col(Delivery.updated_at))
    given_up = sa.and_(
        col(Delivery.status).in_(sorted(DISPATCHABLE_STATUSES)),
        col(Delivery.gave_up_generation) == col(Delivery.dispatch_generation),
        sa.or_(col(Delivery.claimed_until).is_(None), col(Delivery.claimed_until) < now),
    )
    statement = (
        sa.select(col(Delivery.id), col(Delivery.status), col(Delivery.send_group))
        .where(sa.or_(due_condition(now, grace=grace), given_up))
        .order_by(due_since, col(Delivery.id))
        .limit(limit)
    )
    return [StuckDelivery(*row) for row in (await session.execute(statement)).all()]


async def pending_members(session: AsyncSession, *, send_groups: Collection[uuid.UUID]) -> list[uuid.UUID]:
    """The ids of the pending (queued, deferred, sending) members of these send groups."""
    if not send_groups:
        return []
    rows = await session.execute(
        sa.select(col(Delivery.id)).where(
            col(Delivery.send_group).in_(send_groups), col(Delivery.status).in_(sorted(PENDING_STATUSES))
        )
    )
    return list(rows.scalars())
