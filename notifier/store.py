"""Data functions over the tables. Keyword-only arguments; none of them commits.

The request or the delivery attempt that calls them owns the transaction and commits once.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from notifier.catalog import Catalog
from notifier.models import (
    Delivery,
    OrganizationPreferences,
    User,
)
from notifier.preferences.document import PreferenceDocument, load_stored
from notifier.routing import Profile
from notifier.types import DeliveryStatus

log = logging.getLogger("notifier.delivery")
PROFILE_FIELDS = ("organization_id", "roles", "email", "name", "locale", "timezone")

# The tables themselves: Core statements on them skip the ORM's per-row bookkeeping, which ingest
# (several rows per request, none of them read back as objects) does not need.
_users = User.metadata.tables["users"]
_preferences = User.metadata.tables["preferences"]
_organization_preferences = User.metadata.tables["organization_preferences"]
_events = User.metadata.tables["events"]
_deliveries = User.metadata.tables["deliveries"]
_transitions = User.metadata.tables["delivery_transitions"]
_inbox = User.metadata.tables["inbox_messages"]


def _dialect(session: AsyncSession) -> str:
    return session.bind.dialect.name if session.bind is not None else "postgresql"


def _dialect_insert(dialect: str, table: Any) -> Any:
    """An INSERT that knows ON CONFLICT, for ``dialect`` (SQLite or PostgreSQL)."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def _insert(session: AsyncSession, table: Any) -> Any:
    return _dialect_insert(_dialect(session), table)


# Statements that ingest runs for every event are built once, here or at first use per dialect: building
# one took about as much CPU as running it.
_INSERT_DELIVERIES = sa.insert(_deliveries)
_INSERT_TRANSITIONS = sa.insert(_transitions)


@functools.cache
def _upsert_users_statement(dialect: str, fields: tuple[str, ...]) -> Any:
    statement = _dialect_insert(dialect, _users)
    return statement.on_conflict_do_update(
        index_elements=["id"],
        set_={**{k: statement.excluded[k] for k in fields}, "updated_at": statement.excluded.updated_at},
    )


@functools.cache
def _ensure_users_statement(dialect: str) -> Any:
    return _dialect_insert(dialect, _users).on_conflict_do_nothing(index_elements=["id"])


@functools.cache
def _insert_event_statement(dialect: str) -> Any:
    statement = _dialect_insert(dialect, _events)
    return statement.on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(_events.c.id)


async def upsert_users(session: AsyncSession, *, profiles: Sequence[Mapping[str, Any]], now: dt.datetime) -> None:
    """Insert or update users; only the fields present in each mapping are changed on update.

    Sorted by id so that concurrent writers lock rows in one order (no deadlocks). Consecutive profiles
    that set the same fields share one executemany: one row after the other, one round trip.
    """
    ordered = sorted(profiles, key=lambda p: str(p["id"]))
    for fields, run in itertools.groupby(ordered, key=lambda p: tuple(k for k in PROFILE_FIELDS if k in p)):
        rows = [{"id": p["id"], "created_at": now, "updated_at": now, **{k: p[k] for k in fields}} for p in run]
        await session.execute(_upsert_users_statement(_dialect(session), fields), rows)


async def users_with_roles(session: AsyncSession, *, organization_id: str, roles: Sequence[str]) -> list[User]:
    """Users of ``organization_id`` holding any of ``roles`` (all users of the organization if ``roles`` is empty)."""
    rows = await session.execute(sa.select(User).where(col(User.organization_id) == organization_id).order_by(User.id))
    wanted = set(roles)
    return [user for user in rows.scalars() if not wanted or wanted.intersection(user.roles or [])]


# Routing's ``profile.organization_id or event_organization_id``, in SQL.
_applied_organization = sa.func.coalesce(
    sa.func.nullif(_users.c.organization_id, ""), sa.bindparam("event_organization_id", type_=sa.String())
)
_RECIPIENTS_QUERY = (
    sa.select(
        _users.c.id,
        _users.c.organization_id,
        _users.c.email,
        _users.c.locale,
        _users.c.timezone,
        _preferences.c.document.label("user_document"),
        _organization_preferences.c.document.label("organization_document"),
    )
    .select_from(
        _users.outerjoin(_preferences, _preferences.c.user_id == _users.c.id).outerjoin(
            _organization_preferences, _organization_preferences.c.organization_id == _applied_organization
        )
    )
    .where(_users.c.id.in_(sa.bindparam("user_ids", expanding=True)))
)


@dataclass(frozen=True)
class StoredRecipients:
    """What is stored about the recipients of an event: what routing reads besides the event itself."""

    profiles: dict[str, Profile]  # the users that exist, by id
    preferences: dict[str, PreferenceDocument]  # by user id, for users with a document
    organization_preferences: dict[str, PreferenceDocument]  # by organization id, for those with a document
    checked_organizations: frozenset[str] = frozenset()  # looked up, found or not


