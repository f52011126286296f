"""A QStash attempt's claim without a transaction block (PostgreSQL): the unit's rows read without a lock, then one
statement that spends the signature and claims them, all or nothing, if none changed since. The tests of a change
made meanwhile hold a row in a transaction of their own while the claim's statement waits for it, change the row
as another writer would, and commit: the claim must then see the change.

``test_signature_in_claim`` and ``test_replay`` hold the rest (replays, a claim that fails), on both databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from notifier.db import claiming, deliveries
from notifier.db.models import Delivery
from notifier.delivery import state
from notifier.types import utcnow
from tests.dispatch.test_unlocked_outcomes import waiting_for_a_lock
from tests.qstash.conftest import Stack
from tests.qstash.test_signature_in_claim import (
    TWO_USERS,
    commits_of,
    post_signed,
    queued_event,
    refused_as_replay,
    signed,
)
from tests.sql_statements import recorded_statements


@pytest.fixture
def database_url(postgres_url: str) -> str:
    """These tests are about PostgreSQL's row locks: the QStash stack runs on PostgreSQL only."""
    return postgres_url


@contextlib.asynccontextmanager
async def holding(stack: Stack, delivery_id: uuid.UUID, lock: str = "UPDATE") -> AsyncIterator[AsyncConnection]:
    """A transaction holding ``delivery_id``'s row (``FOR <lock>``), committed when the block ends."""
    async with stack.engine.connect() as connection, connection.begin():
        row = sa.text(f"SELECT id FROM deliveries WHERE id = :id FOR {lock}")
        assert (await connection.execute(row, {"id": delivery_id})).scalar_one() == delivery_id
        yield connection


async def claim_waits(connection: AsyncConnection) -> None:
    """Until another backend on this database waits for a lock (the claim's statement, for the held row)."""
    for _ in range(500):
        if await waiting_for_a_lock(connection):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the claim never waited for the held row")


def delivery_call(delivery: Delivery, **body: object) -> tuple[str, bytes]:
    return f"/v1/qstash/deliveries/{delivery.id}", json.dumps({"delivery_id": str(delivery.id), **body}).encode()


async def test_a_row_claimed_by_another_attempt_meanwhile_is_busy_and_the_signature_spent_once(stack: Stack) -> None:
    push = await stack.delivery(await queued_event(stack), "user-1", "push")
    path, body = delivery_call(push)
    signature = signed(stack, path, body)
    async with holding(stack, push.id) as held:
        answer = asyncio.create_task(post_signed(stack, path, body, signature))
        await claim_waits(held)
        now = utcnow()
        other = {"id": push.id, "token": uuid.uuid4(), "now": now, "until": now + dt.timedelta(seconds=30)}
        claimed_by_another = (
            "UPDATE deliveries SET status = 'sending', claim_token = :token, attempts = attempts + 1,"
            " claimed_until = :until, updated_at = :now WHERE id = :id"
        )
        await held.execute(sa.text(claimed_by_another), other)
    response = await answer

    assert response.status_code == 503, response.text  # the other attempt holds it: QStash retries later
    assert int(response.headers["retry-after"]) > 0
    row = await stack.delivery_by_id(push.id)
    assert (row.status, row.claim_token, row.attempts) == ("sending", other["token"], 1)  # the other's claim
    assert await stack.attempts(push.id) == []  # this request opened no attempt
    assert [t.to_status for t in await stack.transitions(push.id)] == ["queued"]
    assert stack.onesignal.requests == []
    refused_as_replay(await post_signed(stack, path, body, signature))  # spent by the claim's statement


async def test_a_group_member_changed_meanwhile_leaves_every_member_unclaimed(stack: Stack) -> None:
    members = sorted(
        (d for d in await stack.deliveries(await queued_event(stack, *TWO_USERS)) if d.send_group), key=_id
    )
    assert len(members) == 2
    group = members[0].send_group
    path = f"/v1/qstash/groups/{group}"
    body = json.dumps({"group_id": str(group), "generation": 0}).encode()
    async with holding(stack, members[1].id) as held:  # the claim locks the first member, then waits here
        answer = asyncio.create_task(post_signed(stack, path, body, signed(stack, path, body)))
        await claim_waits(held)
        # The QStash sweep re-dispatching the group: a new generation, no move (updated_at stays).
        raised = "UPDATE deliveries SET dispatch_generation = dispatch_generation + 1 WHERE id = :id"
        await held.execute(sa.text(raised), {"id": members[1].id})
    response = await answer

    assert response.status_code == 200, response.text
    assert {d["outcome"] for d in response.json()["deliveries"]} == {"superseded"}  # the new message is answered
    for member in members:
        assert (await stack.delivery_by_id(member.id)).status == "queued"  # not even the one that did not change
        assert await stack.attempts(member.id) == []
        assert [t.to_status for t in await stack.transitions(member.id)] == ["queued"]


