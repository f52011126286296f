"""The component's script URLs and the /inbox-demo page, over HTTP (the browser tests are in tests/web/)."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable

import jwt
import pytest

from notifier.api.component import DEMO_SECONDS, component_path
from notifier.api.pages import STATIC_DIR
from tests.conftest import SERVICE_KEY, USER_JWT_SECRET, Service
from tests.fakes.ably import AblyFake

ServiceFactory = Callable[..., contextlib.AbstractAsyncContextManager[Service]]


async def test_the_plain_url_is_revalidated_and_names_the_versioned_one(service: Service) -> None:
    script = await service.client.get("/static/inbox.js")
    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert script.headers["cache-control"] == "no-cache"  # a deploy reaches every page at once
    assert script.content == (STATIC_DIR / "inbox.js").read_bytes()
    assert script.headers["access-control-allow-origin"] == "*"  # loadable as a module from another origin
    versioned = component_path()
    assert re.fullmatch(r"/static/inbox\.[0-9a-f]{12}\.js", versioned)
    assert script.headers["link"] == f'<{versioned}>; rel="canonical"'
    again = await service.client.get("/static/inbox.js", headers={"If-None-Match": script.headers["etag"]})
    assert (again.status_code, again.content) == (304, b"")
    changed = await service.client.get("/static/inbox.js", headers={"If-None-Match": '"something-else"'})
    assert changed.status_code == 200


async def test_the_versioned_url_is_cached_for_a_year(service: Service) -> None:
    script = await service.client.get(component_path())
    assert script.status_code == 200
    assert script.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert script.content == (STATIC_DIR / "inbox.js").read_bytes()
    stale = await service.client.get("/static/inbox.0123456789ab.js")
    assert stale.status_code == 302  # a page from before a deploy still gets a working script
    assert stale.headers["location"] == "/static/inbox.js"
    assert stale.headers["cache-control"] == "no-store"


async def test_the_demo_asks_for_a_service_key(service: Service) -> None:
    form = await service.client.get("/inbox-demo")
    assert form.status_code == 200
    assert 'name="key"' in form.text
    assert "<notifier-inbox" not in form.text
    assert form.headers["cache-control"] == "no-store"
    csp = form.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert "connect-src 'self';" in csp  # no Ably configured: nothing else to reach

    refused = await service.client.post("/inbox-demo", data={"key": "wrong-key-0123456789", "user_id": "alice"})
    assert refused.status_code == 401
    assert "<notifier-inbox" not in refused.text
    assert "not a valid service API key" in refused.text


async def test_the_demo_embeds_the_component_with_a_short_lived_user_token(service: Service) -> None:
    page = await service.client.post("/inbox-demo", data={"key": SERVICE_KEY, "user_id": "alice"})
    assert page.status_code == 200
    assert f'src="{component_path()}"' in page.text
    token = re.search(r'<notifier-inbox id="inbox" token="([^"]+)"', page.text)
    assert token is not None
    claims = jwt.decode(token.group(1), USER_JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert DEMO_SECONDS - 5 <= claims["exp"] - time.time() <= DEMO_SECONDS
    assert SERVICE_KEY not in page.text
    assert page.headers["cache-control"] == "no-store"


async def test_the_demo_sends_a_test_notification_with_its_ticket(service: Service) -> None:
    page = await service.client.post("/inbox-demo", data={"key": SERVICE_KEY, "user_id": "carol"})
    ticket = re.search(r'name="ticket" value="([^"]+)"', page.text)
    assert ticket is not None
    sent = await service.client.post("/inbox-demo/send", data={"ticket": ticket.group(1)})
    assert sent.status_code == 202
    assert {(d["user_id"], d["channel"]) for d in sent.json()["deliveries"]} >= {("carol", "in_app")}
    await service.drain()
    inbox = (await service.get("/v1/users/carol/inbox")).json()
    assert [item["type"] for item in inbox["data"]] == ["booking.confirmed"]

    forged = ticket.group(1).rsplit(".", 1)[0] + ".AAAA"
    assert (await service.client.post("/inbox-demo/send", data={"ticket": forged})).status_code == 401
    expired = f"{int(time.time()) - 1}." + ticket.group(1).split(".", 1)[1]
    assert (await service.client.post("/inbox-demo/send", data={"ticket": expired})).status_code == 401
    assert (await service.client.post("/inbox-demo/send", data={})).status_code == 401


async def test_a_ticket_dies_with_its_key(service_factory: ServiceFactory) -> None:
    async with service_factory() as service:
        page = await service.client.post("/inbox-demo", data={"key": SERVICE_KEY, "user_id": "carol"})
        ticket = re.search(r'name="ticket" value="([^"]+)"', page.text)
    assert ticket is not None
    async with service_factory(api_keys="rotated-service-key-0123456789-abcdefgh") as rotated:
        assert (await rotated.client.post("/inbox-demo/send", data={"ticket": ticket.group(1)})).status_code == 401


async def test_without_a_user_jwt_secret_the_demo_says_what_to_set(service_factory: ServiceFactory) -> None:
    async with service_factory(user_jwt_secret=None) as service:
        form = await service.client.get("/inbox-demo")
        assert "NOTIFIER_USER_JWT_SECRET" in form.text
        page = await service.client.post("/inbox-demo", data={"key": SERVICE_KEY, "user_id": "alice"})
    assert page.status_code == 200
    assert "<notifier-inbox" not in page.text
    assert "NOTIFIER_USER_JWT_SECRET" in page.text


@pytest.mark.parametrize("user_id", ["", "x" * 201, "bad\nid"])
async def test_the_demo_refuses_an_unusable_user_id(service: Service, user_id: str) -> None:
    page = await service.client.post("/inbox-demo", data={"key": SERVICE_KEY, "user_id": user_id})
    assert page.status_code == 422
    assert "<notifier-inbox" not in page.text


async def test_with_ably_the_demo_may_connect_to_its_host(service_factory: ServiceFactory, ably_fake: AblyFake) -> None:
    async with service_factory(ably_api_key=ably_fake.api_key, ably_rest_url=ably_fake.url) as service:
        form = await service.client.get("/inbox-demo")
    assert f"connect-src 'self' {ably_fake.url};" in form.headers["content-security-policy"]
