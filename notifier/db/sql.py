"""What the query modules share: the INSERT that knows ON CONFLICT for the session's dialect."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from notifier.db import driver


def dialect_of(session: driver.Target) -> str:
    """``postgresql`` or ``sqlite``: the dialect of the engine ``session`` is bound to (a connection lent
    without a session is always PostgreSQL's: ``driver.alone``)."""
    if isinstance(session, driver.Lent) or session.bind is None:
        return "postgresql"
    return session.bind.dialect.name


def insert_for(dialect: str, table: sa.Table) -> Any:
    """An INSERT into ``table`` that knows ON CONFLICT, for ``dialect`` (built once and cached by callers)."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def dialect_insert(session: AsyncSession, table: sa.Table) -> Any:
    """``insert_for`` the dialect of ``session``."""
    return insert_for(dialect_of(session), table)
