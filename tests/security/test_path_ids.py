"""User and organization ids are URL path segments: an id with '/' (the router decodes %2F before matching) or
one that is '.' or '..' (URL resolution removes it) could be stored but never read, changed or erased again, so
every way in refuses it: a 422 naming the field and nothing written, or, as a user token's subject, no
credential (401). Every other id round-trips through the routes that name it."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import Service, booking_event, user_token
from tests.security.test_hostile_values import APPROVAL, row_counts

UNREACHABLE = ["a/b", "/", "org/../x", ".", ".."]
REACHABLE = ["a.b", "...", "a%2Fb", "ann@example.com", "a b?c#d", "Zoë"]


def _bodies(bad: str) -> list[tuple[str, str, Any, list[Any]]]:
    """(method, path, body, where the answer must name ``bad``) for every body field that holds an id."""
    event = booking_event
    return [
        ("POST", "/v1/events", event(recipients=[bad]), ["recipients", 0, "id"]),
        ("POST", "/v1/events", event(recipients=[{"id": bad, "email": "a@example.com"}]), ["recipients", 0, "id"]),
        ("POST", "/v1/events", event(organization_id=bad), ["organization_id"]),
        ("POST", "/v1/events", event(actor=bad), ["actor"]),
        ("POST", "/v1/events", event(audience={"organization_id": bad}), ["audience", "organization_id"]),
        (
            "POST",
            "/v1/events",
            {"type": "approval.responded", "data": {**APPROVAL, "requester_id": bad}},
            ["data", "requester_id"],
        ),
        ("POST", "/v1/events/preview", event(recipients=[bad]), ["recipients", 0, "id"]),
        ("PUT", "/v1/users/u-1", {"organization_id": bad}, ["organization_id"]),
    ]


@pytest.mark.parametrize("bad", UNREACHABLE)
async def test_an_id_no_path_can_name_is_refused_in_every_body(service: Service, bad: str) -> None:
    for method, path, body, loc in _bodies(bad):
        response = await service.client.request(method, path, json=body, headers=service.auth)
        assert response.status_code == 422, (path, body, response.text)
        assert loc in [e["loc"] for e in response.json()["errors"]], (loc, response.text)
    assert set((await row_counts(service)).values()) == {0}, "something was written"


@pytest.mark.parametrize("bad", UNREACHABLE)
async def test_the_inbox_demo_refuses_to_send_to_such_an_id(service: Service, bad: str) -> None:
    response = await service.client.post("/inbox-demo/send", data={"user_id": bad}, headers=service.auth)
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["errors"]] == [["body", "user_id"]]
    assert set((await row_counts(service)).values()) == {0}


@pytest.mark.parametrize(
    ("path", "loc"),
    [
        ("/v1/users/%2E%2E", ["path", "user_id"]),
        ("/v1/users/%2E/preferences", ["path", "user_id"]),
        ("/v1/organizations/%2E%2E/preferences", ["path", "organization_id"]),
    ],
)
async def test_a_dot_segment_id_in_a_path_is_refused(service: Service, path: str, loc: list[str]) -> None:
    response = await service.client.put(path, json={}, headers=service.auth)
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["errors"]] == [loc]
    assert set((await row_counts(service)).values()) == {0}


@pytest.mark.parametrize("user_id", REACHABLE)
async def test_any_other_id_can_be_stored_read_and_erased(service: Service, user_id: str) -> None:
    accepted = await service.post_event(booking_event(recipients=[user_id]))
    assert accepted.status_code == 202, accepted.text
    path = f"/v1/users/{quote(user_id, safe='')}"
    assert (await service.client.put(path, json={"name": "Ann"}, headers=service.auth)).status_code == 200
    assert (await service.get(path)).json()["id"] == user_id
    assert (await service.get(f"{path}/inbox")).status_code == 200
    assert (await service.client.delete(path, headers=service.auth)).status_code == 204
    assert (await service.get(path)).status_code == 404


@pytest.mark.parametrize("subject", ["a/b", "..", "alice\x00", "alice\ud800"], ids=["slash", "dots", "NUL", "lone"])
async def test_a_user_token_whose_subject_is_no_user_id_is_no_credential(service: Service, subject: str) -> None:
    # No path can name such a subject, so its own routes are out of reach; what matters is the kind of refusal:
    # not a user outside their scope (403) but no user at all.
    headers = {"Authorization": f"Bearer {user_token(subject)}"}
    response = await service.client.get("/v1/users/alice/preferences", headers=headers)
    assert response.status_code == 401, response.text
