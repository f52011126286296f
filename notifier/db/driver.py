"""Statements run on the session's asyncpg connection itself, inside the session's transaction.

SQLAlchemy's execution layer (the execution context, parameter processing, the adapted cursor, the result
object) costs ~60-150 us of CPU per statement on top of asyncpg's own work, which for the dispatcher's small
batch writes was as much as the rest of the statement (measured in bench/README.md). ``Prepared`` compiles a
SQLAlchemy Core statement once; ``execute`` sends it with asyncpg's ``Connection.execute``, the values
processed as SQLAlchemy would have processed them (e.g. ``UTCDateTime`` refusing naive datetimes), and a
failure raised as the same ``sqlalchemy.exc`` error SQLAlchemy would have raised, so callers see no
difference. It runs only on PostgreSQL and inside a transaction SQLAlchemy has begun on the connection; in
any other case it executes through the session as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

DIALECT = PGDialect_asyncpg()  # type: ignore[no-untyped-call]  # to compile statements and ask types how they bind


class Prepared:
    """``statement`` compiled once for asyncpg: its SQL text, its parameters' order and their processing."""

    def __init__(self, statement: sa.Executable) -> None:
        self.statement = statement
        compiled = statement.compile(dialect=DIALECT)  # type: ignore[attr-defined]
        self.sql = str(compiled)
        self._order: list[str] = list(compiled.positiontup or ())
        self._fixed: dict[str, Any] = {}  # values bound in the statement itself (literals)
        self._process: dict[str, Callable[[Any], Any]] = {}
        for name in self._order:
            bind = compiled.binds[name]
            if not bind.required:
                self._fixed[name] = bind.effective_value
            processor = bind.type.dialect_impl(DIALECT).bind_processor(DIALECT)
            if processor is not None:
                self._process[name] = processor

    def arguments(self, params: Mapping[str, Any]) -> list[Any]:
        """The positional arguments for ``params`` (the statement's own literals filled in), processed."""
        values = [params[name] if name in params else self._fixed[name] for name in self._order]
        for position, name in enumerate(self._order):
            processor = self._process.get(name)
            if processor is not None:
                try:
                    values[position] = processor(values[position])
                except Exception as exc:  # as SQLAlchemy reports a value its type refuses
                    raise sa.exc.StatementError(str(exc), self.sql, None, exc) from exc
        return values


async def execute(session: AsyncSession, prepared: Prepared, params: Mapping[str, Any]) -> None:
    """Run ``prepared`` with ``params`` in ``session``'s transaction, on the driver when it can (see above)."""
    connection = await session.connection()
    adapted: Any = None  # SQLAlchemy's asyncpg adapter of the connection
    if connection.dialect.driver == "asyncpg":
        adapted = (await connection.get_raw_connection()).dbapi_connection
    # SQLAlchemy's adapter begins the transaction with the first statement it runs itself: let it.
    if adapted is None or not adapted.driver_connection.is_in_transaction():
        await session.execute(prepared.statement, params)
        return
    driver = adapted.driver_connection
    arguments = prepared.arguments(params)
    try:
        await driver.execute(prepared.sql, *arguments)
    except Exception as error:
        dialect = connection.dialect
        try:
            adapted._handle_exception(error)  # raises asyncpg's error translated into the adapter's DB-API error
        except Exception as dbapi_error:
            # As SQLAlchemy handles a failed statement: a connection the error left closed is invalidated (the
            # pool replaces it; it is never handed out again), and the error says so.
            lost = dialect.is_disconnect(dbapi_error, adapted, None)  # type: ignore[arg-type]
            if lost:
                await connection.invalidate(dbapi_error)
            raise sa.exc.DBAPIError.instance(
                prepared.sql,
                None,  # no values in the error: they never reach messages or logs
                dbapi_error,
                dialect.loaded_dbapi.Error,
                hide_parameters=True,
                connection_invalidated=lost,
                dialect=dialect,
            ) from error
        raise  # pragma: no cover  # _handle_exception always raises