async def test_a_message_folded_into_a_digest_head_meanwhile_is_counted(stack: Stack) -> None:
    head = await stack.delivery(await queued_event(stack), "user-1", "push")
    assert head.digest_key is not None
    path, body = delivery_call(head)
    async with holding(stack, head.id, lock="KEY SHARE") as fold:  # as a fold holds the head it folds into
        answer = asyncio.create_task(post_signed(stack, path, body, signed(stack, path, body)))
        await claim_waits(fold)
        await _fold_into(fold, head)
    response = await answer

    assert (response.status_code, response.json()["outcome"]) == (200, "sent"), response.text
    [notification] = stack.onesignal.notifications
    assert notification.body["contents"]["en"] == "2 new messages from Bob"


async def _fold_into(connection: AsyncConnection, head: Delivery) -> None:
    """What ingest writes for a message of ``head``'s digest key while ``head`` is open: its event, and a
    ``suppressed``/``digested`` delivery naming the head."""
    event_id = uuid.uuid4()
    await connection.execute(
        sa.text(
            "INSERT INTO events (id, type, body_hash, organization_id, actor, data, recipients, source, received_at)"
            " SELECT :new, type, body_hash, organization_id, actor, data, recipients, source, received_at"
            " FROM events WHERE id = :event"
        ),
        {"new": event_id, "event": head.event_id},
    )
    await connection.execute(
        sa.text(
            "INSERT INTO deliveries (id, event_id, event_type, user_id, channel, provider, status, reason,"
            " digest_key, digest_head, attempts, retry_base, dispatch_generation, gave_up_count, created_at,"
            " updated_at) SELECT :id, :event, event_type, user_id, channel, provider, 'suppressed', 'digested',"
            " digest_key, id, 0, 0, 0, 0, created_at, updated_at FROM deliveries WHERE id = :head"
        ),
        {"id": uuid.uuid4(), "event": event_id, "head": head.id},
    )


async def test_qstash_giving_up_meanwhile_is_kept_by_the_claim(stack: Stack) -> None:
    push = await stack.delivery(await queued_event(stack), "user-1", "push")
    path, body = delivery_call(push)
    async with holding(stack, push.id) as held:
        answer = asyncio.create_task(post_signed(stack, path, body, signed(stack, path, body)))
        await claim_waits(held)
        # The failure callback's mark on a pending row: not a move, so updated_at stays and the claim goes ahead.
        mark = "UPDATE deliveries SET gave_up_generation = 0, gave_up_count = 1 WHERE id = :id"
        await held.execute(sa.text(mark), {"id": push.id})
    response = await answer

    assert (response.status_code, response.json()["outcome"]) == (200, "sent"), response.text
    row = await stack.delivery_by_id(push.id)
    assert (row.status, row.gave_up_generation, row.gave_up_count) == ("sent", 0, 1)
    assert [a.outcome for a in await stack.attempts(push.id)] == ["sent"]


async def test_an_attempt_reads_once_then_claims_in_one_statement_without_a_transaction_block(stack: Stack) -> None:
    push = await stack.delivery(await queued_event(stack), "user-1", "push")
    path, body = delivery_call(push)
    engine = stack.live.app.state.runtime.engine
    with commits_of(stack) as commits, recorded_statements(engine) as statements:
        response = await post_signed(stack, path, body, signed(stack, path, body))
    assert (response.status_code, response.json()["outcome"]) == (200, "sent"), response.text
    assert commits == []  # nothing for SQLAlchemy to commit: PostgreSQL committed each statement by itself
    # The read, the claim (with the signature's spend), the digest head's count, the outcome.
    assert [s.sql.split()[0] for s in statements] == ["SELECT", "WITH", "SELECT", "WITH"]
    assert "revoked_credentials" in statements[1].sql
    assert "delivery_attempts" in statements[1].sql


def _id(delivery: Delivery) -> uuid.UUID:
    return delivery.id


def test_a_claim_without_a_lock_writes_every_column_a_claim_changes() -> None:
    delivery = Delivery(event_id=uuid.uuid4(), event_type="t", user_id="u", channel="push", status="queued")
    before = {name: getattr(delivery, name) for name in deliveries.MUTABLE_COLUMNS}
    state.claim(delivery, token=uuid.uuid4(), claimed_until=utcnow(), via="qstash", now=utcnow())
    changed = {name for name in deliveries.MUTABLE_COLUMNS if getattr(delivery, name) != before[name]}
    assert changed == set(claiming.CLAIMED_COLUMNS)
