"""Statements run on the session's asyncpg connection itself, inside the session's transaction.

SQLAlchemy's execution layer (the execution context, parameter processing, the adapted cursor, the result
object) costs ~60-150 us of CPU per batch write on top of asyncpg's own work, and more for a read that loads
ORM objects (a claim of one row ~170 us, of 32 rows ~700 us): for the dispatcher's small statements, as much
as the rest of the statement (measured in bench/README.md). ``Prepared`` compiles a SQLAlchemy Core statement
once; ``execute`` sends it with asyncpg's ``Connection.execute``, ``fetch`` with its ``Connection.fetch``: the
values processed as SQLAlchemy would have processed them (e.g. ``UTCDateTime`` refusing naive datetimes, and
making read ones aware), a failure raised as the same ``sqlalchemy.exc`` error SQLAlchemy would have raised,
and the transaction begun and ended as SQLAlchemy's adapter does it, so callers see no difference. Off asyncpg
(SQLite) the statement, or its portable twin, executes through the session as usual.

Statements can also go without a session, on a connection lent straight from the pool (``Lent``): ``alone``
lends one with no transaction open, each statement on it committed by PostgreSQL by itself (a QStash callback's
claim, an outcome write, an inbox batch); ``transaction`` lends one for a transaction of several (accepting an
event, claiming due deliveries). A session costs ~130-170 us of CPU to open, connect and close on top of the
pool's checkout, and ~0.6 ms for an event's or a claim's transaction (measured in bench/README.md): as much as
a small statement itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, NoReturn

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util.concurrency import greenlet_spawn

DIALECT = PGDialect_asyncpg()  # type: ignore[no-untyped-call]  # to compile statements and ask types how they bind


class Prepared:
    """``statement`` compiled once for asyncpg: its SQL text, its parameters' order and their processing, and
    for a SELECT its columns' processing. ``portable``: what runs instead off asyncpg (by default ``statement``),
    for a statement written with PostgreSQL's arrays (``= ANY(:ids)`` where SQLite needs an expanding ``IN``).
    """

    def __init__(self, statement: sa.Executable, *, portable: sa.Executable | None = None) -> None:
        self.portable = statement if portable is None else portable
        self.table: str | None = getattr(getattr(statement, "table", None), "name", None)  # what a write writes
        compiled = statement.compile(dialect=DIALECT)  # type: ignore[attr-defined]
        # A literal list (``status IN ('queued', 'deferred')``) is rendered at execution, one parameter per value
        # (SQLAlchemy's "post-compile" parameters): render it now, once. The other parameters keep their places.
        expanded = compiled.construct_expanded_state(
            {name: None for name, bind in compiled.binds.items() if bind.required}
        )
        self.sql = expanded.statement
        self._order: list[str] = list(expanded.positiontup or ())
        self._fixed: dict[str, Any] = {}  # values bound in the statement itself (literals)
        self._process: dict[str, Callable[[Any], Any]] = {}
        for name in self._order:
            bind = compiled.binds.get(name)
            if bind is None:  # one value of a literal list
                self._fixed[name] = expanded.parameters[name]
                processor = expanded.processors.get(name)
            else:
                if not bind.required:
                    self._fixed[name] = bind.effective_value
                processor = bind.type.dialect_impl(DIALECT).bind_processor(DIALECT)
            if processor is not None:
                self._process[name] = processor
        self._results = [
            (position, processor)
            for position, column in enumerate(compiled._result_columns)
            if (processor := column.type.dialect_impl(DIALECT).result_processor(DIALECT, None)) is not None
        ]

    @classmethod
    def both(cls, build: Callable[[bool], sa.Select[Any] | sa.Update]) -> Prepared:
        """``build(True)`` for the driver, ``build(False)`` as its portable twin (see ``member``)."""
        return cls(build(True), portable=build(False))

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

    def rows(self, records: Sequence[Sequence[Any]]) -> list[Sequence[Any]]:
        """``records`` of the driver with their values processed as SQLAlchemy's result would process them."""
        if not self._results:
            return list(records)
        rows: list[Sequence[Any]] = []
        for record in records:
            row = list(record)
            for position, processor in self._results:
                row[position] = processor(row[position])
            rows.append(row)
        return rows


