"""The service's PostgreSQL pool keeps ``NOTIFIER_DB_POOL_SIZE`` connections open: a burst above it opens up to as
many again, and those are closed when they are returned (a connection opened anew is costly: bench/README.md)."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from tests.conftest import make_settings, running_service


@pytest.mark.postgres_only
async def test_the_pool_keeps_its_size_and_a_burst_opens_as_many_again(postgres_url: str) -> None:
    # Without the embedded dispatcher nothing else of the service holds a pooled connection meanwhile.
    settings = make_settings(postgres_url, db_pool_size=3, embedded_dispatcher=False)
    async with running_service(settings) as service:
        engine = service.runtime.engine
        held = asyncio.Event()
        checked_out: list[int] = []

        async def hold() -> None:
            async with engine.connect() as connection:
                await connection.execute(sa.text("SELECT 1"))
                checked_out.append(engine.pool.checkedout())  # type: ignore[attr-defined]
                await held.wait()

        burst = [asyncio.create_task(hold()) for _ in range(6)]
        while len(checked_out) < 6:
            await asyncio.sleep(0.01)
        assert engine.pool.size() == 3  # type: ignore[attr-defined]
        assert max(checked_out) == 6  # three kept and three more: nobody waited
        held.set()
        await asyncio.gather(*burst)
        assert engine.pool.checkedin() == 3  # type: ignore[attr-defined]
