"""The one edge where the driver's "the database cannot serve now" becomes ``NotReady`` (``db.unavailable``), by
table: every connection-level error is translated, and no error that is our bug is."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from notifier import db
from notifier.errors import NotReady
from tests.db_faults import backend_pid, end_backend
from tests.fakes.base import free_port


class DriverError(Exception):
    """Shaped like asyncpg's errors (and SQLAlchemy's adaptation of them): a ``sqlstate``."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"SQLSTATE {sqlstate}")
        self.sqlstate = sqlstate


def wrapped(orig: BaseException, *, invalidated: bool = False) -> sa.exc.DBAPIError:
    return sa.exc.DBAPIError("SELECT 1", {}, orig, connection_invalidated=invalidated)


def caused(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


def sqlite_error(code: str) -> sqlite3.Error:
    """A real sqlite3 error of each kind the table needs (they carry ``sqlite_errorcode``)."""
    with tempfile.TemporaryDirectory() as directory:
        path = str(Path(directory) / "locked.db")
        try:
            if code == "busy":
                holder = sqlite3.connect(path, isolation_level=None)
                holder.execute("CREATE TABLE t (x)")
                holder.execute("BEGIN EXCLUSIVE")
                try:
                    with contextlib.closing(sqlite3.connect(path, timeout=0)) as waiting:
                        waiting.execute("SELECT * FROM t")
                finally:
                    holder.close()
            elif code == "cantopen":
                sqlite3.connect(str(Path(directory) / "missing" / "notifier.db"))
            else:
                with contextlib.closing(sqlite3.connect(":memory:")) as memory:
                    memory.execute("SELECT * FROM no_such_table")
        except sqlite3.Error as exc:
            return exc
    raise AssertionError(f"no sqlite3 error for {code}")


UNAVAILABLE = {
    "NotReady from the connect hook (refused, unreachable, timed out)": lambda: NotReady("the database is unreachable"),
    "no pooled connection free in time": lambda: sa.exc.TimeoutError("QueuePool limit of size 10 overflow 10 reached"),
    "a connection invalidated under its statement": lambda: wrapped(
        Exception("connection is closed"), invalidated=True
    ),
    "08003 connection does not exist": lambda: wrapped(DriverError("08003")),
    "08006 connection failure": lambda: wrapped(DriverError("08006")),
    "53300 too many connections": lambda: wrapped(DriverError("53300")),
    "53200 out of memory": lambda: wrapped(DriverError("53200")),
    "57P01 admin shutdown (pg_terminate_backend, pg_ctl stop)": lambda: wrapped(DriverError("57P01")),
    "57P02 crash shutdown": lambda: wrapped(DriverError("57P02")),
    "57P03 cannot connect now (starting up)": lambda: wrapped(DriverError("57P03")),
    "the driver's error as the cause of the adapter's": lambda: wrapped(caused(Exception("x"), DriverError("57P01"))),
    "raised while handling a lost connection": lambda: caused(
        RuntimeError("rollback failed"), wrapped(Exception(), invalidated=True)
    ),
    "SQLite locked past the busy timeout": lambda: sa.exc.OperationalError("SELECT 1", {}, sqlite_error("busy")),
    "SQLite file that cannot be opened": lambda: sa.exc.OperationalError("SELECT 1", {}, sqlite_error("cantopen")),
}
OUR_BUG = {
    "42P01 undefined table": lambda: wrapped(DriverError("42P01")),
    "42601 syntax error": lambda: wrapped(DriverError("42601")),
    "23505 unique violation": lambda: wrapped(DriverError("23505")),
    "22021 NUL in text": lambda: wrapped(DriverError("22021")),
    "22001 value too long": lambda: wrapped(DriverError("22001")),
    "SQLite no such table": lambda: sa.exc.OperationalError("SELECT 1", {}, sqlite_error("missing")),
    "a programming error": lambda: sa.exc.ProgrammingError("SELECT 1", {}, Exception("bad")),
    "an OSError from elsewhere (not the connect hook)": lambda: ConnectionRefusedError(111, "refused"),
    "a plain bug": lambda: ValueError("bug"),
    "a context that was suppressed": lambda: _suppressed(),
}


def _suppressed() -> BaseException:
    try:
        try:
            raise wrapped(DriverError("57P01"))
        except sa.exc.DBAPIError:
            raise ValueError("unrelated") from None
    except ValueError as exc:
        return exc


@pytest.mark.parametrize("make", UNAVAILABLE.values(), ids=UNAVAILABLE.keys())
def test_connection_level_errors_become_not_ready(make: Callable[[], BaseException]) -> None:
    error = make()
    assert db.unavailable(error)
    with pytest.raises(NotReady) as raised, db.unavailable_as_not_ready():
        raise error
    assert raised.value.retry_after > 0
    assert "SELECT" not in raised.value.detail  # never the driver's words
    assert "QueuePool" not in raised.value.detail


@pytest.mark.parametrize("make", OUR_BUG.values(), ids=OUR_BUG.keys())
def test_errors_that_are_our_bug_pass_through(make: Callable[[], BaseException]) -> None:
    error = make()
    assert db.unavailable(error) is None
    with pytest.raises(type(error)), db.unavailable_as_not_ready():
        raise error


async def test_a_refused_connection_is_not_ready() -> None:
    engine = db.create_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing")
    try:
        with pytest.raises(NotReady) as raised:
            async with db.create_session_factory(engine)() as session:
                await session.execute(sa.text("SELECT 1"))
    finally:
        await engine.dispose()
    assert isinstance(raised.value.__cause__, OSError)


async def test_a_backend_killed_mid_statement_is_unavailable(postgres_url: str) -> None:
    engine = db.create_engine(postgres_url)
    try:
        async with db.create_session_factory(engine)() as session:
            pid = await backend_pid(session)
            sleeping = asyncio.ensure_future(session.execute(sa.text("SELECT pg_sleep(5)")))
            await asyncio.sleep(0.3)
            await end_backend(pid, postgres_url)
            with pytest.raises(sa.exc.DBAPIError) as raised:
                await sleeping
        assert db.unavailable(raised.value) == "the database connection was lost"
    finally:
        await engine.dispose()
