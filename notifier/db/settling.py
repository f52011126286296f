"""The outcomes of attempts written without locking their rows first: one statement, committed by itself.

The outcome transaction it replaces on PostgreSQL took four round trips -- BEGIN, a ``SELECT ... FOR UPDATE`` of
the claimed rows, the writes (one statement of ``WITH`` parts), COMMIT -- to settle rows that, almost always, no
one touched since their claim. Here the writes go alone (no BEGIN, so PostgreSQL commits the statement by
itself), each delivery's part guarded so that it applies only to a row still as its claim left it:

* the same claim token (no takeover, release or new claim since), and the same ``updated_at`` (no other change
  of status since, and no reader's mark that its inbox message was read while the attempt was out:
  ``notifier.delivery.state.read_while_sending``);
* for an in-app delivery settled ``sent``, no read inbox message: a reader who read it before this statement
  began would find the delivery still ``sending`` and move nothing, so it must be moved to ``read`` as well.

A reader who opens the message while the attempt is out touches the row (``updated_at``) in its transaction;
if that commits while this statement waits for the row, PostgreSQL checks the guard again on the row's newest
version, finds ``updated_at`` changed and leaves the row (the read itself is past the statement's snapshot: only
the row can tell it). A row the guard leaves keeps everything it had -- the statement writes neither its attempt
row nor a transition -- and the caller records its outcome in a transaction from the locked row, as before. The
columns other writers may change while an attempt holds a row (QStash's gave-up mark, a renewed lease's end)
are not written from the claim's copy: the mark is kept, the lease is cleared.

The rows are locked in id order first, as ``deliveries.lock_many`` does, so that this statement and a
transaction locking some of the same rows (a sweep taking over an expired lease) cannot deadlock.

PostgreSQL only (``driver.alone``); on SQLite every outcome is recorded in a transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from notifier.db import bulk, deliveries, driver
from notifier.db.models import ATTEMPTS, DELIVERIES, INBOX_MESSAGES, TRANSITIONS
from notifier.types import ChannelName, DeliveryStatus

# What settling an attempt changes on its delivery's row (``notifier.delivery.state.settle``); the claim's token
# and lease end are cleared.
SETTLED_COLUMNS = ("status", "reason", "not_before", "updated_at", "sent_at", "provider_message_id", "last_error")
# What the caller gives for each delivery: its position in the call, the guard, the settled columns, its
# attempt row's end and its transition row.
_GUARD = (
    ("position", sa.Integer()),
    ("token", DELIVERIES.c.claim_token.type),
    ("claimed_at", DELIVERIES.c.updated_at.type),
)
_ATTEMPT = ("number", "started_at", "finished_at", "outcome", "http_status", "provider_message_id", "error")
_TRANSITION = ("id", "from_status", "note", "at")


def _given() -> list[sa.Column[Any]]:
    columns = [sa.Column(name, type_) for name, type_ in _GUARD]
    columns += [sa.Column("id", DELIVERIES.c.id.type)]
    columns += [sa.Column(name, DELIVERIES.c[name].type) for name in SETTLED_COLUMNS]
    columns += [sa.Column(f"attempt_{name}", ATTEMPTS.c[name].type) for name in _ATTEMPT]
    columns += [sa.Column(f"transition_{name}", TRANSITIONS.c[name].type) for name in _TRANSITION]
    return columns


def _statement() -> sa.Select[Any]:
    given = bulk.arrays(_given())
    v = sa.select(given).cte("v")
    d = DELIVERIES
    locked = (
        sa.select(d.c.id)
        .where(d.c.id.in_(sa.select(v.c.id)))
        .order_by(d.c.id)
        .with_for_update()
        .cte("locked")
        .prefix_with("MATERIALIZED")
    )
    read = sa.exists().where(INBOX_MESSAGES.c.delivery_id == d.c.id, INBOX_MESSAGES.c.read_at.is_not(None))
    settled = (
        sa.update(d)
        .values({**{name: v.c[name] for name in SETTLED_COLUMNS}, "claim_token": None, "claimed_until": None})
        .where(
            d.c.id == v.c.id,
            d.c.id.in_(sa.select(locked.c.id)),
            d.c.claim_token == v.c.token,
            d.c.updated_at == v.c.claimed_at,
            sa.not_(
                sa.and_(v.c.status == DeliveryStatus.sent, d.c.channel == ChannelName.in_app, read),
            ),
        )
        .returning(v.c.position)
        .cte("settled")
    )
    mine = v.c.position.in_(sa.select(settled.c.position))
    closed = (
        sa.update(ATTEMPTS)
        .values({name: v.c[f"attempt_{name}"] for name in _ATTEMPT if name != "number"})
        .where(ATTEMPTS.c.delivery_id == v.c.id, ATTEMPTS.c.number == v.c.attempt_number, mine)
        .cte("closed")
    )
    logged = deliveries.transitions_from(v, reason=v.c.reason, where=mine)
    return sa.select(settled.c.position).add_cte(closed, logged)


_SETTLE = driver.Prepared(_statement())
_NAMES = [column.name for column in _given()]


async def settle(connection: driver.Lent, rows: Sequence[Mapping[str, Any]]) -> set[int]:
    """Write the outcomes ``rows`` describe where their guard holds, in one statement committed by itself; return
    the positions of the rows written.

    Each row maps ``position`` (any int unique in the call), ``token`` and ``claimed_at`` (the claim's token and
    ``updated_at``), ``id``, the ``SETTLED_COLUMNS``, ``attempt_<column>`` for its attempt row (``number`` finds
    it) and ``transition_<column>`` for its transition (``to_status`` and ``reason`` are the settled ones).
    """
    if not rows:
        return set()
    # In any order: the statement's first part takes the rows' locks in id order.
    arrays = {bulk.parameter(name): [row[name] for row in rows] for name in _NAMES}
    return {position for (position,) in await driver.fetch(connection, _SETTLE, arrays)}
