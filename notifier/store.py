"""Data functions over the tables. Keyword-only arguments; none of them commits.

The request or the delivery attempt that calls them owns the transaction and commits once.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from notifier.catalog import Catalog
from notifier.models import (
    Delivery,
    DeliveryTransition,
    InboxMessage,
    OrganizationPreferences,
    User,
    UserPreferences,
    utcnow,
)
from notifier.preferences.document import PreferenceDocument, load_stored
from notifier.routing import Profile
from notifier.types import DeliveryStatus

log = logging.getLogger("notifier.delivery")
PROFILE_FIELDS = ("organization_id", "roles", "email", "name", "locale", "timezone")


def _insert(session: AsyncSession, table: Any) -> Any:
    dialect = session.bind.dialect.name if session.bind is not None else "postgresql"
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def profile_of(user: User) -> Profile:
    return Profile(
        id=user.id, organization_id=user.organization_id, email=user.email, locale=user.locale, timezone=user.timezone
    )


async def upsert_users(session: AsyncSession, *, profiles: Sequence[Mapping[str, Any]], now: dt.datetime) -> None:
    """Insert or update users; only the fields present in each mapping are changed on update.

    Sorted by id so that concurrent writers lock rows in one order (no deadlocks).
    """
    for profile in sorted(profiles, key=lambda p: str(p["id"])):
        fields = {k: profile[k] for k in PROFILE_FIELDS if k in profile}
        statement = _insert(session, User).values(id=profile["id"], created_at=now, updated_at=now, **fields)
        statement = statement.on_conflict_do_update(
            index_elements=["id"], set_={**fields, "updated_at": now} if fields else {"updated_at": now}
        )
        await session.execute(statement)


async def load_users(session: AsyncSession, *, user_ids: Iterable[str]) -> dict[str, User]:
    ids = list(dict.fromkeys(user_ids))
    if not ids:
        return {}
    rows = await session.execute(sa.select(User).where(col(User.id).in_(ids)))
    return {user.id: user for user in rows.scalars()}


async def users_with_roles(session: AsyncSession, *, organization_id: str, roles: Sequence[str]) -> list[User]:
    """Users of ``organization_id`` holding any of ``roles`` (all users of the organization if ``roles`` is empty)."""
    rows = await session.execute(sa.select(User).where(col(User.organization_id) == organization_id).order_by(User.id))
    wanted = set(roles)
    return [user for user in rows.scalars() if not wanted or wanted.intersection(user.roles or [])]


async def load_preferences(
    session: AsyncSession, *, user_ids: Iterable[str], catalog: Catalog
) -> dict[str, PreferenceDocument]:
    ids = list(user_ids)
    if not ids:
        return {}
    rows = await session.execute(sa.select(UserPreferences).where(col(UserPreferences.user_id).in_(ids)))
    return {row.user_id: load_stored(row.document, catalog) for row in rows.scalars()}


async def load_organization_preferences(
    session: AsyncSession, *, organization_ids: Iterable[str], catalog: Catalog
) -> dict[str, PreferenceDocument]:
    ids = [i for i in dict.fromkeys(organization_ids) if i]
    if not ids:
        return {}
    rows = await session.execute(
        sa.select(OrganizationPreferences).where(col(OrganizationPreferences.organization_id).in_(ids))
    )
    return {row.organization_id: load_stored(row.document, catalog) for row in rows.scalars()}


async def open_digest_heads(session: AsyncSession, *, digest_keys: Iterable[str]) -> set[str]:
    """Digest keys that already have a pending (not yet claimed) head delivery."""
    keys = list(digest_keys)
    if not keys:
        return set()
    rows = await session.execute(
        sa.select(col(Delivery.digest_key)).where(
            col(Delivery.digest_key).in_(keys),
            col(Delivery.status).in_([DeliveryStatus.queued, DeliveryStatus.deferred]),
        )
    )
    return {key for key in rows.scalars() if key}


async def insert_deliveries_ignoring_duplicates(
    session: AsyncSession, *, rows: Sequence[Mapping[str, Any]]
) -> list[uuid.UUID]:
    """Insert deliveries; a row whose (event, user, channel) exists is skipped. Returns the inserted ids."""
    inserted: list[uuid.UUID] = []
    for row in rows:
        statement = (
            _insert(session, Delivery)
            .values(**row)
            .on_conflict_do_nothing(index_elements=["event_id", "user_id", "channel"])
            .returning(Delivery.id)
        )
        result = (await session.execute(statement)).scalar_one_or_none()
        if result is not None:
            inserted.append(result)
    return inserted


def transition(
    session: AsyncSession,
    *,
    delivery_id: uuid.UUID,
    from_status: str | None,
    to_status: str,
    reason: str | None = None,
    note: str | None = None,
    at: dt.datetime | None = None,
    **context: object,
) -> None:
    """Record one status change of a delivery (in the caller's transaction) and log it as one line.

    ``context`` (channel, event_id, attempt, via, elapsed_ms, …) goes into the log line only.
    """
    log.info(
        "delivery %s -> %s",
        from_status or "new",
        to_status,
        extra={
            "delivery_id": str(delivery_id),
            "from_status": from_status,
            "to_status": to_status,
            "reason": reason,
            **context,
        },
    )
    session.add(
        DeliveryTransition(
            delivery_id=delivery_id,
            from_status=from_status,
            to_status=to_status,
            reason=reason,
            note=note[:500] if note else None,
            at=at or utcnow(),
        )
    )


async def insert_inbox_messages(
    session: AsyncSession, *, rows: Sequence[Mapping[str, Any]]
) -> dict[uuid.UUID, InboxMessage]:
    """Store inbox messages once per delivery id; return them by delivery id (the existing one on a repeat).

    Two statements for any number of rows, in delivery id order so concurrent batches lock alike.
    """
    ordered = sorted(rows, key=lambda row: str(row["delivery_id"]))
    statement = _insert(session, InboxMessage).values(ordered).on_conflict_do_nothing(index_elements=["delivery_id"])
    await session.execute(statement)
    ids = [row["delivery_id"] for row in ordered]
    stored = await session.execute(sa.select(InboxMessage).where(col(InboxMessage.delivery_id).in_(ids)))
    return {item.delivery_id: item for item in stored.scalars() if item.delivery_id is not None}


async def ensure_users(session: AsyncSession, *, user_ids: Sequence[str], now: dt.datetime) -> None:
    """Create bare user rows for ids not seen before; existing users are left untouched.

    One statement, ids sorted: concurrent events with overlapping recipients then take row locks in
    the same order and cannot deadlock.
    """
    ids = sorted(set(user_ids))
    if not ids:
        return
    rows = [{"id": user_id, "roles": [], "created_at": now, "updated_at": now} for user_id in ids]
    await session.execute(_insert(session, User).values(rows).on_conflict_do_nothing(index_elements=["id"]))
