"""A database that refuses writes to one table, on SQLite and PostgreSQL alike: the last write of a transaction
fails after the earlier ones succeeded, the case a rollback must undo."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

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
