"""User profiles: upsert, read, erase (profile, preferences and inbox)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import sqlalchemy as sa

from notifier.db.models import InboxMessage, PreferenceChange, UserPreferences
from tests.conftest import Service, booking_event
from tests.security.test_hostile_values import row_counts

# User ids no path may hold (``types.id_problem``), percent-encoded as a client sends them.
BAD_PATH_IDS = {"dots": "%2E%2E", "control": "a%07b", "too-long": "u" * 201}


async def test_put_creates_then_updates_only_the_given_fields(service: Service) -> None:
    created = await service.client.put(
        "/v1/users/u-1",
        headers=service.auth,
        json={"email": "a@example.com", "name": "Ann", "timezone": "Europe/Berlin"},
    )
    assert created.status_code == 201
    updated = await service.client.put("/v1/users/u-1", headers=service.auth, json={"locale": "de"})
    assert updated.status_code == 200
    body = (await service.get("/v1/users/u-1")).json()
    assert (body["email"], body["name"], body["locale"], body["timezone"]) == (
        "a@example.com",
        "Ann",
        "de",
        "Europe/Berlin",
    )


async def test_put_validates_every_field(service: Service) -> None:
    response = await service.client.put(
        "/v1/users/u-1",
        headers=service.auth,
        json={"email": "no", "timezone": "Nowhere/Land", "roles": "admin", "x": 1},
    )
    assert response.status_code == 422
    assert sorted(e["loc"][0] for e in response.json()["errors"]) == ["email", "roles", "timezone", "x"]
    assert (await service.get("/v1/users/u-1")).status_code == 404


@pytest.mark.parametrize("user_id", BAD_PATH_IDS.values(), ids=BAD_PATH_IDS.keys())
@pytest.mark.parametrize(
    ("body", "locs"),
    [
        ({"email": "no", "timezone": "Nowhere/Land"}, [["email"], ["timezone"]]),
        ({"name": "Ann\x00", "locale": "\ud800"}, [["locale"], ["name"]]),  # nothing could store them
    ],
    ids=["invalid", "unstorable"],
)
async def test_put_names_a_bad_path_id_and_every_bad_field_in_one_422(
    service: Service, user_id: str, body: dict[str, Any], locs: list[list[str]]
) -> None:
    # json.dumps escapes a lone surrogate, which httpx's own encoding refuses
    headers = {**service.auth, "Content-Type": "application/json"}
    response = await service.client.put(f"/v1/users/{user_id}", headers=headers, content=json.dumps(body))
    assert response.status_code == 422, response.text
    assert sorted(e["loc"] for e in response.json()["errors"]) == sorted([["path", "user_id"], *locs])
    assert set((await row_counts(service)).values()) == {0}, "something was written"


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b'{"name": ', "application/json", 400),
        (b"name=Ann", "application/x-www-form-urlencoded", 415),
        (None, "application/json", 413),
    ],
    ids=["malformed", "not-json", "too-large"],
)
async def test_a_body_that_cannot_be_read_leaves_a_bad_path_id_its_own_422(
    service: Service, content: bytes | None, content_type: str, status: int
) -> None:
    # Such a body has no fields to name: the bad path alone is answered, the body's status once it is fixed.
    sent = content if content is not None else b"x" * (service.runtime.settings.max_body_bytes + 1)
    headers = {**service.auth, "Content-Type": content_type}
    bad = await service.client.put("/v1/users/%2E%2E", headers=headers, content=sent)
    assert bad.status_code == 422, bad.text
    assert [e["loc"] for e in bad.json()["errors"]] == [["path", "user_id"]]
    assert (await service.client.put("/v1/users/u-1", headers=headers, content=sent)).status_code == status


async def test_delete_erases_profile_preferences_and_inbox(service: Service) -> None:
    await service.post_event(booking_event(recipients=["u-1", "u-2"]))
    await service.drain()
    put = await service.client.put(
        "/v1/users/u-1/preferences", headers=service.auth, json={"channels": {"email": False}}
    )
    assert put.status_code == 200
    assert (await service.client.delete("/v1/users/u-1", headers=service.auth)).status_code == 204
    assert (await service.get("/v1/users/u-1")).status_code == 404
    async with service.runtime.sessions() as session:
        inbox_owners = (await session.execute(sa.select(InboxMessage.user_id))).scalars().all()
        prefs = (await session.execute(sa.select(UserPreferences.user_id))).scalars().all()
        history = (await session.execute(sa.select(PreferenceChange.subject_id))).scalars().all()
    assert inbox_owners == ["u-2"]
    assert prefs == []
    assert history == []
    assert (await service.client.delete("/v1/users/u-1", headers=service.auth)).status_code == 404


async def test_concurrent_puts_create_once_and_each_answers_its_own_write(service: Service) -> None:
    names = [f"name-{i}" for i in range(12)]
    answers = await asyncio.gather(
        *(service.client.put("/v1/users/u-race", headers=service.auth, json={"name": name}) for name in names)
    )
    assert sorted(a.status_code for a in answers) == [200] * 11 + [201]
    assert [a.json()["name"] for a in answers] == names


async def test_puts_racing_erasures_never_fail(service: Service) -> None:
    # An erasure that commits between a PUT's finding the user and its update must not turn the PUT into a 500:
    # the user is created again, and the PUT answers what it wrote.
    for round_ in range(5):
        user = f"/v1/users/u-{round_}"
        await service.client.put(user, headers=service.auth, json={"name": "first"})
        answers = await asyncio.gather(
            *(
                service.client.put(user, headers=service.auth, json={"name": f"put-{i}"})
                if i % 2
                else service.client.delete(user, headers=service.auth)
                for i in range(16)
            )
        )
        for i, answer in enumerate(answers):
            if i % 2:
                assert answer.status_code in (200, 201), answer.text
                assert answer.json()["name"] == f"put-{i}"
            else:
                assert answer.status_code in (204, 404), answer.text
