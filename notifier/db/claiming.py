"""A QStash attempt's claim without a transaction block: the request's signature spent and the unit's rows
claimed in one statement, committed by itself.

The claim transaction it stands in for took five round trips -- BEGIN, the signature's spend, a ``SELECT ... FOR
UPDATE`` of the unit's rows, the writes (one statement), COMMIT -- for rows that, almost always, no one else
touches between QStash publishing a message and delivering it. Here the caller reads the rows without a lock
(``deliveries.read_unit``), decides and makes the claim on them in Python, and hands this statement the result.
The statement, all or nothing:

* spends the signature (``revocations.revoking_parts``); the rest runs only on its first use, so a replay
  writes nothing and waits on no row;
* locks the rows in id order, each only if it is still as the caller read it: the same ``updated_at`` (every
  change of status sets it) and the same dispatch generation (the QStash sweep raises it without a move), the
  guard checked again on a row's newest version when another transaction changed it meanwhile;
* if every row held, writes their claim -- the ``CLAIMED_COLUMNS`` -- their transitions and their attempt rows;
  if any did not, writes nothing of the claim (a send group's members are claimed together or not at all).

It answers whether the signature was spent and how many rows held; a caller whose rows did not all hold claims
them the old way, in a transaction from the locked rows, the signature already spent. The columns another
writer may change on a pending row without a move (QStash's gave-up mark) are not written, so they are kept.

PostgreSQL only (``driver.alone``); on SQLite every claim is a transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa

from notifier.db import bulk, deliveries, driver, revocations
from notifier.db.models import ATTEMPTS, DELIVERIES, TRANSITIONS

# What a claim changes on its delivery's row (``notifier.delivery.state.claim``).
CLAIMED_COLUMNS = ("status", "claim_token", "claimed_until", "attempts", "updated_at")
# What the caller gives for each row: the guard (the row as read), the claimed columns, its transition and its
# attempt row (``delivery_id`` is the row's ``id``; the transition's ``to_status`` is the claimed ``status``).
_GUARD = (("read_at", DELIVERIES.c.updated_at.type), ("generation", DELIVERIES.c.dispatch_generation.type))
_TRANSITION = ("id", "from_status", "reason", "note", "at")
_ATTEMPT = ("id", "number", "started_at", "via", "send_group")


def _given() -> list[sa.Column[Any]]:
    columns = [sa.Column("id", DELIVERIES.c.id.type)]
    columns += [sa.Column(name, type_) for name, type_ in _GUARD]
    columns += [sa.Column(name, DELIVERIES.c[name].type) for name in CLAIMED_COLUMNS]
    columns += [sa.Column(f"transition_{name}", TRANSITIONS.c[name].type) for name in _TRANSITION]
    columns += [sa.Column(f"attempt_{name}", ATTEMPTS.c[name].type) for name in _ATTEMPT]
    return columns


def _statement() -> sa.Select[Any]:
    v = sa.select(bulk.arrays(_given())).cte("v")
    purged, first_use = revocations.revoking_parts()
    spent = sa.exists(sa.select(first_use.c.credential_id))
    d = DELIVERIES
    held = (
        sa.select(d.c.id)
        .where(d.c.id == v.c.id, d.c.updated_at == v.c.read_at, d.c.dispatch_generation == v.c.generation, spent)
        .order_by(d.c.id)
        .with_for_update(of=d)
        .cte("held")
        .prefix_with("MATERIALIZED")
    )
    count = sa.select(sa.func.count()).select_from(held).scalar_subquery()
    whole = count == sa.bindparam("rows", type_=sa.Integer())
    claimed = (
        sa.update(d).values({name: v.c[name] for name in CLAIMED_COLUMNS}).where(d.c.id == v.c.id, whole).cte("claimed")
    )
    logged = deliveries.transitions_from(v, reason=v.c.transition_reason, where=whole)
    opened = (
        sa.insert(ATTEMPTS)
        .from_select(
            ["id", "delivery_id", "number", "started_at", "via", "send_group"],
            sa.select(
                v.c.attempt_id,
                v.c.id,
                v.c.attempt_number,
                v.c.attempt_started_at,
                v.c.attempt_via,
                v.c.attempt_send_group,
            ).where(whole),
        )
        .cte("opened")
    )
    return sa.select(spent.label("spent"), count.label("held")).add_cte(purged, claimed, logged, opened)


_CLAIM = driver.Prepared(_statement())
_NAMES = [column.name for column in _given()]


class Spent(NamedTuple):
    """What ``claim`` did: whether the signature was spent (its first use), and whether the rows were claimed."""

    first_use: bool
    claimed: bool


async def claim(connection: driver.Lent, revocation: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Spent:
    """Spend the credential ``revocation`` names (``PendingRevocation.parameters``) and, on its first use, claim
    ``rows`` if every one is still as read, in one statement committed by itself.

    Each row maps ``id``, ``read_at`` and ``generation`` (its ``updated_at`` and dispatch generation as read),
    the ``CLAIMED_COLUMNS``, ``transition_<column>`` for its transition and ``attempt_<column>`` for its attempt
    row.
    """
    params: dict[str, Any] = {bulk.parameter(name): [row[name] for row in rows] for name in _NAMES}
    params.update(revocation, kind=str(revocation["kind"]), rows=len(rows))
    [(first_use, held)] = await driver.fetch(connection, _CLAIM, params)
    return Spent(bool(first_use), bool(first_use) and held == len(rows))
