"""POST /v1/events and friends, through the real app on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Service, booking_event


async def test_event_reaches_the_inbox_of_each_recipient(service: Service) -> None:
    response = await service.post_event(
        booking_event(recipients=["user-1", {"id": "user-2", "email": "b@example.com", "locale": "de"}])
    )
    assert response.status_code == 202
    body = response.json()
    assert body["duplicate"] is False
    by_pair = {(d["user_id"], d["channel"]): d for d in body["deliveries"]}
    assert by_pair[("user-1", "in_app")]["status"] == "queued"
    # email is a default channel of booking.confirmed but no email provider is configured here
    assert by_pair[("user-2", "email")]["status"] == "suppressed"
    assert by_pair[("user-2", "email")]["reason"] == "channel_unavailable"
    assert ("user-1", "push") not in by_pair  # push is only "also allowed" and nobody opted in

    await service.drain()
    inbox = (await service.get("/v1/users/user-2/inbox")).json()
    assert inbox["unread_count"] == 1
    [item] = inbox["data"]
    assert item["title"] == "Buchung bestätigt: Seaview 4"  # German template for locale "de"
    assert item["event_id"] == body["event_id"]

    event = (await service.get(f"/v1/events/{body['event_id']}")).json()
    statuses = {(d["user_id"], d["channel"]): d["status"] for d in event["deliveries"]}
    assert statuses[("user-1", "in_app")] == "sent"
    assert statuses[("user-2", "in_app")] == "sent"


async def test_repeat_with_same_key_is_a_duplicate_and_changes_nothing(service: Service) -> None:
    body = booking_event(idempotency_key="booking-b-1-confirmed")
    first = await service.post_event(body)
    second = await service.post_event(body)
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.json()["duplicate"] is True
    assert second.json()["event_id"] == first.json()["event_id"]
    assert {d["id"] for d in second.json()["deliveries"]} == {d["id"] for d in first.json()["deliveries"]}
    listing = (await service.get("/v1/events")).json()
    assert len(listing["data"]) == 1


async def test_same_key_with_a_different_body_is_409(service: Service) -> None:
    await service.post_event(booking_event(idempotency_key="k-1"))
    changed = booking_event(idempotency_key="k-1", recipients=["user-9"])
    response = await service.post_event(changed)
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert "k-1" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "expected_locs"),
    [
        (
            {"type": "booking.confirmed", "recipients": ["u"], "data": {}},
            [["data", "booking_id"], ["data", "guest_name"], ["data", "property"], ["data", "check_in"]],
        ),
        (
            {
                "type": "booking.confirmed",
                "data": {"booking_id": "b", "guest_name": "g", "property": "p", "check_in": "c"},
            },
            [["recipients"]],
        ),
        ({"recipients": ["u"], "data": {}}, [["type"]]),
        (
            {
                "type": "booking.confirmed",
                "recipients": [{"id": "u", "email": "nope", "timezone": "Mars/Base"}],
                "data": {},
                "send_at": "tomorrow",
                "colour": "red",
            },
            [["recipients", 0, "email"], ["recipients", 0, "timezone"], ["send_at"], ["colour"]],
        ),
        ({"type": "no.such.type", "recipients": ["u"], "data": {}}, [["type"]]),
    ],
)
async def test_invalid_events_name_every_bad_field_and_store_nothing(
    service: Service, body: dict[str, Any], expected_locs: list[list[Any]]
) -> None:
    response = await service.post_event(body)
    assert response.status_code == 422
    problem = response.json()
    assert problem["status"] == 422
    assert sorted(map(str, (e["loc"] for e in problem["errors"]))) == sorted(map(str, expected_locs))
    assert (await service.get("/v1/events")).json()["data"] == []
    assert (await service.get("/v1/users/u")).status_code == 404


async def test_actor_is_never_notified(service: Service) -> None:
    response = await service.post_event(booking_event(recipients=["user-1", "user-9"], actor="user-9"))
    deliveries = {(d["user_id"], d["channel"]): d for d in response.json()["deliveries"]}
    assert deliveries[("user-9", "in_app")]["status"] == "suppressed"
    assert deliveries[("user-9", "in_app")]["reason"] == "actor"
    assert deliveries[("user-1", "in_app")]["status"] == "queued"


async def test_audience_resolves_roles_within_the_organization(service: Service) -> None:
    for user_id, org, roles in [
        ("pm", "org-1", ["PROPERTY_MGR"]),
        ("admin", "org-1", ["ORG_ADMIN"]),
        ("guest", "org-1", ["GUEST"]),
        ("other-pm", "org-2", ["PROPERTY_MGR"]),
    ]:
        put = await service.client.put(
            f"/v1/users/{user_id}", headers=service.auth, json={"organization_id": org, "roles": roles}
        )
        assert put.status_code == 201
    # approval.requested defaults its audience to PROPERTY_MGR and ORG_ADMIN of the event's organization
    response = await service.post_event(
        {
            "type": "approval.requested",
            "organization_id": "org-1",
            "actor": "admin",
            "data": {"approval_id": "a-1", "title": "New roof", "requested_by_name": "Admin"},
        }
    )
    assert response.status_code == 202
    users = {d["user_id"] for d in response.json()["deliveries"]}
    assert users == {"pm", "admin"}
    admin = [d for d in response.json()["deliveries"] if d["user_id"] == "admin"]
    assert {d["reason"] for d in admin} == {"actor"}


async def test_inline_recipient_fields_upsert_the_profile(service: Service) -> None:
    await service.post_event(
        booking_event(
            recipients=[{"id": "user-5", "email": "e@example.com", "name": "Eve", "timezone": "Europe/Berlin"}]
        )
    )
    user = (await service.get("/v1/users/user-5")).json()
    assert (user["email"], user["name"], user["timezone"]) == ("e@example.com", "Eve", "Europe/Berlin")


async def test_preview_explains_every_pair_and_stores_nothing(service: Service) -> None:
    response = await service.client.post(
        "/v1/events/preview", headers=service.auth, json=booking_event(recipients=["user-1"])
    )
    assert response.status_code == 200
    plan = {p["channel"]: p for p in response.json()["plan"]}
    assert set(plan) == {"push", "email", "in_app"}
    assert plan["push"]["status"] == "none"
    assert plan["email"]["reason"] == "channel_unavailable"
    assert plan["in_app"]["status"] == "queued"
    assert (await service.get("/v1/events")).json()["data"] == []


async def test_events_list_pages_with_a_cursor(service: Service) -> None:
    ids = [(await service.post_event(booking_event())).json()["event_id"] for _ in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await service.get("/v1/events", params=params)).json()
        seen.extend(e["id"] for e in page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids)
    assert len(seen) == 5


async def test_event_types_lists_the_catalog(service: Service) -> None:
    body = (await service.get("/v1/event-types")).json()
    types = {t["type"]: t for t in body["data"]}
    assert len(types) == 8
    assert types["payment.failed"]["critical"] is True
    assert types["chat.message.offline"]["fallback"] == {"push": "email"}


async def test_an_organization_document_applies_to_new_users_and_preview_overlays(service: Service) -> None:
    assert (
        await service.client.put("/v1/users/old", headers=service.auth, json={"organization_id": "org-2"})
    ).is_success
    put = await service.client.put(
        "/v1/organizations/org-1/preferences", headers=service.auth, json={"channels": {"in_app": False}}
    )
    assert put.is_success
    # "new" has no row yet: the event's organization applies to it; "old" keeps its own (no document)
    response = await service.post_event(booking_event(recipients=["new", "old"], organization_id="org-1"))
    in_app = {d["user_id"]: d for d in response.json()["deliveries"] if d["channel"] == "in_app"}
    assert (in_app["new"]["status"], in_app["new"]["reason"]) == ("suppressed", "opted_out")
    assert in_app["old"]["status"] == "queued"
    # a preview's inline organization applies without being stored
    preview = await service.client.post(
        "/v1/events/preview",
        headers=service.auth,
        json=booking_event(recipients=[{"id": "old", "organization_id": "org-1"}]),
    )
    [planned] = [p for p in preview.json()["plan"] if p["channel"] == "in_app"]
    assert (planned["status"], planned["source"]) == ("suppressed", "organization")
    assert (await service.get("/v1/users/old")).json()["organization_id"] == "org-2"


@pytest.mark.parametrize("with_inline_profiles", [False, True])
async def test_concurrent_events_creating_the_same_users_in_opposite_orders_are_all_accepted(
    service: Service, with_inline_profiles: bool
) -> None:
    # New users are created in id order whatever the recipient order, with or without inline profiles,
    # so concurrent events wait for each other's rows instead of deadlocking.
    ids = [f"new-{i}" for i in range(6)]
    inline = [{"id": u, "email": f"{u}@example.com"} for u in ids]
    bodies = [
        booking_event(recipients=inline if with_inline_profiles and n % 4 == 3 else ids[:: 1 if n % 2 else -1])
        for n in range(16)
    ]
    responses = await asyncio.gather(*(service.post_event(body) for body in bodies))
    assert [r.status_code for r in responses] == [202] * 16, [r.text for r in responses if r.status_code != 202]
    for user_id in ids:
        assert (await service.get(f"/v1/users/{user_id}")).status_code == 200
