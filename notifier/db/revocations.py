"""Queries on revoked credentials: ids refused until the credential they name would have expired anyway. None of
them commits.

Two kinds share the table: a QStash signature's ``jti``, revoked by its first use so that a captured request
cannot be replayed, and a dashboard session's nonce, revoked when the operator signs out. Both are in the
database, not in memory, so every replica refuses them.

Dead rows (past ``expires_at``: the credential's own expiry refuses it now) are purged on insert: ``revoke``
first deletes up to ``PURGE_BATCH`` of them, so the table holds the live revocations plus what expired since the
last insert, without a cron job. On PostgreSQL the purge skips rows another transaction is deleting
(``SKIP LOCKED``), so concurrent signed requests never wait on each other's purge.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession

from notifier.db import driver
from notifier.db.models import REVOKED_CREDENTIALS
from notifier.db.sql import dialect_of, insert_for
from notifier.types import utcnow

PURGE_BATCH = 100
"""Dead revocations deleted per ``revoke`` at most; each revoke adds one row, so dead rows cannot pile up."""

_T = REVOKED_CREDENTIALS


class CredentialKind(StrEnum):
    """What a revoked id names."""

    qstash_signature = "qstash_signature"  # an Upstash-Signature's jti: spent by its first use (no replays)
    dashboard_session = "dashboard_session"  # a dashboard session cookie's nonce: ended by signing out


@functools.cache
def _insert_statement(dialect: str) -> Any:
    return insert_for(dialect, _T).on_conflict_do_nothing(index_elements=["kind", "credential_id"])


_DEAD = (
    sa.select(_T.c.kind, _T.c.credential_id)
    .where(_T.c.expires_at < sa.bindparam("now"))
    .order_by(_T.c.expires_at)
    .limit(PURGE_BATCH)
    .with_for_update(skip_locked=True)  # PostgreSQL; SQLite has one writer and ignores it
)
# Built once (every signed QStash request runs it): building it per call cost ~75 us of CPU.
_PURGE = sa.delete(_T).where(sa.tuple_(_T.c.kind, _T.c.credential_id).in_(_DEAD))
# On PostgreSQL the purge and the insert are one statement on the driver (the purge a data-modifying WITH part):
# one round trip, where the two through the session cost ~250 us of client CPU more, on every signed request.
# They cannot touch one row twice: the purge deletes expired revocations, and a credential is refused before it
# is spent once it has expired.
_FIRST_USE_PG = (
    postgresql.insert(_T)
    .values(
        kind=sa.bindparam("kind", type_=_T.c.kind.type),
        credential_id=sa.bindparam("credential_id", type_=_T.c.credential_id.type),
        expires_at=sa.bindparam("expires_at", type_=_T.c.expires_at.type),
        revoked_at=sa.bindparam("now", type_=_T.c.revoked_at.type),
    )
    .on_conflict_do_nothing(index_elements=["kind", "credential_id"])
    .returning(_T.c.credential_id)
)
_REVOKE_PG = driver.Prepared(_FIRST_USE_PG.add_cte(_PURGE.cte("purged")))


def revoking_parts() -> tuple[sa.CTE, sa.CTE]:
    """``revoke`` as two ``WITH`` parts of another PostgreSQL statement, with the same parameters (``kind``,
    ``credential_id``, ``expires_at``, ``now``): the purge, and the insert, which returns the id on first use only
    (a part conditioned on it runs only then). Both are data-modifying: they run whether read or not."""
    return _PURGE.cte("purged"), _FIRST_USE_PG.cte("first_use")


async def revoke(
    session: AsyncSession, *, kind: CredentialKind, credential_id: str, expires_at: dt.datetime, now: dt.datetime
) -> bool:
    """Revoke ``credential_id`` until ``expires_at``; return True, or False if it was revoked already (unchanged).

    The unique key decides, so of two concurrent calls for one id exactly one returns True. Deletes up to
    ``PURGE_BATCH`` revocations that expired before ``now`` first.
    """
    if dialect_of(session) == "postgresql":
        params = {"kind": str(kind), "credential_id": credential_id, "expires_at": expires_at, "now": now}
        return bool(await driver.fetch(session, _REVOKE_PG, params))
    await session.execute(_PURGE, {"now": now})
    result = await session.execute(
        _insert_statement(dialect_of(session)),
        {"kind": str(kind), "credential_id": credential_id, "expires_at": expires_at, "revoked_at": now},
    )
    return int(cast(CursorResult[Any], result).rowcount) == 1


async def is_revoked(session: AsyncSession, *, kind: CredentialKind, credential_id: str) -> bool:
    """Whether ``credential_id`` of ``kind`` is revoked (an expired revocation still counts until it is purged)."""
    found = await session.scalar(
        sa.select(sa.literal(1)).where(_T.c.kind == str(kind), _T.c.credential_id == credential_id)
    )
    return found is not None


@dataclass
class PendingRevocation:
    """A credential to revoke by its first use, inside whichever transaction the caller opens: its own, or --
    for the QStash attempt routes -- the claim's, one transaction fewer per attempt. Called with that
    transaction's session, it revokes the credential, or raises ``refused()`` (rolling that transaction back)
    when it was revoked already. ``done``: whether it has been revoked by this object."""

    kind: CredentialKind
    credential_id: str
    expires_at: dt.datetime
    refused: Callable[[], Exception]
    done: bool = False

    async def __call__(self, session: AsyncSession) -> None:
        self.settle(await revoke(session, **self.parameters(utcnow())))

    def parameters(self, now: dt.datetime) -> dict[str, Any]:
        """``revoke``'s keyword arguments (the parameters of ``revoking_parts``) for this credential at ``now``."""
        return {"kind": self.kind, "credential_id": self.credential_id, "expires_at": self.expires_at, "now": now}

    def settle(self, first_use: bool) -> None:
        """Take the answer of a revocation made elsewhere: mark this one ``done``, or raise ``refused()``."""
        if not first_use:
            raise self.refused()
        self.done = True
