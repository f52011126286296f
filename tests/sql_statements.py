"""Which SQL statements an engine's connections run: SQLAlchemy's own and those ``notifier.db.driver`` sends on
the asyncpg connection directly, which SQLAlchemy's cursor events do not see (they are recorded as asyncpg's
``Connection.execute`` and ``Connection.fetch`` are called on a connection of the engine's pool)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

_TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")


class Statement(NamedTuple):
    sql: str
    many: bool  # an executemany
    on_driver: bool  # sent on the asyncpg connection directly, not through SQLAlchemy


@contextlib.contextmanager
def recorded_statements(engine: AsyncEngine, *, this_task_only: bool = False) -> Iterator[list[Statement]]:
    """Collect the statements run from now on, in the order they were sent (with ``this_task_only``, those of
    the calling task)."""
    task = asyncio.current_task() if this_task_only else None
    seen: list[Statement] = []
    pooled: set[Any] = set()  # the asyncpg connections checked out of the engine's pool

    def ours() -> bool:
        return not this_task_only or asyncio.current_task() is task

    def cursor_execute(_conn: Any, _cursor: Any, statement: str, _params: Any, _context: Any, many: bool) -> None:
        if ours():
            seen.append(Statement(statement, many, on_driver=False))

    def recording(method: Any) -> Any:
        # SQLAlchemy's adapter runs its statements through prepared statements and executemany: besides the
        # BEGIN and COMMIT of asyncpg's transactions (not statements of ours), only what the driver module sends
        # comes through these two.
        def record(connection: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            if connection in pooled and ours() and not query.lstrip().upper().startswith(_TRANSACTION_CONTROL):
                seen.append(Statement(query, False, on_driver=True))
            return method(connection, query, *args, **kwargs)

        return record

    def checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        pooled.add(dbapi_connection.driver_connection)

    def checkin(dbapi_connection: Any, _record: Any) -> None:
        if dbapi_connection is not None:
            pooled.discard(dbapi_connection.driver_connection)

    listeners: list[tuple[Any, str, Any]] = [(engine.sync_engine, "before_cursor_execute", cursor_execute)]
    patched: dict[str, Any] = {}
    if engine.dialect.driver == "asyncpg":
        listeners += [(engine.sync_engine.pool, "checkout", checkout), (engine.sync_engine.pool, "checkin", checkin)]
        patched = {name: getattr(asyncpg.Connection, name) for name in ("execute", "fetch")}
    for target, name, listener in listeners:
        sa.event.listen(target, name, listener)
    for name, method in patched.items():
        setattr(asyncpg.Connection, name, recording(method))
    try:
        yield seen
    finally:
        for name, method in patched.items():
            setattr(asyncpg.Connection, name, method)
        for target, name, listener in listeners:
            sa.event.remove(target, name, listener)