def member(column: sa.Column[Any], name: str, *, arrays: bool, negated: bool = False) -> sa.ColumnElement[bool]:
    """``column`` among the values of parameter ``name`` (a list): ``= ANY(:name)``, one array parameter, for the
    driver (``arrays``); an expanding ``IN``, one parameter per value, elsewhere. ``negated``: not among them."""
    if arrays:
        values = sa.bindparam(name, type_=postgresql.ARRAY(column.type, dimensions=1))
        return column != sa.all_(values) if negated else column == sa.any_(values)
    listed: sa.BindParameter[Any] = sa.bindparam(name, expanding=True)
    return column.not_in(listed) if negated else column.in_(listed)


class _OnDriver(NamedTuple):
    """A connection to send statements on: SQLAlchemy's asyncpg adapter of it, its dialect, and how to invalidate
    it (the pool then replaces it) when an error left it closed."""

    adapted: Any
    dialect: sa.Dialect
    invalidate: Callable[[BaseException], Awaitable[None]]


class Lent:
    """A connection of the pool lent without a session, by ``alone`` (each statement a transaction of its own,
    committed by PostgreSQL) or by ``transaction`` (its statements one transaction)."""

    def __init__(self, dialect: sa.Dialect, proxied: PoolProxiedConnection) -> None:
        self.on_driver = _OnDriver(proxied.dbapi_connection, dialect, functools.partial(_invalidate, proxied))
        self.info: dict[str, Any] = {}  # as a session's: what a ``together`` block holds


Target = AsyncSession | Lent
"""Where statements run: a session, or a connection lent without one."""


async def _invalidate(proxied: PoolProxiedConnection, error: BaseException) -> None:
    await greenlet_spawn(proxied.invalidate, error)


def _give_back(proxied: PoolProxiedConnection, interrupted: BaseException | None) -> None:
    if interrupted is not None:  # perhaps in the middle of a statement: never lent again
        proxied.invalidate(interrupted)
    elif proxied.dbapi_connection is not None and proxied.dbapi_connection.driver_connection.is_in_transaction():
        proxied.invalidate()  # a transaction left open (a bug): never lent again with it
    proxied.close()  # back to the pool (closed instead, past its size)


