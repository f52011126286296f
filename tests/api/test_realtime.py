"""POST /v1/users/{id}/inbox/realtime-token, and CORS on the routes the inbox component calls."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable

import pytest
from pydantic import ValidationError

from notifier.config import Settings
from tests.conftest import SERVICE_KEY, Service, user_token
from tests.fakes.ably import AblyFake, ably_mac

ServiceFactory = Callable[..., contextlib.AbstractAsyncContextManager[Service]]
ROUTE = "/v1/users/alice/inbox/realtime-token"
APP = "https://app.example.com"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_the_users_own_token_gets_a_subscribe_only_token_request(
    service_factory: ServiceFactory, ably_fake: AblyFake
) -> None:
    async with service_factory(ably_api_key=ably_fake.api_key, ably_rest_url=ably_fake.url) as service:
        before = int(time.time() * 1000)
        answer = await service.client.post(ROUTE, headers=bearer(user_token("alice")))
    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert body["mode"] == "ably"
    assert body["channel"] == "notifications:alice"
    assert body["token_url"] == f"{ably_fake.url}/keys/fakeapp.fakekey/requestToken"
    assert body["sse_url"] == f"{ably_fake.url}/sse?v=1.2&channels=notifications%3Aalice"
    assert body["ttl_seconds"] == 900
    request = body["token_request"]
    assert json.loads(request["capability"]) == {"notifications:alice": ["subscribe"]}
    assert (request["clientId"], request["ttl"], request["keyName"]) == ("alice", 900_000, "fakeapp.fakekey")
    assert request["timestamp"] >= before
    assert request["mac"] == ably_mac("fake-key-secret-0123456789", request)
    assert "fake-key-secret" not in answer.text  # the key's secret never leaves the service
    assert ably_fake.requests == []  # signed locally: the route makes no call to Ably


async def test_the_ttl_is_a_setting(service_factory: ServiceFactory, ably_fake: AblyFake) -> None:
    settings = {"ably_api_key": ably_fake.api_key, "ably_rest_url": ably_fake.url, "realtime_token_ttl_seconds": 60}
    async with service_factory(**settings) as service:
        body = (await service.client.post(ROUTE, headers=bearer(user_token("alice")))).json()
    assert (body["ttl_seconds"], body["token_request"]["ttl"]) == (60, 60_000)


@pytest.mark.parametrize("ttl", [59, 3601])
def test_the_ttl_stays_short(ttl: int) -> None:
    with pytest.raises(ValidationError, match="realtime_token_ttl_seconds"):
        Settings(realtime_token_ttl_seconds=ttl)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        (bearer(user_token("alice", expires_in=-60)), 401),
        (bearer("not-a-key-0123456789"), 401),
        (bearer(user_token("bob")), 403),  # another user's token: never a token for alice's channel
        (bearer(SERVICE_KEY), 403),  # the service key: never a browser credential
    ],
)
async def test_nobody_else_gets_one(
    service_factory: ServiceFactory, ably_fake: AblyFake, headers: dict[str, str], status: int
) -> None:
    async with service_factory(ably_api_key=ably_fake.api_key, ably_rest_url=ably_fake.url) as service:
        answer = await service.client.post(ROUTE, headers=headers)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/problem+json"
    assert "token_request" not in answer.text


async def test_without_ably_the_component_is_told_to_poll(service: Service) -> None:
    answer = await service.client.post(ROUTE, headers=bearer(user_token("alice")))
    assert answer.status_code == 200
    assert answer.json()["mode"] == "polling"
    assert answer.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("user", ["team*", "a,b"])
async def test_a_user_id_ably_would_misread_is_told_to_poll(
    service_factory: ServiceFactory, ably_fake: AblyFake, user: str
) -> None:
    async with service_factory(ably_api_key=ably_fake.api_key, ably_rest_url=ably_fake.url) as service:
        answer = await service.client.post(f"/v1/users/{user}/inbox/realtime-token", headers=bearer(user_token(user)))
    assert answer.json()["mode"] == "polling"  # "notifications:team*" would be a wildcard over other channels


async def test_the_route_is_documented_for_user_tokens_only(service: Service) -> None:
    document = (await service.client.get("/openapi.json")).json()
    operation = document["paths"]["/v1/users/{user_id}/inbox/realtime-token"]["post"]
    assert operation["security"] == [{"userToken": []}]
    assert {"200", "401", "403"} <= set(operation["responses"])


# ---- CORS -------------------------------------------------------------------------------------------------


def preflight(origin: str, method: str = "POST") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization",
    }


async def test_allowed_origins_pass_preflight_with_authorization(service_factory: ServiceFactory) -> None:
    async with service_factory(cors_origins=f"{APP}, http://localhost:3000") as service:
        for path in (ROUTE, "/v1/users/alice/inbox", "/v1/users/alice/inbox/read-all", "/v1/users/alice/inbox/x/read"):
            answer = await service.client.options(path, headers=preflight(APP))
            assert answer.status_code == 204, path
            assert answer.headers["access-control-allow-origin"] == APP
            assert "authorization" in answer.headers["access-control-allow-headers"].lower()
            assert set(answer.headers["access-control-allow-methods"].split(", ")) == {"GET", "POST"}
            assert "access-control-allow-credentials" not in answer.headers
        listed = await service.client.get(
            "/v1/users/alice/inbox", headers={"Origin": APP, **bearer(user_token("alice"))}
        )
        assert listed.status_code == 200
        assert listed.headers["access-control-allow-origin"] == APP
        assert "Origin" in listed.headers["vary"]
        refused = await service.client.get("/v1/users/alice/inbox", headers={"Origin": APP})
        assert (refused.status_code, refused.headers["access-control-allow-origin"]) == (401, APP)  # readable 401


async def test_other_origins_and_other_routes_get_no_cors(service_factory: ServiceFactory) -> None:
    async with service_factory(cors_origins=APP) as service:
        evil = await service.client.options("/v1/users/alice/inbox", headers=preflight("https://evil.example"))
        assert evil.status_code == 405
        assert "access-control-allow-origin" not in evil.headers
        listed = await service.client.get(
            "/v1/users/alice/inbox", headers={"Origin": "https://evil.example", **bearer(user_token("alice"))}
        )
        assert "access-control-allow-origin" not in listed.headers
        prefs = await service.client.options("/v1/users/alice/preferences", headers=preflight(APP, "PUT"))
        assert "access-control-allow-origin" not in prefs.headers
        events = await service.client.options("/v1/events", headers=preflight(APP))
        assert "access-control-allow-origin" not in events.headers


async def test_by_default_only_the_same_origin_may_call(service: Service) -> None:
    answer = await service.client.options("/v1/users/alice/inbox", headers=preflight(APP))
    assert "access-control-allow-origin" not in answer.headers


@pytest.mark.parametrize("value", ["*", "app.example.com", "https://app.example.com/path"])
def test_cors_origins_must_be_origins(value: str) -> None:
    with pytest.raises(ValidationError, match="NOTIFIER_CORS_ORIGINS"):
        Settings(cors_origins=value)


def test_cors_origins_are_split_and_trimmed() -> None:
    settings = Settings(cors_origins=" https://a.example , http://localhost:3000/ ")
    assert settings.cors_origins == ("https://a.example", "http://localhost:3000")
