"""Migrations: the models and the Alembic history agree, and every revision downgrades."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import notifier.db.models  # noqa: F401  (registers the tables)
from notifier import db


async def _diff(url: str) -> list[object]:
    engine = db.create_engine(url)
    try:
        await db.migrate(engine)

        def compare(connection: sa.Connection) -> list[object]:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, SQLModel.metadata))

        async with engine.connect() as connection:
            return await connection.run_sync(compare)
    finally:
        await engine.dispose()


async def test_migrated_schema_matches_the_models(database_url: str) -> None:
    assert await _diff(database_url) == []


async def test_every_revision_downgrades_and_upgrades_again(database_url: str) -> None:
    engine = db.create_engine(database_url)
    try:
        await db.migrate(engine)

        def tables(connection: sa.Connection) -> set[str]:
            return set(sa.inspect(connection).get_table_names())

        def cycle(connection: sa.Connection) -> None:
            config = db.alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "base")

        async with engine.begin() as connection:
            await connection.run_sync(cycle)
        async with engine.connect() as connection:
            assert await connection.run_sync(tables) <= {"alembic_version"}
        assert await db.current_revision(engine) is None
        await db.migrate(engine)
        assert await db.is_migrated(engine)
        async with engine.connect() as connection:
            assert {
                "users",
                "events",
                "deliveries",
                "delivery_attempts",
                "inbox_messages",
            } <= await connection.run_sync(tables)
    finally:
        await engine.dispose()