async def load_recipients(
    session: AsyncSession, *, user_ids: Iterable[str], event_organization_id: str | None, catalog: Catalog
) -> StoredRecipients:
    """Load the users among ``user_ids`` that exist, their preference documents and, for each, the
    document of the organization routing applies to them (their own, else the event's), in one query.

    Users that do not exist are absent from the result, and so is their organization (the event's).
    """
    ids = list(dict.fromkeys(user_ids))
    if not ids:
        return StoredRecipients({}, {}, {})
    rows = await session.execute(_RECIPIENTS_QUERY, {"user_ids": ids, "event_organization_id": event_organization_id})
    profiles: dict[str, Profile] = {}
    preferences: dict[str, PreferenceDocument] = {}
    organizations: dict[str, PreferenceDocument] = {}
    checked: set[str] = set()
    for row in rows:
        profiles[row.id] = Profile(
            id=row.id, organization_id=row.organization_id, email=row.email, locale=row.locale, timezone=row.timezone
        )
        if row.user_document is not None:
            preferences[row.id] = load_stored(row.user_document, catalog)
        applied = row.organization_id or event_organization_id
        if applied and applied not in checked:
            checked.add(applied)
            if row.organization_document is not None:
                organizations[applied] = load_stored(row.organization_document, catalog)
    return StoredRecipients(profiles, preferences, organizations, frozenset(checked))


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


_OPEN_DIGEST_HEADS_QUERY = sa.select(_deliveries.c.digest_key).where(
    _deliveries.c.digest_key.in_(sa.bindparam("digest_keys", expanding=True)),
    _deliveries.c.status.in_([DeliveryStatus.queued, DeliveryStatus.deferred]),
)


async def open_digest_heads(session: AsyncSession, *, digest_keys: Iterable[str]) -> set[str]:
    """Digest keys that already have a pending (not yet claimed) head delivery."""
    keys = list(digest_keys)
    if not keys:
        return set()
    rows = await session.execute(_OPEN_DIGEST_HEADS_QUERY, {"digest_keys": keys})
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


async def insert_event(session: AsyncSession, *, row: Mapping[str, Any]) -> bool:
    """Insert an event; return False, inserting nothing, when its idempotency key is already taken.

    The unique constraint decides: of concurrent requests with one key, the later ones wait for the
    first to commit, then find the key taken.
    """
    result = await session.execute(_insert_event_statement(_dialect(session)), row)
    return result.first() is not None


async def insert_deliveries(session: AsyncSession, *, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert new deliveries (mappings with the same keys) in one executemany: one round trip."""
    if rows:
        await session.execute(_INSERT_DELIVERIES, rows)


@dataclass(frozen=True)
class NewTransition:
    """One status change of a delivery for ``record_transitions``.

    ``context`` (channel, event_id, attempt, via, elapsed_ms, …) goes into the log line only.
    """

    delivery_id: uuid.UUID
    from_status: str | None
    to_status: str
    reason: str | None = None
    note: str | None = None
    context: Mapping[str, object] = field(default_factory=dict)


async def record_transitions(session: AsyncSession, *, transitions: Sequence[NewTransition], at: dt.datetime) -> None:
    """Record status changes made at ``at`` in one executemany; log each as the line ``transition`` logs."""
    for change in transitions:
        log.info(
            "delivery %s -> %s",
            change.from_status or "new",
            change.to_status,
            extra={
                "delivery_id": str(change.delivery_id),
                "from_status": change.from_status,
                "to_status": change.to_status,
                "reason": change.reason,
                **change.context,
            },
        )
    if transitions:
        rows = [
            {
                "id": uuid.uuid4(),
                "delivery_id": change.delivery_id,
                "from_status": change.from_status,
                "to_status": change.to_status,
                "reason": change.reason,
                "note": change.note[:500] if change.note else None,
                "at": at,
            }
            for change in transitions
        ]
        await session.execute(_INSERT_TRANSITIONS, rows)


async def insert_inbox_messages(
    session: AsyncSession, *, rows: Sequence[Mapping[str, Any]], now: dt.datetime
) -> dict[uuid.UUID, sa.Row[Any]]:
    """Store inbox messages once per delivery id; return the stored rows by delivery id (the earlier one on a repeat).

    One INSERT ... RETURNING for any number of rows, in delivery id order so concurrent batches lock
    alike; a SELECT only for deliveries whose message was stored before (a repeated attempt).
    """
    ordered = sorted(
        ({"id": uuid.uuid4(), "created_at": now, **row} for row in rows), key=lambda row: str(row["delivery_id"])
    )
    statement = (
        _insert(session, _inbox)
        .values(ordered)
        .on_conflict_do_nothing(index_elements=["delivery_id"])
        .returning(*_inbox.c)
    )
    stored = {row.delivery_id: row for row in await session.execute(statement)}
    if repeats := [row["delivery_id"] for row in ordered if row["delivery_id"] not in stored]:
        earlier = await session.execute(sa.select(*_inbox.c).where(_inbox.c.delivery_id.in_(repeats)))
        stored.update((row.delivery_id, row) for row in earlier)
    return stored


async def ensure_users(session: AsyncSession, *, user_ids: Sequence[str], now: dt.datetime) -> None:
    """Create bare user rows for ids not seen before; existing users are left untouched.

    One executemany, ids sorted: concurrent events with overlapping recipients then take row locks in
    the same order and cannot deadlock.
    """
    ids = sorted(set(user_ids))
    if not ids:
        return
    rows = [{"id": user_id, "roles": [], "created_at": now, "updated_at": now} for user_id in ids]
    await session.execute(_ensure_users_statement(_dialect(session)), rows)
