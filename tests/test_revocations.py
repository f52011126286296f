"""``db.revocations``: an id is revoked once (the unique key decides), and dead rows are purged as new ones arrive,
a bounded batch at a time. SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from notifier import db
from notifier.db import revocations
from notifier.db.models import REVOKED_CREDENTIALS
from notifier.db.revocations import PURGE_BATCH, CredentialKind
from notifier.types import utcnow
from tests.conftest import Sessions
from tests.sql_statements import recorded_statements

SIGNATURE, SESSION = CredentialKind.qstash_signature, CredentialKind.dashboard_session


async def revoke(sessions: Sessions, kind: CredentialKind, credential_id: str, expires_at: dt.datetime) -> bool:
    async with sessions() as session, session.begin():
        return await revocations.revoke(
            session, kind=kind, credential_id=credential_id, expires_at=expires_at, now=utcnow()
        )


async def count(sessions: Sessions) -> int:
    async with sessions() as session:
        return int(await session.scalar(sa.select(sa.func.count()).select_from(REVOKED_CREDENTIALS)) or 0)


async def test_an_id_is_revoked_once_per_kind_and_then_known(sessions: Sessions) -> None:
    later = utcnow() + dt.timedelta(minutes=5)
    assert await revoke(sessions, SIGNATURE, "jwt_abc", later) is True
    assert await revoke(sessions, SIGNATURE, "jwt_abc", later) is False
    assert await revoke(sessions, SESSION, "jwt_abc", later) is True  # another kind: another id
    async with sessions() as session:
        assert await revocations.is_revoked(session, kind=SIGNATURE, credential_id="jwt_abc")
        assert not await revocations.is_revoked(session, kind=SIGNATURE, credential_id="jwt_other")


async def test_dead_rows_are_purged_by_later_inserts_a_batch_at_a_time(sessions: Sessions) -> None:
    past, later = utcnow() - dt.timedelta(seconds=1), utcnow() + dt.timedelta(hours=8)
    rows = [
        {"kind": str(SIGNATURE), "credential_id": f"old-{n}", "expires_at": past, "revoked_at": past}
        for n in range(PURGE_BATCH + 5)
    ]
    async with sessions() as session, session.begin():
        await session.execute(sa.insert(REVOKED_CREDENTIALS), rows)
    await revoke(sessions, SESSION, "live-session", later)
    assert await count(sessions) == 5 + 1  # one batch of dead rows went; the live one stays
    await revoke(sessions, SIGNATURE, "jwt_new", later)
    assert await count(sessions) == 2
    async with sessions() as session:
        assert await revocations.is_revoked(session, kind=SESSION, credential_id="live-session")


@pytest.mark.postgres_only
async def test_a_revocation_is_one_statement_on_the_driver(postgres_engine: AsyncEngine) -> None:
    # Every signed QStash request spends its signature: the purge and the insert go in one round trip.
    sessions = db.create_session_factory(postgres_engine)
    past, later = utcnow() - dt.timedelta(seconds=1), utcnow() + dt.timedelta(hours=8)
    async with sessions() as session, session.begin():
        await session.execute(
            sa.insert(REVOKED_CREDENTIALS),
            [{"kind": str(SIGNATURE), "credential_id": "dead", "expires_at": past, "revoked_at": past}],
        )
    with recorded_statements(postgres_engine) as statements:
        assert await revoke(sessions, SIGNATURE, "jwt_one", later) is True
    assert [(s.sql.split()[0], s.on_driver) for s in statements] == [("WITH", True)]
    assert await revoke(sessions, SIGNATURE, "jwt_one", later) is False
    async with sessions() as session:
        kept = (await session.execute(sa.select(REVOKED_CREDENTIALS.c.credential_id))).scalars().all()
    assert kept == ["jwt_one"]  # the dead one was purged by the same statement
