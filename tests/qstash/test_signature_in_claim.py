"""The attempt routes spend their Upstash-Signature in the claim, not in a transaction of their own: an attempt
callback writes twice (claim, outcome: on SQLite two transactions, on PostgreSQL one statement each, committed
by PostgreSQL itself), and everything ``test_replay`` holds still holds -- a replay is a 401 that changes
nothing, whatever the first use found. SQLite and PostgreSQL.

The rows wait for the test's own signed calls: the service's publish to QStash is made to fail, so the emulator
never calls back on its own.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from notifier.api.common import ApiRoute
from notifier.app import API_ROUTES
from notifier.runtime import Runtime
from tests.db_faults import inserts_refused
from tests.fakes.base import Fault
from tests.qstash.conftest import Stack, chat_event

TWO_USERS = ({"id": "user-1", "email": "u1@example.com"}, {"id": "user-2", "email": "u2@example.com"})


async def queued_event(stack: Stack, *recipients: dict[str, str]) -> uuid.UUID:
    """An event whose deliveries wait, queued, for the test's signed calls."""
    stack.emulator.fail_next(Fault.http(500))
    response = await stack.post_event(chat_event(*recipients))
    assert response.status_code == 202, response.text
    return uuid.UUID(response.json()["event_id"])


async def post_signed(stack: Stack, path: str, body: bytes, signature: str) -> httpx.Response:
    headers = {"Upstash-Signature": signature, "Content-Type": "application/json"}
    return await stack.http.post(stack.url(path), content=body, headers=headers)


def signed(stack: Stack, path: str, body: bytes) -> str:
    return stack.emulator.sign(body, stack.url(path))


