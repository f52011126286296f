"""What the query modules share: the INSERT that knows ON CONFLICT for the session's dialect."""

from __future__ import annotations

from collections.abc import Mapping
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


def every_column(dialect: str, table: sa.Table) -> Any:
    """``insert_for(dialect, table)`` with every column a bound parameter of its own name: one statement text for
    any row (``with_defaults``), to compile once (``driver.Prepared``)."""
    return insert_for(dialect, table).values({c.name: sa.bindparam(c.name, type_=c.type) for c in table.c})


def with_defaults(table: sa.Table, row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` with the columns it leaves out given their Python defaults (a function's value, a constant) or
    NULL, as SQLAlchemy fills an INSERT that does not name them."""
    filled = {}
    for column in table.c:
        if column.name in row:
            continue
        default = column.default
        if isinstance(default, sa.ColumnDefault) and default.is_callable:
            filled[column.name] = default.arg(None)  # wrapped by SQLAlchemy to take an execution context
        else:
            filled[column.name] = default.arg if isinstance(default, sa.ColumnDefault) else None
    return {**filled, **row}


def dialect_insert(session: AsyncSession, table: sa.Table) -> Any:
    """``insert_for`` the dialect of ``session``."""
    return insert_for(dialect_of(session), table)
