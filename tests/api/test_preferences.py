"""The preferences API on SQLite and PostgreSQL: ETags, merge patch, validation, audit trail, effective values."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Session

from notifier.api import preferences
from notifier.errors import NotReady
from notifier.models import PreferenceChange
from tests.conftest import SERVICE_KEY, Service, booking_event, user_token

USER = "/v1/users/alice/preferences"
MERGE = {"Content-Type": "application/merge-patch+json"}
DEFAULT_CHANNELS = {"push": True, "email": True, "in_app": True}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def put(service: Service, body: Any, path: str = USER, **headers: str) -> httpx.Response:
    return await service.client.put(path, json=body, headers={**service.auth, **headers})


async def patch(service: Service, body: Any, path: str = USER, **headers: str) -> httpx.Response:
    return await service.client.patch(path, content=json.dumps(body), headers={**service.auth, **MERGE, **headers})


async def history(service: Service, path: str = USER, **params: str) -> dict[str, Any]:
    response = await service.get(f"{path}/history", params=params)
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


async def test_an_unknown_user_reads_defaults_at_version_0_without_creating_anyone(service: Service) -> None:
    response = await service.get(USER)
    assert response.status_code == 200
    assert response.headers["etag"] == '"0"'
    assert response.json() == {
        "channels": DEFAULT_CHANNELS,
        "categories": {},
        "event_types": {},
        "quiet_hours": None,
        "muted_until": None,
        "version": 0,
    }
    assert (await service.get("/v1/users/alice")).status_code == 404


async def test_put_stores_the_document_creates_a_bare_user_and_returns_it_with_an_etag(service: Service) -> None:
    document = {
        "channels": {"push": False},
        "categories": {"chat": {"email": True}},
        "event_types": {"payment.received": {"email": False}},
        "quiet_hours": {"start": "22:00", "end": "07:00", "timezone": "Europe/Berlin"},
    }
    response = await put(service, document)
    assert response.status_code == 200
    assert response.headers["etag"] == '"1"'
    expected = {
        **document,
        "channels": {"push": False, "email": True, "in_app": True},
        "muted_until": None,
        "version": 1,
    }
    assert response.json() == expected
    again = await service.get(USER)
    assert (again.json(), again.headers["etag"]) == (expected, '"1"')
    user = (await service.get("/v1/users/alice")).json()
    assert (user["id"], user["email"], user["roles"]) == ("alice", None, [])


@pytest.mark.parametrize(
    ("stored_versions", "if_match", "status", "version_after"),
    [
        (1, '"1"', 200, 2),  # names the current version
        (1, '"0", "1"', 200, 2),  # any tag in a list may match
        (2, '"1"', 412, 2),  # stale
        (1, 'W/"1"', 412, 1),  # weak tags never match If-Match
        (1, "1", 412, 1),  # not an entity tag
        (1, "*", 200, 2),  # exists
        (0, "*", 412, 0),  # "*" needs stored preferences
        (0, '"0"', 200, 1),  # the defaults' ETag guards the first write
        (0, None, 200, 1),  # unconditional
    ],
)
async def test_if_match(
    service: Service, stored_versions: int, if_match: str | None, status: int, version_after: int
) -> None:
    for _ in range(stored_versions):
        assert (await put(service, {"channels": {"email": False}})).status_code == 200
    headers = {"If-Match": if_match} if if_match is not None else {}
    response = await put(service, {"channels": {"push": False}}, **headers)
    assert response.status_code == status
    current = await service.get(USER)
    assert current.json()["version"] == version_after
    if status == 412:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == 412
        assert current.json()["channels"]["push"] is True  # nothing written
    else:
        assert response.headers["etag"] == f'"{version_after}"'
        assert current.json()["channels"]["push"] is False
    assert len((await history(service))["data"]) == version_after


async def test_merge_patch_sets_nested_values_and_null_deletes(service: Service) -> None:
    await put(
        service,
        {
            "categories": {"chat": {"email": True}},
            "quiet_hours": {"start": "22:00", "end": "07:00"},
            "event_types": {"payment.received": {"email": False}},
        },
    )
    response = await patch(
        service, {"categories": {"chat": {"push": False}}, "channels": {"in_app": False}}, **{"If-Match": '"1"'}
    )
    assert response.status_code == 200
    assert response.headers["etag"] == '"2"'
    body = response.json()
    assert body["categories"] == {"chat": {"email": True, "push": False}}  # merged, not replaced
    assert body["channels"] == {"push": True, "email": True, "in_app": False}
    assert body["quiet_hours"] == {"start": "22:00", "end": "07:00", "timezone": None}

    response = await patch(
        service,
        {
            "quiet_hours": None,
            "event_types": {"payment.received": {"email": None}},
            "categories": {"chat": {"email": None}},
        },
    )
    assert response.status_code == 200
    body = response.json()
    assert body["quiet_hours"] is None
    assert body["event_types"] == {"payment.received": {}}
    assert body["categories"] == {"chat": {"push": False}}
    assert body["version"] == 3


async def test_merge_patch_on_nothing_stored_patches_the_defaults(service: Service) -> None:
    response = await patch(service, {"event_types": {"booking.confirmed": {"push": True}}})
    assert response.status_code == 200
    assert response.json()["event_types"] == {"booking.confirmed": {"push": True}}
    assert response.json()["version"] == 1


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", None])
async def test_patch_needs_the_merge_patch_media_type(service: Service, content_type: str | None) -> None:
    headers = {**service.auth, **({"Content-Type": content_type} if content_type else {})}
    response = await service.client.patch(USER, content=b'{"channels": {"push": false}}', headers=headers)
    assert response.status_code == 415
    assert "application/merge-patch+json" in response.json()["detail"]
    assert (await service.get(USER)).json()["version"] == 0


async def test_every_bad_field_is_listed_in_one_422_and_nothing_is_written(
    service_factory: Callable[..., contextlib.AbstractAsyncContextManager[Service]], tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        '[types."digest.weekly"]\ncategory = "digests"\ndefault_channels = ["in_app"]\nrequired = []\n'
        '[types."digest.weekly".templates.default.en]\ntitle = "Your week"\nbody = "Here it is."\n',
        encoding="utf-8",
    )
    async with service_factory(catalog_path=catalog) as service:
        await put(service, {"channels": {"email": False}})
        bad = {
            "channels": {"sms": True, "push": "yes"},
            "categories": {"gossip": {"push": False}, "chat": {"fax": True}},
            "event_types": {"no.such.type": {}, "digest.weekly": {"email": True, "push": False}},
            "quiet_hours": {"start": "25:00", "end": "7am", "timezone": "Mars/Olympus"},
            "muted_until": "soon",
            "colour": "red",
        }
        response = await put(service, bad)
        assert response.status_code == 422
        problem = response.json()
        assert response.headers["content-type"] == "application/problem+json"
        by_loc = {tuple(e["loc"]): e["msg"] for e in problem["errors"]}
        assert set(by_loc) == {
            ("channels", "sms"),
            ("channels", "push"),
            ("categories", "gossip"),
            ("categories", "chat", "fax"),
            ("event_types", "no.such.type"),
            ("event_types", "digest.weekly", "email"),
            ("quiet_hours", "start"),
            ("quiet_hours", "end"),
            ("quiet_hours", "timezone"),
            ("muted_until",),
            ("colour",),
        }
        cannot = "event type 'digest.weekly' cannot use channel 'email'"
        assert by_loc[("event_types", "digest.weekly", "email")] == cannot
        assert by_loc[("quiet_hours", "timezone")] == "unknown time zone 'Mars/Olympus'"
        assert "sms" in by_loc[("channels", "sms")]
        # the same document through PATCH is refused the same way
        patched = await patch(service, bad)
        assert patched.status_code == 422
        assert {tuple(e["loc"]) for e in patched.json()["errors"]} == set(by_loc)
        current = (await service.get(USER)).json()
        assert (current["version"], current["channels"]["email"]) == (1, False)
        assert len((await history(service))["data"]) == 1


@pytest.mark.parametrize(
    ("body", "locs"),
    [
        ({"categories": ["chat"], "event_types": "all"}, [["categories"], ["event_types"]]),
        ([1, 2], [[]]),
        ({"quiet_hours": "22-7"}, [["quiet_hours"]]),
    ],
)
async def test_wrongly_shaped_documents_are_422_not_500(service: Service, body: Any, locs: list[list[str]]) -> None:
    response = await put(service, body)
    assert response.status_code == 422
    assert sorted(e["loc"] for e in response.json()["errors"]) == sorted(locs)


async def test_a_past_muted_until_is_accepted_as_not_muted(service: Service) -> None:
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=3)).replace(microsecond=0)
    response = await put(service, {"muted_until": past})
    assert (response.status_code, response.json()["muted_until"]) == (200, None)
    response = await patch(service, {"muted_until": future.isoformat().replace("+00:00", "Z")})
    assert dt.datetime.fromisoformat(response.json()["muted_until"]) == future


async def test_history_is_newest_first_names_the_writer_and_pages_with_a_cursor(service: Service) -> None:
    await put(service, {"channels": {"push": False}})
    own = await service.client.patch(
        USER, content=b'{"channels": {"email": false}}', headers={**bearer(user_token("alice")), **MERGE}
    )
    assert own.status_code == 200
    await put(service, {})
    pages, cursor = [], None
    while True:
        page = await history(service, limit="2", **({"cursor": cursor} if cursor else {}))
        pages.append(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [2, 1]
    rows = [row for page in pages for row in page]
    assert [r["version"] for r in rows] == [3, 2, 1]
    assert [r["changed_by"] for r in rows] == ["service", "user:alice", "service"]
    assert rows[2]["old"] is None
    assert rows[2]["new"]["channels"] == {"push": False}
    assert rows[1]["old"] == rows[2]["new"]
    assert rows[1]["new"]["channels"] == {"push": False, "email": False}
    assert rows[0]["new"]["channels"] == {}
    own_view = await service.client.get(f"{USER}/history", headers=bearer(user_token("alice")))
    assert [r["version"] for r in own_view.json()["data"]] == [3, 2, 1]


async def test_a_write_that_fails_at_commit_leaves_neither_document_nor_history(service: Service) -> None:
    await put(service, {"channels": {"push": False}})

    class FailingCommit(Session):
        pass

    @event.listens_for(FailingCommit, "before_commit")
    def _fail(session: Session) -> None:
        session.flush()  # the new document and its history row are now in the transaction
        assert session.execute(sa.select(sa.func.count()).select_from(PreferenceChange)).scalar_one() == 2
        raise NotReady("simulated failure at commit")

    working = service.runtime.sessions
    service.runtime.sessions = async_sessionmaker(
        service.runtime.engine, sync_session_class=FailingCommit, expire_on_commit=False, autoflush=False
    )
    try:
        response = await put(service, {"channels": {"email": False}})
    finally:
        service.runtime.sessions = working
    assert response.status_code == 503
    current = (await service.get(USER)).json()
    assert (current["version"], current["channels"]) == (1, {"push": False, "email": True, "in_app": True})
    assert [r["version"] for r in (await history(service))["data"]] == [1]


async def test_effective_names_the_level_that_decided_each_pair(service: Service) -> None:
    assert (
        await service.client.put("/v1/users/alice", headers=service.auth, json={"organization_id": "org-1"})
    ).status_code == 201
    org = await put(
        service,
        {"event_types": {"booking.confirmed": {"push": True}}, "categories": {"approvals": {"email": False}}},
        path="/v1/organizations/org-1/preferences",
    )
    assert org.status_code == 200
    await put(
        service,
        {
            "channels": {"in_app": False},
            "categories": {"chat": {"push": False}},
            "event_types": {"payment.received": {"email": False}},
        },
    )
    response = await service.client.get(f"{USER}/effective", headers=bearer(user_token("alice")))
    assert response.status_code == 200
    body = response.json()
    assert (body["organization_id"], body["version"]) == ("org-1", 1)
    types = body["event_types"]
    expected = {
        ("payment.received", "email"): (False, "event_type"),
        ("chat.message.offline", "push"): (False, "category"),
        ("booking.confirmed", "push"): (True, "organization"),
        ("approval.requested", "email"): (False, "organization"),
        ("booking.confirmed", "email"): (True, "default"),
        ("chat.message.offline", "email"): (False, "default"),
        ("booking.confirmed", "in_app"): (False, "channel"),
        ("payment.failed", "email"): (True, "critical"),
        ("payment.failed", "in_app"): (True, "critical"),
    }
    for (name, channel), (enabled, source) in expected.items():
        assert types[name]["channels"][channel]["enabled"] is enabled, (name, channel)
        assert types[name]["channels"][channel]["source"] == source, (name, channel)
    assert len(types) == 8
    assert all(set(t["channels"]) == {"push", "email", "in_app"} for t in types.values())
    assert types["approval.responded"]["allowed_channels"] == ["email", "in_app", "push"]
    assert types["approval.responded"]["default_channels"] == ["in_app", "push"]
    # the baseline is what the pair would be if the user stated nothing
    assert types["payment.received"]["channels"]["email"]["baseline"] == {"enabled": True, "source": "default"}
    assert types["booking.confirmed"]["channels"]["push"]["baseline"] == {"enabled": True, "source": "organization"}


async def test_organization_defaults_steer_routing_until_the_user_says_otherwise(service: Service) -> None:
    await service.client.put("/v1/users/alice", headers=service.auth, json={"organization_id": "org-1"})
    response = await put(
        service, {"event_types": {"booking.confirmed": {"in_app": False}}}, path="/v1/organizations/org-1/preferences"
    )
    assert (response.status_code, response.headers["etag"]) == (200, '"1"')
    org = await service.get("/v1/organizations/org-1/preferences")
    assert org.json()["event_types"] == {"booking.confirmed": {"in_app": False}}
    org_history = await history(service, path="/v1/organizations/org-1/preferences")
    assert [(r["version"], r["changed_by"]) for r in org_history["data"]] == [(1, "service")]

    first = await service.post_event(booking_event(recipients=["alice"], idempotency_key="b-1"))
    in_app = [d for d in first.json()["deliveries"] if d["channel"] == "in_app"]
    assert [(d["status"], d["reason"]) for d in in_app] == [("suppressed", "opted_out")]

    await put(service, {"event_types": {"booking.confirmed": {"in_app": True}}})
    second = await service.post_event(booking_event(recipients=["alice"], idempotency_key="b-2"))
    in_app = [d for d in second.json()["deliveries"] if d["channel"] == "in_app"]
    assert [(d["status"], d["reason"]) for d in in_app] == [("queued", None)]


async def test_organization_defaults_refuse_personal_fields_and_user_tokens(service: Service) -> None:
    path = "/v1/organizations/org-1/preferences"
    response = await put(
        service,
        {"quiet_hours": {"start": "22:00", "end": "07:00"}, "muted_until": None, "channels": {"fax": False}},
        path=path,
    )
    assert response.status_code == 422
    assert sorted(e["loc"] for e in response.json()["errors"]) == [["channels", "fax"], ["quiet_hours"]]
    echoed = (await service.get(path)).json()  # what GET shows can be PUT back
    assert (await put(service, echoed, path=path)).status_code == 200
    refused = await service.client.put(path, json={}, headers=bearer(user_token("alice")))
    assert refused.status_code == 403


@pytest.mark.parametrize("stored", [True, False], ids=["update", "first-write"])
async def test_concurrent_writes_with_one_if_match_have_exactly_one_winner(
    service: Service, monkeypatch: pytest.MonkeyPatch, stored: bool
) -> None:
    writers = 8
    if stored:
        assert (await put(service, {"channels": {"push": False}})).status_code == 200
    if service.runtime.engine.dialect.name == "postgresql":
        # Make every writer read the same version before any of them writes, so the race is real.
        # (SQLite serialises writers with BEGIN IMMEDIATE; there the later ones simply see the new version.)
        barrier = asyncio.Barrier(writers)
        load = preferences._load

        async def load_then_wait(*args: Any, **kwargs: Any) -> tuple[dict[str, Any] | None, int]:
            result = await load(*args, **kwargs)
            async with asyncio.timeout(10):
                await barrier.wait()
            return result

        monkeypatch.setattr(preferences, "_load", load_then_wait)
    version = '"1"' if stored else '"0"'
    responses = await asyncio.gather(
        *(
            put(
                service,
                {"event_types": {"booking.confirmed": {"push": i % 2 == 0}}, "channels": {"email": i > 3}},
                **{"If-Match": version},
            )
            for i in range(writers)
        )
    )
    monkeypatch.undo()
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [412] * (writers - 1)
    [winner] = [r for r in responses if r.status_code == 200]
    current = (await service.get(USER)).json()
    assert current == winner.json()
    assert current["version"] == (2 if stored else 1)
    assert len((await history(service))["data"]) == current["version"]


async def test_user_tokens_reach_only_their_own_preferences(service: Service) -> None:
    own = await service.client.put(USER, json={"channels": {"push": False}}, headers=bearer(user_token("alice")))
    assert own.status_code == 200
    other = await service.client.get(USER, headers=bearer(user_token("bob")))
    assert other.status_code == 403
    expired = await service.client.get(USER, headers=bearer(user_token("alice", expires_in=-60)))
    assert expired.status_code == 401
    assert (await service.client.get(USER, headers=bearer(SERVICE_KEY))).json()["version"] == 1
