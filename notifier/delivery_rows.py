"""The SQL ``DeliveryRunner`` runs on deliveries and their attempt rows. None of it commits.

Batch-shaped on purpose: a claim or a group of outcomes is one statement per table, not an ORM
flush per object (the unit of work cost more CPU than the statements; measured in bench/).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import SQLModel, col

from notifier.models import Delivery, DeliveryAttempt, Event, User
from notifier.types import DeliveryStatus, Reason

_ATTEMPTS = SQLModel.metadata.tables["delivery_attempts"]
_DELIVERIES = SQLModel.metadata.tables["deliveries"]

# What an outcome may change on a delivery row (``DeliveryRunner._apply`` sets these).
_OUTCOME_COLUMNS = (
    "status",
    "reason",
    "claim_token",
    "claimed_until",
    "not_before",
    "sent_at",
    "provider_message_id",
    "last_error",
    "updated_at",
)
_RECORD_OUTCOME = (
    sa.update(_DELIVERIES)
    .where(_DELIVERIES.c.id == sa.bindparam("b_id"))
    .values({name: sa.bindparam(name) for name in _OUTCOME_COLUMNS})
)
_FINISH_ATTEMPT = (
    sa.update(_ATTEMPTS)
    .where(
        _ATTEMPTS.c.delivery_id == sa.bindparam("b_delivery_id"),
        _ATTEMPTS.c.number == sa.bindparam("b_number"),
    )
    .values(
        started_at=sa.bindparam("started_at"),
        finished_at=sa.bindparam("finished_at"),
        outcome=sa.bindparam("outcome"),
        http_status=sa.bindparam("http_status"),
        provider_message_id=sa.bindparam("provider_message_id"),
        error=sa.bindparam("error"),
    )
)


def due_condition(now: dt.datetime) -> sa.ColumnElement[bool]:
    """Rows a worker may claim: pending and due and unclaimed, or ``sending`` with an expired lease."""
    pending = sa.and_(
        col(Delivery.status).in_([DeliveryStatus.queued, DeliveryStatus.deferred]),
        sa.or_(col(Delivery.not_before).is_(None), col(Delivery.not_before) <= now),
        sa.or_(col(Delivery.claimed_until).is_(None), col(Delivery.claimed_until) < now),
    )
    abandoned = sa.and_(col(Delivery.status) == DeliveryStatus.sending, col(Delivery.claimed_until) < now)
    return sa.or_(pending, abandoned)


def with_context(where: sa.ColumnElement[bool]) -> sa.Select[Delivery, Event, User]:
    """Deliveries matching ``where`` with their event and (if known) their recipient, in one statement."""
    return (
        sa.select(Delivery, Event, User)
        .join(Event, col(Event.id) == col(Delivery.event_id))
        .outerjoin(User, col(User.id) == col(Delivery.user_id))
        .where(where)
    )


async def lock(session: AsyncSession, delivery_id: uuid.UUID) -> Delivery | None:
    statement = sa.select(Delivery).where(col(Delivery.id) == delivery_id).with_for_update()
    return (await session.execute(statement)).scalar_one_or_none()


async def lock_many(session: AsyncSession, delivery_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Delivery]:
    """Lock deliveries in id order (two writers with overlapping sets cannot deadlock); return them by id."""
    locked = await session.execute(
        sa.select(Delivery)
        .where(col(Delivery.id).in_(sorted(set(delivery_ids))))
        .order_by(col(Delivery.id))
        .with_for_update()
    )
    return {delivery.id: delivery for delivery in locked.scalars()}


async def open_attempts(
    session: AsyncSession,
    attempts: Sequence[Mapping[str, object]],
    *,
    token: uuid.UUID,
    claimed_until: dt.datetime,
    now: dt.datetime,
) -> None:
    """Move the attempts' deliveries to ``sending`` under ``token`` (one UPDATE) and insert the attempt rows."""
    if not attempts:
        return
    await session.execute(
        sa.update(Delivery)
        .where(col(Delivery.id).in_([attempt["delivery_id"] for attempt in attempts]))
        .values(
            status=DeliveryStatus.sending,
            claim_token=token,
            claimed_until=claimed_until,
            attempts=col(Delivery.attempts) + 1,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    await session.execute(sa.insert(_ATTEMPTS), attempts)


async def renew_lease(
    session: AsyncSession, delivery_id: uuid.UUID, *, token: uuid.UUID, claimed_until: dt.datetime
) -> bool:
    """Extend a lease while ``token`` still holds it; False if the row was taken over."""
    renewed = await session.execute(
        sa.update(Delivery)
        .where(col(Delivery.id) == delivery_id, col(Delivery.claim_token) == token)
        .values(claimed_until=claimed_until)
        .execution_options(synchronize_session=False)
    )
    return renewed.rowcount == 1  # type: ignore[attr-defined,no-any-return]


async def finish_attempts(session: AsyncSession, outcomes: Sequence[Mapping[str, object]]) -> None:
    """Close attempt rows (``b_delivery_id``, ``b_number`` and the ``_FINISH_ATTEMPT`` values), one executemany."""
    await session.execute(_FINISH_ATTEMPT, outcomes)


async def write_outcomes(session: AsyncSession, deliveries: Sequence[Delivery]) -> None:
    """Write what an outcome changed on each delivery (the ``_OUTCOME_COLUMNS``), one executemany."""
    if deliveries:
        await session.execute(
            _RECORD_OUTCOME,
            [{"b_id": d.id, **{name: getattr(d, name) for name in _OUTCOME_COLUMNS}} for d in deliveries],
        )


async def close_interrupted_attempts(
    session: AsyncSession, delivery_ids: Sequence[uuid.UUID], now: dt.datetime
) -> None:
    await session.execute(
        sa.update(DeliveryAttempt)
        .where(col(DeliveryAttempt.delivery_id).in_(delivery_ids), col(DeliveryAttempt.finished_at).is_(None))
        .values(finished_at=now, outcome="interrupted", error="the attempt did not record an outcome")
    )


async def digest_counts(session: AsyncSession, heads: Sequence[Delivery]) -> dict[uuid.UUID, int]:
    """Per digest head: 1 plus every delivery folded into it since it was created. One query for all heads."""
    if not heads:
        return {}
    folded = await session.execute(
        sa.select(_DELIVERIES.c.digest_key, _DELIVERIES.c.created_at).where(
            _DELIVERIES.c.digest_key.in_({head.digest_key for head in heads}),
            _DELIVERIES.c.reason == Reason.digested,
            _DELIVERIES.c.created_at >= min(head.created_at for head in heads),
        )
    )
    since: dict[str | None, list[dt.datetime]] = {}
    for key, created_at in folded:
        since.setdefault(key, []).append(created_at)
    # A key's earlier digest (already sent) folded messages created before this head: count only later ones.
    return {
        head.id: 1 + sum(created >= head.created_at for created in since.get(head.digest_key, ())) for head in heads
    }
