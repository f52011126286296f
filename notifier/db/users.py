"""Queries on users (profiles) and what is stored about a recipient. None of them commits."""

from __future__ import annotations

import datetime as dt
import functools
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from notifier.db import bulk, driver
from notifier.db.models import (
    INBOX_MESSAGES,
    ORGANIZATION_PREFERENCES,
    PREFERENCE_CHANGES,
    PREFERENCES,
    USERS,
    User,
)
from notifier.db.sql import dialect_insert, dialect_of, insert_for
from notifier.errors import Conflict

PROFILE_FIELDS = ("organization_id", "roles", "email", "name", "locale", "timezone")


@functools.cache
def _upsert_statement(dialect: str, fields: tuple[str, ...]) -> Any:
    statement = insert_for(dialect, USERS)
    return statement.on_conflict_do_update(
        index_elements=["id"],
        set_={**{k: statement.excluded[k] for k in fields}, "updated_at": statement.excluded.updated_at},
    )


@functools.cache
def _ensure_statement(dialect: str) -> Any:
    return insert_for(dialect, USERS).on_conflict_do_nothing(index_elements=["id"])


# On PostgreSQL the rows go as arrays (``notifier.db.bulk``), on the driver: one statement for any number of them.
_BARE = ("id", "roles", "created_at", "updated_at")
_PG_ENSURE = driver.Prepared(bulk.insert_select(USERS, _BARE).on_conflict_do_nothing(index_elements=["id"]))


@functools.cache
def _pg_upsert(fields: tuple[str, ...]) -> tuple[tuple[str, ...], driver.Prepared]:
    columns = ("id", "created_at", "updated_at", *fields)
    statement = bulk.insert_select(USERS, columns)
    updated = {**{k: statement.excluded[k] for k in fields}, "updated_at": statement.excluded.updated_at}
    return columns, driver.Prepared(statement.on_conflict_do_update(index_elements=["id"], set_=updated))


async def upsert(session: driver.Target, *, profiles: Sequence[Mapping[str, Any]], now: dt.datetime) -> None:
    """Insert or update users; only the fields present in each mapping are changed on update.

    Sorted by id so that concurrent writers lock rows in one order (no deadlocks). Consecutive profiles
    that set the same fields share one statement, one round trip; a user given twice among them takes the last
    profile's values, as one write after the other would.
    """
    ordered = sorted(profiles, key=lambda p: str(p["id"]))
    for fields, run in itertools.groupby(ordered, key=lambda p: tuple(k for k in PROFILE_FIELDS if k in p)):
        latest = {p["id"]: p for p in run}
        rows = [{"id": i, "created_at": now, "updated_at": now, **{k: p[k] for k in fields}} for i, p in latest.items()]
        if (plain := bulk.without_arrays(session, rows)) is not None:
            await plain.execute(_upsert_statement(dialect_of(plain), fields), rows)
        else:
            columns, statement = _pg_upsert(fields)
            await driver.execute(session, statement, bulk.array_values(USERS, columns, rows))


async def put(session: AsyncSession, *, user_id: str, fields: Mapping[str, Any], now: dt.datetime) -> tuple[User, bool]:
    """Create or update one user (only the ``PROFILE_FIELDS`` in ``fields`` change on update); return the row as
    this call wrote it and whether it created it.

    Two statements that each say what they did (INSERT ... ON CONFLICT DO NOTHING RETURNING, else UPDATE ...
    RETURNING) rather than an upsert and a read: under concurrent writers one of them creates the user, the
    others update it, and each returns its own write; a concurrent erasure between the two makes the UPDATE find
    nothing, and the user is created again.
    """
    values = {k: fields[k] for k in PROFILE_FIELDS if k in fields}
    for _ in range(_PUT_ROUNDS):
        inserted = await session.execute(
            dialect_insert(session, USERS)
            .values(id=user_id, roles=[], created_at=now, updated_at=now)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(*USERS.c)
        )
        if (row := inserted.mappings().one_or_none()) is not None:
            return User(**row), True
        updated = await session.execute(
            sa.update(USERS).where(USERS.c.id == user_id).values(**values, updated_at=now).returning(*USERS.c)
        )
        if (row := updated.mappings().one_or_none()) is not None:
            return User(**row), False
    raise Conflict(f"user '{user_id}' was erased and recreated concurrently {_PUT_ROUNDS} times; try again")


