"""Forms a browser may post (dashboard sign-in, sign-out, retry; the inbox demo's sign-in) are refused with 403
when another site's page sent them: Origin, else Referer, must be this service's origin. In-process on SQLite and
PostgreSQL, then a cross-site page in Debian's Chromium."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from http.cookies import SimpleCookie

import pytest
from playwright.sync_api import Browser, Page, Route

from tests.conftest import SERVICE_KEY, LiveService, Service, live_service, make_settings
from tests.web.conftest import launch_chromium

ServiceFactory = Callable[..., contextlib.AbstractAsyncContextManager[Service]]
SELF = "http://notifier.test"  # the in-process client's base URL: the request's own origin
PUBLIC = "http://127.0.0.1:8000"  # NOTIFIER_PUBLIC_URL's default
CROSS_SITE = [
    {"Origin": "https://evil.example"},
    {"Origin": "null"},  # a sandboxed frame, a data: URL, a no-referrer page
    {"Origin": f"{SELF}.evil.example"},
    {"Origin": "http://notifier.test:8443"},  # another port is another origin
    {"Origin": f"{SELF}/dashboard"},  # not an origin at all
    {"Referer": "https://evil.example/page?key=guess"},  # no Origin (an old browser): the Referer decides
    {"Origin": "https://evil.example", "Referer": f"{SELF}/dashboard/login"},  # Origin wins
]
SAME_SITE = [
    {"Origin": SELF},
    {"Origin": PUBLIC},
    {"Referer": f"{SELF}/dashboard/login?next=%2Fdashboard"},
    {},  # neither header: not a browser's cross-site form (curl, scripts), as browsers send Origin on every POST
]


def ids(headers: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in headers.items()) or "neither"


@pytest.mark.parametrize("headers", CROSS_SITE, ids=ids)
async def test_a_cross_site_sign_in_is_refused_before_the_key_is_checked(
    service: Service, headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[str] = []
    monkeypatch.setattr(service.runtime.authenticator, "is_service_key", lambda key: bool(checked.append(key)))
    refused = await service.client.post("/dashboard/login", data={"key": SERVICE_KEY}, headers=headers)
    assert refused.status_code == 403, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert "cross-site form refused" in refused.json()["detail"]
    assert "set-cookie" not in refused.headers
    assert checked == []
    assert len(service.app.state.signin_limiter) == 0  # not counted against anyone's address either
    demo = await service.client.post("/inbox-demo", data={"key": SERVICE_KEY, "user_id": "alice"}, headers=headers)
    assert demo.status_code == 403
    assert checked == []


@pytest.mark.parametrize("headers", SAME_SITE, ids=ids)
async def test_this_services_own_forms_and_scripts_sign_in(service: Service, headers: dict[str, str]) -> None:
    signed_in = await service.client.post("/dashboard/login", data={"key": SERVICE_KEY}, headers=headers)
    assert signed_in.status_code == 303, signed_in.text
    assert "notifier_dashboard=" in signed_in.headers["set-cookie"]


async def test_behind_a_proxy_the_public_url_is_this_services_origin(service_factory: ServiceFactory) -> None:
    async with service_factory(public_url="https://notifier.example.com") as svc:
        proxied = {"Origin": "https://notifier.example.com"}  # Host and scheme as the proxy forwarded them differ
        assert (
            await svc.client.post("/dashboard/login", data={"key": SERVICE_KEY}, headers=proxied)
        ).status_code == 303
        other = {"Origin": "http://notifier.example.com"}  # the same host over http is another origin
        assert (await svc.client.post("/dashboard/login", data={"key": SERVICE_KEY}, headers=other)).status_code == 403


async def test_sign_out_and_retry_refuse_another_sites_form_even_with_the_cookie_and_csrf(service: Service) -> None:
    cookie = SimpleCookie(
        (await service.client.post("/dashboard/login", data={"key": SERVICE_KEY})).headers["set-cookie"]
    )
    assert cookie["notifier_dashboard"].value
    page = await service.client.get("/dashboard", headers={"Accept": "text/html"})
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert match is not None
    csrf = match.group(1)
    evil = {"Origin": "https://evil.example"}
    retry = "/dashboard/deliveries/00000000-0000-0000-0000-000000000000/retry"
    for path in ("/dashboard/logout", retry):
        assert (await service.client.post(path, data={"csrf": csrf}, headers=evil)).status_code == 403, path
    assert (await service.client.get("/dashboard", headers={"Accept": "text/html"})).status_code == 200  # still in
    assert (
        await service.client.post("/dashboard/logout", data={"csrf": csrf}, headers={"Origin": SELF})
    ).status_code == 303


# --- in a real browser -------------------------------------------------------------------------------------------

ATTACKER = "http://attacker.test"


@pytest.fixture
def live(database_url: str) -> Iterator[LiveService]:
    with live_service(make_settings(database_url)) as service:
        yield service


@pytest.fixture
def browser(live: LiveService) -> Iterator[Browser]:
    with launch_chromium() as chromium:  # after ``live``: see tests/web/test_dashboard.py
        yield chromium


def attacker_page(browser: Browser, live: LiveService) -> Page:
    """A page on another site whose form posts a key guess to the dashboard's sign-in."""
    page = browser.new_page()
    form = (
        f'<form method="post" action="{live.url}/dashboard/login"><input name="key" value="{SERVICE_KEY}">'
        "<button>Win a prize</button></form>"
    )

    def serve(route: Route) -> None:
        route.fulfill(status=200, content_type="text/html", body=f"<!doctype html><title>Prize</title>{form}")

    page.route(f"{ATTACKER}/**", serve)
    page.goto(f"{ATTACKER}/prize")
    return page


@pytest.mark.browser
def test_another_sites_page_cannot_post_the_sign_in_form(browser: Browser, live: LiveService) -> None:
    page = attacker_page(browser, live)
    with page.expect_response(lambda r: r.request.method == "POST") as sent:
        page.get_by_role("button", name="Win a prize").click()
    assert sent.value.request.headers.get("origin") == ATTACKER  # what Chromium says about where it came from
    assert sent.value.status == 403
    assert page.context.cookies() == []
    assert len(live.app.state.signin_limiter) == 0

    own = browser.new_page()  # the service's own sign-in page, same browser: its form still works
    own.goto(f"{live.url}/dashboard/login")
    own.get_by_label("Service API key").fill(SERVICE_KEY)
    with own.expect_response(lambda r: r.request.method == "POST") as signed_in:
        own.get_by_role("button", name="Sign in").click()
    assert signed_in.value.request.headers.get("origin") == live.url
    assert signed_in.value.status == 303
    own.wait_for_url(f"{live.url}/dashboard")
