"""The preferences API on SQLite and PostgreSQL: ETags, merge patch, validation, audit trail, effective values."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Session

from notifier.db import preferences
from notifier.db.models import PreferenceChange
from notifier.errors import NotReady
from tests.conftest import SERVICE_KEY, Service, booking_event, user_token
from tests.security.test_hostile_values import row_counts

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
        (1, '"01"', 412, 1),  # tags compare as strings, not numbers
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


ORG = "/v1/organizations/org-1/preferences"


async def get(service: Service, path: str = USER, if_none_match: str | bytes | None = None) -> httpx.Response:
    headers: dict[str, str | bytes] = {**service.auth}
    if if_none_match is not None:
        headers["If-None-Match"] = if_none_match
    return await service.client.get(path, headers=headers)


def assert_not_modified(response: httpx.Response, full: httpx.Response) -> None:
    """An empty 304 with the 200's ETag and every other header the 200 has, except those describing its body."""
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == full.headers["etag"]
    assert "content-type" not in response.headers
    body_headers = {"content-type", "content-length", "x-request-id"}
    assert set(response.headers) - body_headers == set(full.headers) - body_headers


@pytest.mark.parametrize("path", [USER, ORG], ids=["user", "organization"])
@pytest.mark.parametrize(
    ("stored_versions", "if_none_match", "status"),
    [
        (1, '"1"', 304),  # names the current version
        (1, 'W/"1"', 304),  # weak comparison: a weak tag matches too
        (1, '"7", W/"1" ,"0"', 304),  # any tag in a list may match
        (2, '"1"', 200),  # stale: the document changed since
        (1, "*", 304),  # a document is stored
        (0, "*", 200),  # only the defaults: "*" needs a stored document, as for If-Match
        (0, '"0"', 304),  # the defaults' own ETag
        (1, "1", 200),  # malformed: not an entity tag
        (1, '"1', 200),  # malformed: unterminated
        (1, 'W/"1"x, "', 200),  # malformed
        (1, '"01"', 200),  # tags compare as strings, not numbers
        (1, b'"\xb2"', 200),  # a Latin-1 superscript two is no version
        pytest.param(1, f'"{"9" * 5000}"', 200, id="1-5000 digits-200"),  # too long for int()
    ],
)
async def test_if_none_match(
    service: Service, path: str, stored_versions: int, if_none_match: str | bytes, status: int
) -> None:
    for _ in range(stored_versions):
        assert (await put(service, {"channels": {"email": False}}, path=path)).status_code == 200
    full = await get(service, path)
    assert (full.status_code, full.headers["etag"]) == (200, f'"{stored_versions}"')
    response = await get(service, path, if_none_match)
    if status == 304:
        assert_not_modified(response, full)
    else:
        assert response.status_code == 200
        assert response.headers["etag"] == f'"{stored_versions}"'
        assert response.json() == full.json()


async def test_if_none_match_with_an_old_tag_gets_the_new_document(service: Service) -> None:
    assert (await put(service, {"channels": {"push": False}})).status_code == 200
    cached = await get(service)
    assert_not_modified(await get(service, if_none_match=cached.headers["etag"]), cached)
    assert (await patch(service, {"channels": {"email": False}})).status_code == 200
    response = await get(service, if_none_match=cached.headers["etag"])
    assert (response.status_code, response.headers["etag"]) == (200, '"2"')
    assert response.json()["version"] == 2
    assert response.json()["channels"] == {"push": False, "email": False, "in_app": True}
    assert_not_modified(await get(service, if_none_match='W/"2"'), response)


@pytest.mark.parametrize("if_none_match", ['"1"', "*"])
async def test_if_none_match_never_answers_a_caller_who_may_not_read(service: Service, if_none_match: str) -> None:
    assert (await put(service, {})).status_code == 200
    assert (await put(service, {}, path=ORG)).status_code == 200
    refusals = [
        (USER, {}, 401),  # no credential
        (USER, bearer("not-a-key"), 401),
        (USER, bearer(user_token("alice", expires_in=-60)), 401),
        (USER, bearer(user_token("bob")), 403),  # another user's token
        (ORG, {}, 401),
        (ORG, bearer(user_token("alice")), 403),  # organization defaults are service-only
    ]
    for path, headers, status in refusals:
        without = await service.client.get(path, headers=headers)
        response = await service.client.get(path, headers={**headers, "If-None-Match": if_none_match})
        assert (path, response.status_code) == (path, status)
        assert response.headers["content-type"] == "application/problem+json"
        assert "etag" not in response.headers
        assert response.json() == without.json()
    own = await service.client.get(USER, headers={**bearer(user_token("alice")), "If-None-Match": if_none_match})
    assert (own.status_code, own.content, own.headers["etag"]) == (304, b"", '"1"')


@pytest.mark.parametrize("tag", [b'"\xb2"', f'"{"9" * 5000}"'.encode()], ids=["superscript two", "5000 digits"])
async def test_if_match_with_a_tag_that_is_no_version_is_412_not_500(service: Service, tag: bytes) -> None:
    assert (await put(service, {})).status_code == 200
    response = await service.client.put(USER, json={}, headers={**service.auth, "If-Match": tag})
    assert response.status_code == 412


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


@pytest.mark.parametrize("write", [put, patch])
@pytest.mark.parametrize(
    ("path", "locs"),
    [
        ("/v1/users/%2E%2E/preferences", [["path", "user_id"]]),
        ("/v1/users/a%00b/preferences", [["path", "user_id"]]),
        # an organization's document is still validated as one: quiet hours are personal
        ("/v1/organizations/%2E/preferences", [["path", "organization_id"], ["quiet_hours"]]),
        (f"/v1/organizations/{'o' * 201}/preferences", [["path", "organization_id"], ["quiet_hours"]]),
    ],
    ids=["user-dots", "user-NUL", "organization-dot", "organization-too-long"],
)
async def test_a_bad_path_id_and_every_bad_field_are_named_in_one_422(
    service: Service, write: Callable[..., Awaitable[httpx.Response]], path: str, locs: list[list[str]]
) -> None:
    # PATCH has no stored document to patch for a bad id: the patch is validated as applied to none.
    body = {"channels": {"fax": True}, "colour": "red", "quiet_hours": {"start": "22:00", "end": "07:00"}}
    response = await write(service, body, path=path)
    assert response.status_code == 422, response.text
    assert sorted(e["loc"] for e in response.json()["errors"]) == sorted([*locs, ["channels", "fax"], ["colour"]])
    assert set((await row_counts(service)).values()) == {0}, "something was written"


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
        load = preferences.load

        async def load_then_wait(*args: Any, **kwargs: Any) -> tuple[dict[str, Any] | None, int]:
            result = await load(*args, **kwargs)
            async with asyncio.timeout(10):
                await barrier.wait()
            return result

        monkeypatch.setattr(preferences, "load", load_then_wait)
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