_PUT_ROUNDS = 5
"""How often ``put`` tries again when the user it found is erased before its UPDATE (each round is a real race)."""


async def ensure(session: driver.Target, *, user_ids: Sequence[str], now: dt.datetime) -> None:
    """Create bare user rows for ids not seen before; existing users are left untouched.

    One statement, ids sorted: concurrent events with overlapping recipients then take row locks in
    the same order and cannot deadlock.
    """
    ids = sorted(set(user_ids))
    if ids:
        rows = [{"id": user_id, "roles": [], "created_at": now, "updated_at": now} for user_id in ids]
        if (plain := bulk.without_arrays(session, rows)) is not None:
            await plain.execute(_ensure_statement(dialect_of(plain)), rows)
        else:
            await driver.execute(session, _PG_ENSURE, bulk.array_values(USERS, _BARE, rows))


async def get(session: AsyncSession, user_id: str) -> User | None:
    return await session.get(User, user_id)


_OF_ORGANIZATION = driver.Prepared(
    sa.select(USERS.c.id, USERS.c.roles)
    .where(USERS.c.organization_id == sa.bindparam("organization_id", type_=sa.String()))
    .order_by(USERS.c.id)
)


async def with_roles(session: driver.Target, *, organization_id: str, roles: Sequence[str]) -> list[str]:
    """Ids of the users of ``organization_id`` holding any of ``roles`` (all its users if ``roles`` is empty)."""
    rows = await driver.fetch(session, _OF_ORGANIZATION, {"organization_id": organization_id})
    wanted = set(roles)
    return [user_id for user_id, held in rows if not wanted or wanted.intersection(held or [])]


async def erase(session: AsyncSession, *, user_id: str) -> bool:
    """Delete a user with their preferences, preference history and inbox; False if there was no such user."""
    await session.execute(sa.delete(INBOX_MESSAGES).where(INBOX_MESSAGES.c.user_id == user_id))
    # The preference history holds the user's documents: erase it with them.
    await session.execute(
        sa.delete(PREFERENCE_CHANGES).where(
            PREFERENCE_CHANGES.c.subject_kind == "user", PREFERENCE_CHANGES.c.subject_id == user_id
        )
    )
    deleted = await session.execute(sa.delete(User).where(col(User.id) == user_id))  # preferences cascade
    return bool(deleted.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class StoredRecipient:
    """A user as routing reads it: the profile fields, their preference document, and the document of the
    organization that applies to them (theirs, else the event's), as stored (JSON, or None)."""

    id: str
    organization_id: str | None
    email: str | None
    name: str | None
    locale: str | None
    timezone: str | None
    document: Mapping[str, Any] | None
    organization_document: Mapping[str, Any] | None


# Routing's ``profile.organization_id or event_organization_id``, in SQL.
_applied_organization = sa.func.coalesce(
    sa.func.nullif(USERS.c.organization_id, ""), sa.bindparam("event_organization_id", type_=sa.String())
)
# One statement whatever the number of users (an array parameter on the driver): an expanding ``IN`` made a new
# statement text, prepared anew, for every count of recipients.
_RECIPIENTS = driver.Prepared.both(
    lambda arrays: (
        sa.select(
            USERS.c.id,
            USERS.c.organization_id,
            USERS.c.email,
            USERS.c.name,
            USERS.c.locale,
            USERS.c.timezone,
            PREFERENCES.c.document.label("document"),
            ORGANIZATION_PREFERENCES.c.document.label("organization_document"),
        )
        .select_from(
            USERS.outerjoin(PREFERENCES, PREFERENCES.c.user_id == USERS.c.id).outerjoin(
                ORGANIZATION_PREFERENCES, ORGANIZATION_PREFERENCES.c.organization_id == _applied_organization
            )
        )
        .where(driver.member(USERS.c.id, "user_ids", arrays=arrays))
    )
)


async def recipients(
    session: driver.Target, *, user_ids: Iterable[str], event_organization_id: str | None
) -> dict[str, StoredRecipient]:
    """The users among ``user_ids`` that exist, by id, with their documents: one query.

    Users that do not exist are absent from the result, and so is their organization (the event's).
    """
    ids = list(dict.fromkeys(user_ids))
    if not ids:
        return {}
    params = {"user_ids": ids, "event_organization_id": event_organization_id}
    rows = await driver.fetch(session, _RECIPIENTS, params)
    return {recipient.id: recipient for recipient in (StoredRecipient(*row) for row in rows)}
