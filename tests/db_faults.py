"""Database faults for tests: a database that refuses writes to one table, on SQLite and PostgreSQL alike (the last
write of a transaction fails after the earlier ones succeeded, the case a rollback must undo); a PostgreSQL server
process ended under a pooled connection."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

REFUSAL = "refused by the test"


@contextlib.asynccontextmanager
async def inserts_refused(engine: AsyncEngine, table: str) -> AsyncIterator[None]:
    """Meanwhile every INSERT into ``table`` fails with ``REFUSAL`` (a trigger, dropped on the way out)."""
    if engine.dialect.name == "sqlite":
        create = [f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END"]
        drop = [f"DROP TRIGGER refuse_{table}"]
    else:
        create = [
            f"CREATE FUNCTION refuse_{table}() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{REFUSAL}'; END $$",
            f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION refuse_{table}()",
        ]
        drop = [f"DROP TRIGGER refuse_{table} ON {table}", f"DROP FUNCTION refuse_{table}()"]
    async with engine.begin() as conn:
        for statement in create:
            await conn.execute(sa.text(statement))
    try:
        yield
    finally:
        async with engine.begin() as conn:
            for statement in drop:
                await conn.execute(sa.text(statement))


def dsn_of(url: str) -> str:
    """asyncpg's form of a SQLAlchemy PostgreSQL URL."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def backend_pid(session: AsyncSession) -> int:
    return int((await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())


async def end_backend(pid: int, postgres_url: str) -> None:
    """Terminate a server process from another connection, as a server restart or ``pg_terminate_backend`` does: the
    pooled connection it served does not know yet."""
    admin = await asyncpg.connect(dsn_of(postgres_url))
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
