"""Every route in ``API_ROUTES`` x every kind of credential -> exactly 401, 403, or through auth.

The routes come from the tuple the app serves, so a new route is covered (and must say how to fill
its path parameters) the moment it is registered. Expectations follow the route's declared auth
kind; ``test_declared_auth_kind_follows_the_contract`` checks the declared kind against the
contract's table, so a route cannot pass the matrix by declaring the wrong kind.

Decision recorded here: a route that only QStash may call answers 401 to any bearer credential,
valid or not. Its credential is ``Upstash-Signature``; a bearer token is not one it knows.

Extension recorded here: ``POST /v1/users/{sub}/inbox/realtime-token`` is for the user's own token only
("user"): it hands out a credential for that user's browser, which a service never needs (issue #18: never
the API key), so a service key gets 403 there although the contract lets services call every ``/v1/*``
route. The inbox demo's send route is behind the service key like the dashboard.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import secrets
import time
from collections.abc import Callable
from typing import Any, Literal

import jwt
import pytest

from notifier.api.common import ApiRoute, Auth
from notifier.app import API_ROUTES
from tests.conftest import SERVICE_KEY, Service, booking_event, user_token

PASSED: Literal["passed"] = "passed"
Expected = Literal[401, 403, "passed"]
OWN, OTHER, ORGANIZATION = "alice", "bob", "org-1"
SIGNING_KEY = "sig_test_current_0123456789abcdefghij"
PUBLIC_URL = "http://127.0.0.1:8000"
MALFORMED = ("Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer abc.def.ghi", f"Token {SERVICE_KEY}", "Bearer  ")
BAD_CREDENTIALS = ("none", "malformed", "wrong_key", "expired_own_token", "user_token_without_secret")
CREDENTIALS = (*BAD_CREDENTIALS, "own_user_token", "other_user_token", "qstash_signature", "service_key")
DASHBOARD_LOGIN = "/dashboard/login"
USER_SCOPED = re.compile(r"^/v1/users/\{user_id\}/(preferences|inbox)(/.*)?$")
USER_ONLY = {("POST", "/v1/users/{user_id}/inbox/realtime-token")}

# Routes whose behaviour contradicts the contract today. Strict xfail: fixing one fails the suite until it is removed.
# (method, path) -> why the route knowingly departs from the contract; runs as a strict xfail.
KNOWN_DEVIATIONS: dict[tuple[str, str], str] = {}


def contract_auth(route: ApiRoute) -> Auth:
    """The auth kind the contract's Authentication table gives this route."""
    if route.path.startswith("/v1/qstash/"):
        return "qstash"
    if (route.method, route.path) == ("POST", "/v1/events"):
        return "service_or_qstash"
    if (route.method, route.path) in USER_ONLY:
        return "user"
    if route.path == "/inbox-demo/send":
        # The service key, or the ticket the demo page got for it (none of the credentials here is a ticket);
        # the demo's sign-in form and page are "none", like the dashboard's login.
        return "service_or_ticket"
    if USER_SCOPED.match(route.path):
        return "user_or_service"
    if route.path == DASHBOARD_LOGIN:
        return "none"  # where an operator presents the service key; the contract's "dashboard" is behind it
    if route.path == "/dashboard" or route.path.startswith("/dashboard/"):
        return "dashboard"  # the service key, as a bearer header or as the session cookie signing in with it sets
    if route.path.startswith("/v1/"):
        return "service"
    return "none"


def expected(route: ApiRoute, credential: str) -> Expected:
    if route.auth == "none":
        return PASSED
    if credential in BAD_CREDENTIALS:
        return 401
    if route.auth == "qstash":
        # Only QStash may call these: a signature passes, any other valid credential is outside its scope.
        if credential == "qstash_signature":
            return PASSED
        return 401 if credential in ("expired_own_token", "user_token_without_secret") else 403
    if credential == "qstash_signature":
        # A signature is not a bearer credential: routes that take only API keys see no credential at all.
        return PASSED if route.auth == "service_or_qstash" else 401
    if credential == "service_key":
        return 403 if route.auth == "user" else PASSED
    if route.auth in ("user", "user_or_service") and credential == "own_user_token" and "{user_id}" in route.path:
        return PASSED
    return 403  # a valid user token outside its scope


def _params() -> list[Any]:
    params = []
    for route in API_ROUTES:
        reason = KNOWN_DEVIATIONS.get((route.method, route.path))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(route, id=f"{route.method} {route.path}", marks=marks))
    return params


def qstash_signature(url: str, body: bytes) -> str:
    now = int(time.time())
    digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).decode().rstrip("=")
    claims = {"iss": "Upstash", "sub": url, "iat": now, "nbf": now - 5, "exp": now + 300, "body": digest,
              "jti": f"jwt_{secrets.token_hex(12)}"}  # fmt: skip
    return jwt.encode(claims, SIGNING_KEY, algorithm="HS256")


def headers_for(credential: str, path: str, body: bytes, malformed: str = "") -> dict[str, str]:
    tokens = {
        "wrong_key": "not-the-service-key-0123456789",
        "service_key": SERVICE_KEY,
        "own_user_token": user_token(OWN),
        "other_user_token": user_token(OTHER),
        "expired_own_token": user_token(OWN, expires_in=-120),
        "user_token_without_secret": user_token(OWN),
    }
    if credential == "none":
        return {}
    if credential == "malformed":
        return {"Authorization": malformed}
    if credential == "qstash_signature":
        return {"Upstash-Signature": qstash_signature(PUBLIC_URL + path, body)}
    return {"Authorization": f"Bearer {tokens[credential]}"}


