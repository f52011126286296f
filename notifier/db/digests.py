"""Digest queries: which head a new message of a digest key folds into, and what each claimed head counts.

A digest *head* is the delivery that will be sent; every message folded into it while it is open is a
``suppressed``/``digested`` row of the same ``digest_key`` naming the head in ``digest_head``. A head counts
itself and the rows naming it, so a folded message counts towards exactly the digest it was folded into:
never by time, which neither orders the rows of concurrent transactions nor agrees between replicas' clocks,
and which cannot tell apart two heads of one key open at once (a head claimed and sending is not open, so a
message arriving then starts a new head; if the first is then retried, both are open).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from notifier.db import driver
from notifier.db.models import DELIVERIES, Delivery
from notifier.types import DISPATCHABLE_STATUSES, DeliveryStatus

# FOR KEY SHARE (PostgreSQL; SQLite runs one writer at a time): the heads a message folds into stay open until the
# fold commits. A claim (FOR UPDATE SKIP LOCKED) passes them by meanwhile and takes them once the fold is in, so
# their count includes it; without the lock a claim could take a head and count its folds between this read and
# the fold's commit, and the message would be in no digest's count. A head a claim already holds makes this read
# wait for it, then drop the head, now ``sending``: the message starts a new head. Locked in id order, as every
# other lock on deliveries is taken, so no two transactions wait on each other. Both statements take their lists
# as array parameters on the driver: one statement text whatever the number of keys (see ``driver.member``).
_OPEN_HEADS = driver.Prepared.both(
    lambda arrays: (
        sa.select(DELIVERIES.c.digest_key, DELIVERIES.c.id, DELIVERIES.c.created_at)
        .where(
            driver.member(DELIVERIES.c.digest_key, "keys", arrays=arrays),
            DELIVERIES.c.status.in_(sorted(DISPATCHABLE_STATUSES)),
        )
        .order_by(DELIVERIES.c.id)
        .with_for_update(key_share=True)
    )
)
# The key and status conditions are there for the index on (digest_key, status): they read the keys' folded rows
# only, as few as the messages folded into a key over the retention period, where no index leads with digest_head.
_FOLDED = driver.Prepared.both(
    lambda arrays: (
        sa.select(DELIVERIES.c.digest_head, sa.func.count())
        .where(
            driver.member(DELIVERIES.c.digest_key, "keys", arrays=arrays),
            DELIVERIES.c.status == DeliveryStatus.suppressed,
            driver.member(DELIVERIES.c.digest_head, "heads", arrays=arrays),
        )
        .group_by(DELIVERIES.c.digest_head)
    )
)


async def open_heads(session: driver.Target, *, digest_keys: Sequence[str]) -> dict[str, uuid.UUID]:
    """Per digest key with an open (queued or deferred) head, the head a new message of that key folds into.

    Of two open heads (one back from a failed attempt beside one started while it was sending), the newer: it has
    not been tried yet, and the older may be failing for good.
    """
    if not digest_keys:
        return {}
    rows = await driver.fetch(session, _OPEN_HEADS, {"keys": list(digest_keys)})
    # Oldest first, so that the newest head of a key is the one left in the dict.
    return {key: head for key, head, _ in sorted(rows, key=lambda row: (row[2], str(row[1])))}


async def counts(session: AsyncSession | driver.Lent, *, heads: Sequence[Delivery]) -> dict[uuid.UUID, int]:
    """Per digest head: 1 plus the messages folded into it. One query for all heads, in ``session``'s transaction
    or on its own.

    Exact once the heads are claimed: a message folds into a head only while it is open, and its fold holds the
    head (``_OPEN_HEADS``) until it commits, so it commits before the head's claim or finds the head claimed."""
    if not heads:
        return {}
    keys = sorted({head.digest_key for head in heads if head.digest_key is not None})
    params = {"keys": keys, "heads": [head.id for head in heads]}
    folded = await driver.fetch(session, _FOLDED, params)
    counted = {head: int(count) for head, count in folded}
    return {head.id: 1 + counted.get(head.id, 0) for head in heads}
