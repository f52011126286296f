"""The SQL statements POST /v1/events runs, in order: a regression in round trips shows here first.

Only statements run by the request's own task are counted, not the local dispatcher's work in the
background; BEGIN, COMMIT and SQLite's PRAGMAs are not statements here.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import Service, booking_event
from tests.sql_statements import recorded_statements

CHAT = {"conversation_id": "c-1", "sender_name": "Ann", "preview": "hi"}


def summary(statement: str) -> str:
    """What a statement does to which (first) table: "INSERT INTO events", "SELECT FROM users"; for writes sent
    as one statement (``WITH w0 AS (INSERT ...) INSERT ...``), each part's, joined by " + "."""
    if statement.startswith("WITH w0 AS ("):
        parts = re.split(r"\)?,?\s*w\d+ AS \(|\)\s*\n", statement.removeprefix("WITH w0 AS ("))
        return " + ".join(summary(part.strip()) for part in parts if part.strip())
    words = statement.split()
    if words[0] == "INSERT":
        return f"INSERT INTO {words[2]}"
    if words[0] in ("SELECT", "DELETE") and "FROM" in words:
        return f"{words[0]} FROM {words[words.index('FROM') + 1]}"
    return " ".join(words[:2])


@contextlib.contextmanager
def statements_of_this_task(engine: AsyncEngine) -> Iterator[list[str]]:
    """Collect the summary of each statement this task runs."""
    with recorded_statements(engine, this_task_only=True) as statements:
        seen: list[str] = []
        yield seen
        seen += [summary(s.sql) for s in statements if not s.sql.startswith(("BEGIN", "PRAGMA"))]


async def existing_users(service: Service, *ids: str) -> None:
    for n, user_id in enumerate(ids):
        profile = {"organization_id": "org-1", "email": f"{user_id}@example.com"}
        assert (await service.client.put(f"/v1/users/{user_id}", json=profile, headers=service.auth)).is_success
        if n == 0:
            prefs = {"channels": {"email": False}}
            response = await service.client.put(f"/v1/users/{user_id}/preferences", json=prefs, headers=service.auth)
            assert response.is_success
    response = await service.client.put(
        "/v1/organizations/org-1/preferences", json={"channels": {"push": True}}, headers=service.auth
    )
    assert response.is_success


WRITE = ["INSERT INTO deliveries", "INSERT INTO delivery_transitions"]
"""The deliveries and their first transitions: one statement on PostgreSQL, where writes go together."""


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            booking_event(idempotency_key="k-1", recipients=["u-1", "u-2", "u-3"]),
            ["INSERT INTO events", "SELECT FROM users", *WRITE],
            id="existing users",
        ),
        pytest.param(
            booking_event(recipients=["u-1", "new-1", "new-2"], organization_id="org-2"),
            [
                "INSERT INTO events",
                "SELECT FROM users",
                "INSERT INTO users",
                "SELECT FROM organization_preferences",
                *WRITE,
            ],
            id="new users in an organization",
        ),
        pytest.param(
            booking_event(
                recipients=[{"id": u, "email": f"{u}@example.org", "locale": "de"} for u in ("u-3", "n-1", "u-1")]
            ),
            ["INSERT INTO events", "INSERT INTO users", "SELECT FROM users", *WRITE],
            id="inline profiles",
        ),
        pytest.param(
            {"type": "chat.message.offline", "recipients": ["u-1", "u-2"], "data": CHAT},
            ["INSERT INTO events", "SELECT FROM users", "SELECT FROM deliveries", *WRITE],
            id="digest",
        ),
    ],
)
async def test_accepting_an_event_takes_one_statement_per_step(
    service: Service, body: dict[str, Any], expected: list[str]
) -> None:
    await existing_users(service, "u-1", "u-2", "u-3")
    with statements_of_this_task(service.runtime.engine) as statements:
        response = await service.post_event(body)
    assert response.status_code == 202, response.text
    if service.runtime.engine.dialect.name == "postgresql":
        expected = [*expected[: -len(WRITE)], " + ".join(WRITE)]
    assert statements == expected, statements


async def test_a_duplicate_takes_two_statements(service: Service) -> None:
    await existing_users(service, "u-1", "u-2")
    body = booking_event(idempotency_key="k-1", recipients=["u-1", "u-2"])
    assert (await service.post_event(body)).status_code == 202
    with statements_of_this_task(service.runtime.engine) as statements:
        assert (await service.post_event(body)).status_code == 200
        assert (await service.post_event({**body, "actor": "u-1"})).status_code == 409
    assert statements == ["INSERT INTO events", "SELECT FROM events"] * 2