async def path_values(service: Service) -> dict[str, str]:
    """Real values for every path parameter a route may have: alice's event, delivery and inbox message."""
    for user_id in (OWN, OTHER):
        response = await service.client.put(
            f"/v1/users/{user_id}",
            headers=service.auth,
            json={"organization_id": ORGANIZATION, "email": f"{user_id}@example.com"},
        )
        assert response.status_code == 201
    accepted = (await service.post_event(booking_event(recipients=[OWN]))).json()
    await service.drain()
    [delivery] = [d for d in accepted["deliveries"] if d["channel"] == "in_app"]
    inbox = (await service.get(f"/v1/users/{OWN}/inbox")).json()
    together = (await service.post_event(booking_event(recipients=[OWN, OTHER]))).json()
    await service.drain()
    grouped = next(d for d in together["deliveries"] if d["channel"] == "in_app")
    group_id = (await service.get(f"/v1/deliveries/{grouped['id']}")).json()["send_group"]
    assert group_id is not None  # the two in-app deliveries of one event went as one send group
    return {
        "user_id": OWN,
        "organization_id": ORGANIZATION,
        "event_id": accepted["event_id"],
        "delivery_id": delivery["id"],
        "group_id": group_id,
        "message_id": inbox["data"][0]["id"],
        "name": "preferences.js",
        "version": "0123456789ab",
    }


def fill(route: ApiRoute, values: dict[str, str]) -> str:
    names = re.findall(r"{(\w+)}", route.path)
    missing = [name for name in names if name not in values]
    if missing:
        pytest.fail(f"{route.method} {route.path}: teach path_values() a real value for {missing}")
    return re.sub(r"{(\w+)}", lambda m: values[m.group(1)], route.path)


async def call(service: Service, route: ApiRoute, path: str, credential: str, malformed: str = "") -> int:
    body = b"{}" if route.method in ("POST", "PUT", "PATCH") else b""
    headers = headers_for(credential, path, body, malformed)
    if body:
        headers["Content-Type"] = "application/json"
    response = await service.client.request(route.method, path, content=body, headers=headers)
    if response.status_code in (401, 403):
        assert response.headers["content-type"] == "application/problem+json"
    if response.status_code == 401:
        assert response.headers.get("www-authenticate", "").startswith("Bearer") or route.auth == "qstash"
    return response.status_code


@pytest.mark.parametrize("route", _params())
async def test_auth_matrix(
    service_factory: Callable[..., contextlib.AbstractAsyncContextManager[Service]], route: ApiRoute
) -> None:
    keys = {
        "public_url": PUBLIC_URL,
        "qstash_current_signing_key": SIGNING_KEY,
        "qstash_next_signing_key": SIGNING_KEY[::-1],
    }
    observed: dict[str, int] = {}
    async with service_factory(**keys) as service:
        path = fill(route, await path_values(service))
        for credential in CREDENTIALS:
            if credential == "user_token_without_secret":
                continue
            if credential == "malformed":
                for i, header in enumerate(MALFORMED):
                    observed[f"malformed[{i}] {header.split(' ')[0]}"] = await call(
                        service, route, path, credential, header
                    )
            else:
                observed[credential] = await call(service, route, path, credential)
    async with service_factory(user_jwt_secret=None, **keys) as bare:
        observed["user_token_without_secret"] = await call(bare, route, path, "user_token_without_secret")

    mismatches = []
    for credential, status in observed.items():
        want = expected(route, credential.split("[")[0])
        outcome = status if status in (401, 403) else PASSED
        if outcome != want or status >= 500:
            mismatches.append(f"{credential}: got {status}, want {want}")
    assert not mismatches, f"{route.method} {route.path} ({route.auth}):\n" + "\n".join(mismatches)


@pytest.mark.parametrize("route", _params())
def test_declared_auth_kind_follows_the_contract(route: ApiRoute) -> None:
    assert route.auth == contract_auth(route)


def test_the_matrix_can_tell_the_cases_apart() -> None:
    """The expectation table itself: every kind yields the statuses the contract names."""
    by_kind = {
        kind: {c: expected(ApiRoute("GET", "/v1/users/{user_id}/inbox", _never, "", kind), c) for c in CREDENTIALS}
        for kind in ("service", "user", "user_or_service", "qstash", "service_or_qstash", "none")
    }
    assert by_kind["user"]["own_user_token"] == PASSED
    assert by_kind["user"]["service_key"] == 403
    assert by_kind["user"]["other_user_token"] == 403
    assert by_kind["user"]["qstash_signature"] == 401
    assert by_kind["user_or_service"]["own_user_token"] == PASSED
    assert by_kind["user_or_service"]["other_user_token"] == 403
    assert by_kind["service"]["own_user_token"] == 403
    assert by_kind["service_or_qstash"]["qstash_signature"] == PASSED
    assert by_kind["service"]["qstash_signature"] == 401
    assert by_kind["qstash"]["service_key"] == 403
    assert set(by_kind["none"].values()) == {PASSED}
    assert all(by_kind[kind][c] == 401 for kind in by_kind if kind != "none" for c in BAD_CREDENTIALS)


async def _never(*_: Any) -> Any:
    raise AssertionError("not called")