def refused_as_replay(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "already used" in response.json()["detail"]


@contextlib.contextmanager
def commits_of(stack: Stack) -> Iterator[list[object]]:
    """Every transaction the service's own engine commits meanwhile (the test's engine is another)."""
    runtime: Runtime = stack.live.app.state.runtime
    seen: list[object] = []

    def record(connection: Any) -> None:
        seen.append(connection)

    sa.event.listen(runtime.engine.sync_engine, "commit", record)
    try:
        yield seen
    finally:
        sa.event.remove(runtime.engine.sync_engine, "commit", record)


async def test_an_attempt_callback_commits_its_claim_and_outcome_and_its_replay_nothing(stack: Stack) -> None:
    push = await stack.delivery(await queued_event(stack), "user-1", "push")
    path, body = f"/v1/qstash/deliveries/{push.id}", json.dumps({"delivery_id": str(push.id)}).encode()
    signature = signed(stack, path, body)

    with commits_of(stack) as commits:
        first = await post_signed(stack, path, body, signature)
    assert first.status_code == 200, first.text
    assert first.json()["outcome"] == "sent"
    # The claim (with the jti spent in it) and the outcome; no transaction for the jti. On PostgreSQL each is one
    # statement PostgreSQL commits by itself, with no transaction block for SQLAlchemy to commit.
    on_postgres = stack.live.app.state.runtime.engine.dialect.name == "postgresql"
    assert len(commits) == (0 if on_postgres else 2)

    with commits_of(stack) as commits:
        refused_as_replay(await post_signed(stack, path, body, signature))
    assert commits == []  # the claim transaction that found the jti spent rolled back


async def test_a_replay_on_a_pending_delivery_is_refused_and_attempts_nothing(stack: Stack) -> None:
    push = await stack.delivery(await queued_event(stack), "user-1", "push")
    path, body = f"/v1/qstash/deliveries/{push.id}", json.dumps({"delivery_id": str(push.id)}).encode()
    signature = signed(stack, path, body)
    stack.onesignal.fail_next(Fault.http(500, {"errors": ["Internal Server Error"]}))
    first = await post_signed(stack, path, body, signature)
    assert first.status_code == 503, first.text  # to be retried: the delivery is pending again
    before = await stack.delivery_by_id(push.id)
    transitions = len(await stack.transitions(push.id))
    sent_before = len(stack.onesignal.requests)

    for _ in range(2):
        refused_as_replay(await post_signed(stack, path, body, signature))

    after = await stack.delivery_by_id(push.id)
    assert (after.status, after.attempts, after.claim_token) == (before.status, before.attempts, before.claim_token)
    assert len(await stack.attempts(push.id)) == 1
    assert len(await stack.transitions(push.id)) == transitions
    assert len(stack.onesignal.requests) == sent_before
    retry = await post_signed(stack, path, body, signed(stack, path, body))  # QStash's retry: signed anew
    assert (retry.status_code, retry.json()["outcome"]) == (200, "sent")


async def test_a_replayed_group_call_is_refused_and_attempts_no_member(stack: Stack) -> None:
    members = [d for d in await stack.deliveries(await queued_event(stack, *TWO_USERS)) if d.send_group]
    assert len(members) == 2  # one channel's deliveries to both users, attempted together
    group = members[0].send_group
    assert {m.send_group for m in members} == {group}
    path, body = f"/v1/qstash/groups/{group}", json.dumps({"group_id": str(group)}).encode()
    signature = signed(stack, path, body)
    first = await post_signed(stack, path, body, signature)
    assert first.status_code == 200, first.text

    with commits_of(stack) as commits:
        refused_as_replay(await post_signed(stack, path, body, signature))

    assert commits == []
    for member in members:
        assert (await stack.delivery_by_id(member.id)).status == "sent"
        assert len(await stack.attempts(member.id)) == 1


async def test_a_signature_is_spent_when_the_claim_finds_nothing_to_attempt(stack: Stack) -> None:
    push = await stack.delivery(await queued_event(stack), "user-1", "push")
    sent = await post_signed(
        stack, f"/v1/qstash/deliveries/{push.id}", b"{}", signed(stack, f"/v1/qstash/deliveries/{push.id}", b"{}")
    )
    assert sent.json()["outcome"] == "sent"
    for path, outcome in (
        (f"/v1/qstash/deliveries/{uuid.uuid4()}", "missing"),  # deleted since it was published
        (f"/v1/qstash/groups/{uuid.uuid4()}", "missing"),
        ("/v1/qstash/deliveries/not-an-id", "missing"),  # answered without a claim at all
        (f"/v1/qstash/deliveries/{push.id}", "terminal"),
    ):
        signature = signed(stack, path, b"{}")
        with commits_of(stack) as commits:
            first = await post_signed(stack, path, b"{}", signature)
        assert (first.status_code, first.json()["outcome"]) == (200, outcome), path
        assert len(commits) == 1, path  # the jti, in the claim (or, with no claim, on its own)
        refused_as_replay(await post_signed(stack, path, b"{}", signature))
    assert len(await stack.attempts(push.id)) == 1


async def test_a_claim_that_fails_does_not_spend_its_signature(stack: Stack) -> None:
    push = await stack.delivery(await queued_event(stack), "user-1", "push")
    path, body = f"/v1/qstash/deliveries/{push.id}", json.dumps({"delivery_id": str(push.id)}).encode()
    signature = signed(stack, path, body)
    async with inserts_refused(stack.engine, "delivery_attempts"):  # the claim's last write fails
        failed = await post_signed(stack, path, body, signature)
    assert failed.status_code >= 500, failed.text
    unchanged = await stack.delivery_by_id(push.id)
    assert (unchanged.status, unchanged.attempts) == ("queued", 0)

    again = await post_signed(stack, path, body, signature)  # rolled back with the claim: not spent

    assert (again.status_code, again.json()["outcome"]) == (200, "sent")
    refused_as_replay(await post_signed(stack, path, body, signature))


def test_only_the_attempt_routes_spend_their_signature_in_the_claim() -> None:
    spending = sorted(route.path for route in API_ROUTES if route.spends_signature)
    assert spending == ["/v1/qstash/deliveries/{delivery_id}", "/v1/qstash/groups/{group_id}"]


@pytest.mark.parametrize("auth", ["service_or_qstash", "service", "none"])
def test_a_route_without_a_signature_of_its_own_cannot_declare_it_spends_one(auth: Any) -> None:
    async def handler(_request: Any) -> Any:
        raise AssertionError("never served")

    with pytest.raises(ValueError, match="only a qstash route"):
        ApiRoute("POST", "/x", handler, "x", auth, spends_signature=True)
