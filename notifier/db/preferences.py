"""Queries on preference documents (a user's, or an organization's defaults) and their history. None commits.

Every write is a compare-and-swap on ``version`` (``UPDATE … WHERE version = :expected``; the first write
is an INSERT whose unique violation counts as a lost race), so of concurrent writers with the same expected
version exactly one wins.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from notifier.db import driver, users
from notifier.db.models import ORGANIZATION_PREFERENCES, PREFERENCE_CHANGES, PREFERENCES, PreferenceChange

Cursor = tuple[dt.datetime, uuid.UUID]


class LostRace(Exception):
    """Raised by ``compare_and_swap`` when another writer changed the document since it was read."""


@dataclass(frozen=True)
class Subject:
    """Whose document: a user's own, or an organization's defaults."""

    kind: Literal["user", "organization"]
    id: str

    @property
    def _table(self) -> sa.Table:
        return PREFERENCES if self.kind == "user" else ORGANIZATION_PREFERENCES

    @property
    def _key(self) -> sa.ColumnElement[bool]:
        column = PREFERENCES.c.user_id if self.kind == "user" else ORGANIZATION_PREFERENCES.c.organization_id
        return column == self.id


async def load(session: AsyncSession, *, subject: Subject) -> tuple[dict[str, Any] | None, int]:
    """The stored document (None when there is none) and its version (0 when there is none)."""
    table = subject._table
    row = (await session.execute(sa.select(table.c.document, table.c.version).where(subject._key))).one_or_none()
    return (None, 0) if row is None else (dict(row[0]), int(row[1]))


async def compare_and_swap(
    session: AsyncSession, *, subject: Subject, document: Mapping[str, Any], expected: int, now: dt.datetime
) -> None:
    """Store ``document`` as version ``expected + 1`` if the stored version is still ``expected``.

    Raises ``LostRace`` otherwise (then the transaction must be abandoned). The first document of a user
    also creates the user's row.
    """
    table = subject._table
    if expected > 0:
        result = await session.execute(
            sa.update(table)
            .where(subject._key, table.c.version == expected)
            .values(document=dict(document), version=expected + 1, updated_at=now)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise LostRace
        return
    if subject.kind == "user":
        await users.ensure(session, user_ids=[subject.id], now=now)
        key = {"user_id": subject.id}
    else:
        key = {"organization_id": subject.id}
    try:
        await session.execute(sa.insert(table).values(**key, document=dict(document), version=1, updated_at=now))
    except IntegrityError as exc:  # the transaction is spoilt: the caller starts over in a new one
        raise LostRace from exc


async def add_change(
    session: AsyncSession,
    *,
    subject: Subject,
    changed_by: str,
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    version: int,
    now: dt.datetime,
) -> None:
    """Append one row to the subject's preference history."""
    await session.execute(
        sa.insert(PREFERENCE_CHANGES).values(
            id=uuid.uuid4(),
            subject_kind=subject.kind,
            subject_id=subject.id,
            changed_by=changed_by,
            old_document=dict(old) if old is not None else None,
            new_document=dict(new),
            version=version,
            changed_at=now,
        )
    )


async def history(
    session: AsyncSession, *, subject: Subject, cursor: Cursor | None, limit: int
) -> tuple[list[PreferenceChange], Cursor | None]:
    """The subject's changes newest first, and where the next page starts (None on the last)."""
    statement = (
        sa.select(PreferenceChange)
        .where(
            PREFERENCE_CHANGES.c.subject_kind == subject.kind,
            PREFERENCE_CHANGES.c.subject_id == subject.id,
        )
        .order_by(PREFERENCE_CHANGES.c.changed_at.desc(), PREFERENCE_CHANGES.c.id.desc())
        .limit(limit + 1)
    )
    if cursor is not None:
        statement = statement.where(
            sa.tuple_(PREFERENCE_CHANGES.c.changed_at, PREFERENCE_CHANGES.c.id) < sa.tuple_(*cursor)
        )
    changes = list((await session.execute(statement)).scalars())
    shown = changes[:limit]
    return shown, (shown[-1].changed_at, shown[-1].id) if len(changes) > limit else None


_ORGANIZATION_DOCUMENTS = driver.Prepared.both(
    lambda arrays: sa.select(ORGANIZATION_PREFERENCES.c.organization_id, ORGANIZATION_PREFERENCES.c.document).where(
        driver.member(ORGANIZATION_PREFERENCES.c.organization_id, "ids", arrays=arrays)
    )
)


async def organization_documents(
    session: driver.Target, *, organization_ids: Iterable[str]
) -> dict[str, Mapping[str, Any]]:
    """The stored default documents of these organizations, by organization id (absent: none stored)."""
    ids = [i for i in dict.fromkeys(organization_ids) if i]
    if not ids:
        return {}
    rows = await driver.fetch(session, _ORGANIZATION_DOCUMENTS, {"ids": ids})
    return {str(organization_id): document for organization_id, document in rows}
