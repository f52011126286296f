"""Which SQL statements an engine's connections run: SQLAlchemy's own and those ``notifier.db.driver`` sends on
the asyncpg connection directly, which SQLAlchemy's cursor events do not see (asyncpg's query logger does)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

_TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")
_INTROSPECTION = ("current_setting('jit')", "set_config('jit'", "typeinfo_tree")


class Statement(NamedTuple):
    sql: str
    many: bool  # an executemany
    on_driver: bool  # sent on the asyncpg connection directly, not through SQLAlchemy


@contextlib.contextmanager
def recorded_statements(engine: AsyncEngine, *, this_task_only: bool = False) -> Iterator[list[Statement]]:
    """Collect the statements run from now on, in order (with ``this_task_only``, those of the calling task).

    asyncpg reports a statement once it is done, on the next turn of the event loop; the statements of one
    connection keep their order.
    """
    task = asyncio.current_task() if this_task_only else None
    seen: list[Statement] = []

    def ours() -> bool:
        return not this_task_only or asyncio.current_task() is task

    executemany: set[str] = set()  # SQLAlchemy runs these with asyncpg's executemany, which asyncpg logs too

    def cursor_execute(_conn: Any, _cursor: Any, statement: str, _params: Any, _context: Any, many: bool) -> None:
        if many:
            executemany.add(statement)
        if ours():
            seen.append(Statement(statement, many, on_driver=False))

    def logged(query: Any) -> None:
        # asyncpg runs SQLAlchemy's BEGIN and COMMIT as plain statements, and its own type introspection (once
        # per connection and type, for SQLAlchemy's statements too): neither is a statement of ours.
        sql = query.query
        counted = sql not in executemany and not sql.lstrip().upper().startswith(_TRANSACTION_CONTROL)
        if counted and not any(marker in sql for marker in _INTROSPECTION):
            seen.append(Statement(sql, False, on_driver=True))

    def checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if ours():
            dbapi_connection.driver_connection.add_query_logger(logged)

    def checkin(dbapi_connection: Any, _record: Any) -> None:
        if dbapi_connection is not None and hasattr(dbapi_connection.driver_connection, "remove_query_logger"):
            dbapi_connection.driver_connection.remove_query_logger(logged)

    listeners: list[tuple[Any, str, Any]] = [(engine.sync_engine, "before_cursor_execute", cursor_execute)]
    if engine.dialect.driver == "asyncpg":
        listeners += [(engine.sync_engine.pool, "checkout", checkout), (engine.sync_engine.pool, "checkin", checkin)]
    for target, name, listener in listeners:
        sa.event.listen(target, name, listener)
    try:
        yield seen
    finally:
        for target, name, listener in listeners:
            sa.event.remove(target, name, listener)
