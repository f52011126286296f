"""User profiles: upsert, read, erase (profile, preferences and inbox)."""

from __future__ import annotations

import sqlalchemy as sa

from notifier.db.models import InboxMessage, PreferenceChange, UserPreferences
from tests.conftest import Service, booking_event


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