@contextlib.asynccontextmanager
async def alone(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[Lent | None]:
    """A connection of ``sessions``' engine for statements that each commit by themselves (``fetch``); None off
    asyncpg, where the caller uses a session. A connection that cannot be had raises as SQLAlchemy would have."""
    engine: AsyncEngine = sessions.kw["bind"]
    dialect = engine.dialect
    if dialect.driver != "asyncpg":
        yield None
        return
    try:
        proxied = await engine.raw_connection()
    except dialect.loaded_dbapi.Error as error:  # as ``Engine.connect`` reports it
        raise sa.exc.DBAPIError.instance(
            None, None, error, dialect.loaded_dbapi.Error, hide_parameters=True, dialect=dialect
        ) from error
    interrupted: BaseException | None = None
    try:
        yield Lent(dialect, proxied)
    except (asyncio.CancelledError, KeyboardInterrupt) as stopped:
        interrupted = stopped
        raise
    finally:
        # Shielded, as SQLAlchemy's sessions close: a cancelled caller still returns the connection.
        await asyncio.shield(greenlet_spawn(_give_back, proxied, interrupted))


@contextlib.asynccontextmanager
async def transaction(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[Target]:
    """One transaction: on asyncpg a lent connection's (BEGIN now, COMMIT when the block ends, ROLLBACK when it
    raises), elsewhere a session's. A ROLLBACK that fails leaves the connection invalidated."""
    async with alone(sessions) as lent:
        if lent is None:
            async with sessions() as session, session.begin():
                yield session
            return
        await _run(lent.on_driver, "BEGIN", [])
        try:
            yield lent
        except Exception:
            try:
                await _run(lent.on_driver, "ROLLBACK", [])
            except Exception as failed:  # e.g. the connection was lost: it must not be lent again
                if not lent.on_driver.adapted.driver_connection.is_closed():
                    await lent.on_driver.invalidate(failed)
            raise
        await _run(lent.on_driver, "COMMIT", [])
        for committed in lent.info.pop(_AFTER_COMMIT, ()):
            committed()


_AFTER_COMMIT = "notifier.db.driver.after_commit"


def after_commit(lent: Lent, callback: Callable[[], None]) -> None:
    """Call ``callback`` once the transaction ``lent`` is in (``transaction``) has committed; never if it rolls
    back. (A session's listeners do this for a session: ``sqlalchemy.event``'s ``after_commit``.)"""
    lent.info.setdefault(_AFTER_COMMIT, []).append(callback)


_TOGETHER = "notifier.db.driver.together"  # the session.info key of the writes a ``together`` block holds


async def execute(session: Target, prepared: Prepared, params: Mapping[str, Any]) -> None:
    """Run ``prepared`` with ``params`` in ``session``'s transaction, on the driver when it can (see above); in a
    ``together`` block, at its end."""
    held: list[tuple[Prepared, list[Any]]] | None = session.info.get(_TOGETHER)
    if held is not None:
        held.append((prepared, prepared.arguments(params)))
        return
    if isinstance(session, Lent):
        await _run(session.on_driver, prepared.sql, prepared.arguments(params))
        return
    on_driver = await _driver(session)
    if on_driver is None:
        await session.execute(prepared.portable, params)
        return
    await _run(on_driver, prepared.sql, prepared.arguments(params))


@contextlib.asynccontextmanager
async def together(session: Target) -> AsyncIterator[None]:
    """Send the writes ``execute`` gets in this block as one statement when the block ends (PostgreSQL's
    data-modifying ``WITH`` parts, ``WITH w0 AS (UPDATE ...), w1 AS (INSERT ...) INSERT ...``): one round trip
    instead of one per write. For consecutive writes of distinct tables none of which needs to see another's rows
    (the parts of one statement see the same snapshot); nothing else may run on the session inside the block.
    Writes of one table twice go one by one. Off asyncpg, and nested, the writes run as they come. A block left
    by an exception sends nothing (its transaction is rolled back).
    """
    if session.info.get(_TOGETHER) is not None:
        on_driver = None
    else:
        on_driver = session.on_driver if isinstance(session, Lent) else await _driver(session)
    if on_driver is None:
        yield
        return
    held: list[tuple[Prepared, list[Any]]] = []
    session.info[_TOGETHER] = held
    try:
        yield
    finally:
        del session.info[_TOGETHER]
    tables = [prepared.table for prepared, _ in held]
    if len(held) < 2 or None in tables or len(set(tables)) < len(tables):
        for prepared, arguments in held:
            await _run(on_driver, prepared.sql, arguments)
        return
    sql = _combined(tuple((prepared.sql, len(arguments)) for prepared, arguments in held))
    await _run(on_driver, sql, [value for _, arguments in held for value in arguments])


_PARAMETER = re.compile(r"\$(\d+)")  # asyncpg's numbered parameters; our statements hold no "$" otherwise


def _shifted(match: re.Match[str], *, offset: int) -> str:
    return f"${int(match.group(1)) + offset}"


@functools.lru_cache(maxsize=256)
def _combined(parts: tuple[tuple[str, int], ...]) -> str:
    """One statement of the write statements ``parts`` (SQL with ``$n`` parameters, and how many), the
    parameters of each part numbered after those of the parts before it."""
    renumbered: list[str] = []
    offset = 0
    for sql, count in parts:
        renumbered.append(_PARAMETER.sub(functools.partial(_shifted, offset=offset), sql))
        offset += count
    *first, last = renumbered
    return "WITH " + ", ".join(f"w{i} AS ({sql})" for i, sql in enumerate(first)) + "\n" + last


async def _run(on_driver: _OnDriver, sql: str, arguments: Sequence[Any], *, fetch: bool = False) -> Any:
    """Send ``sql`` on the driver (``fetch``: and return its records), a failure raised as SQLAlchemy's error."""
    send = on_driver.adapted.driver_connection.fetch if fetch else on_driver.adapted.driver_connection.execute
    try:
        return await send(sql, *arguments)
    except Exception as error:
        await _raise_translated(on_driver, sql, error)


async def fetch(session: Target, prepared: Prepared, params: Mapping[str, Any]) -> list[Sequence[Any]]:
    """The rows of the SELECT (or ``... RETURNING``) ``prepared`` with ``params``, run in ``session``'s transaction
    on the driver when it can (see above), each value processed as SQLAlchemy's result would have processed it.
    On a ``Lent`` connection it is sent as it is: a transaction of its own when ``alone`` lent the connection
    (PostgreSQL commits it by itself), a part of the one ``transaction`` began.
    """
    if isinstance(session, Lent):
        return prepared.rows(await _run(session.on_driver, prepared.sql, prepared.arguments(params), fetch=True))
    on_driver = await _driver(session)
    if on_driver is None:
        return list((await session.execute(prepared.portable, params)).all())
    return prepared.rows(await _run(on_driver, prepared.sql, prepared.arguments(params), fetch=True))


async def _driver(session: AsyncSession) -> _OnDriver | None:
    """``session``'s connection and SQLAlchemy's asyncpg adapter of it, its transaction begun; None off asyncpg.

    The adapter begins a transaction lazily, before the first statement it runs itself, and commits or rolls back
    the one it began when the session does (nothing, when it began none). A transaction whose first statement
    goes to the driver is begun the same way, with the adapter's own ``_start_transaction`` (as its cursor does):
    so the session still ends it.

    Asking the session for its connection costs two greenlet switches (~50-100 us of CPU, measured in
    bench/README.md), so the answer is kept for the rest of the session's transaction: its connection cannot change
    before the transaction ends, and a connection closed meanwhile (a lost server) is asked for anew.
    """
    if getattr(getattr(session.bind, "dialect", None), "driver", "asyncpg") != "asyncpg":
        return None
    transaction = session.sync_session.get_transaction()
    kept: tuple[object, _OnDriver] | None = session.info.get(_CONNECTION)
    if kept is not None and transaction is not None and kept[0] is transaction and not _closed(kept[1]):
        on_driver = kept[1]
    else:
        connection = await session.connection()
        if connection.dialect.driver != "asyncpg":
            return None
        adapted = (await connection.get_raw_connection()).dbapi_connection
        on_driver = _OnDriver(adapted, connection.dialect, connection.invalidate)
        session.info[_CONNECTION] = (session.sync_session.get_transaction(), on_driver)
    if on_driver.adapted._transaction is None:
        try:
            await on_driver.adapted._start_transaction()
        except Exception as error:  # e.g. a connection the server closed: invalidated, as SQLAlchemy would
            await _raise_translated(on_driver, "BEGIN", error)
    return on_driver


_CONNECTION = "notifier.db.driver.connection"  # session.info: (the session transaction, its connection and adapter)


def _closed(on_driver: _OnDriver) -> bool:
    closed: bool = on_driver.adapted.driver_connection.is_closed()
    return closed


async def _raise_translated(on_driver: _OnDriver, sql: str, error: Exception) -> NoReturn:
    """Raise ``error`` of the driver as the ``sqlalchemy.exc`` error SQLAlchemy would have raised for it."""
    adapted, dialect = on_driver.adapted, on_driver.dialect
    try:
        adapted._handle_exception(error)  # raises asyncpg's error translated into the adapter's DB-API error
    except Exception as dbapi_error:
        # As SQLAlchemy handles a failed statement: a connection the error left closed is invalidated (the
        # pool replaces it; it is never handed out again), and the error says so.
        lost = dialect.is_disconnect(dbapi_error, adapted, None)  # type: ignore[arg-type]
        if lost:
            await on_driver.invalidate(dbapi_error)
        raise sa.exc.DBAPIError.instance(
            sql,
            None,  # no values in the error: they never reach messages or logs
            dbapi_error,
            dialect.loaded_dbapi.Error,
            hide_parameters=True,
            connection_invalidated=lost,
            dialect=dialect,
        ) from error
    raise AssertionError("unreachable: _handle_exception always raises")  # pragma: no cover
