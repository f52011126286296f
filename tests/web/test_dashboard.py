"""The operations dashboard: session cookie and CSRF in-process, then the operator's path in Debian's Chromium."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from playwright.sync_api import Browser, ConsoleMessage, Page, expect
from sqlmodel import col

from notifier.api.dashboard import bar_chart
from notifier.api.signin_limit import SignInLimiter
from notifier.db.models import DeliveryAttempt
from notifier.db.stats import ChannelStats, p95
from tests.api.test_deliveries import payment
from tests.conftest import SERVICE_KEY, LiveService, Service, booking_event, live_service, make_settings, user_token
from tests.fakes.base import Fault
from tests.fakes.onesignal import OneSignalFake
from tests.web.conftest import FakeClock, launch_chromium

SCREENSHOT = Path("/tmp/dashboard.png")  # the place the issue asks for
HTML = {"Accept": "text/html,application/xhtml+xml"}
PROVIDER_SAYS = "Message Notifications must have English language content"


def onesignal_settings(fake: OneSignalFake) -> dict[str, Any]:
    return {"onesignal_app_id": fake.app_id, "onesignal_rest_api_key": fake.api_key, "onesignal_api_url": fake.url}


@pytest.fixture
async def pushing(
    service_factory: Callable[..., contextlib.AbstractAsyncContextManager[Service]], onesignal_fake: OneSignalFake
) -> AsyncIterator[Service]:
    async with service_factory(**onesignal_settings(onesignal_fake)) as svc:
        yield svc


async def sign_in(svc: Service, key: str = SERVICE_KEY, next_page: str = "/dashboard") -> httpx.Response:
    return await svc.client.post("/dashboard/login", data={"key": key, "next": next_page})


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


async def test_login_trades_the_key_for_a_derived_httponly_strict_cookie(service: Service) -> None:
    response = await sign_in(service, next_page="/dashboard/deliveries?status=failed")
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard/deliveries?status=failed"
    cookie = SimpleCookie(response.headers["set-cookie"])["notifier_dashboard"]
    assert cookie["httponly"] is True
    assert cookie["samesite"].lower() == "strict"
    assert cookie["path"] == "/dashboard"
    assert int(cookie["max-age"]) == 8 * 3600
    assert cookie["secure"] == ""  # plain http on loopback; set when NOTIFIER_PUBLIC_URL is https
    expires, nonce, signature = cookie.value.split(".")
    assert SERVICE_KEY not in cookie.value
    assert abs(int(expires) - (time.time() + 8 * 3600)) < 60
    derived = hmac.new(SERVICE_KEY.encode(), b"dashboard-session", hashlib.sha256).digest()
    expected = hmac.new(derived, f"{expires}.{nonce}".encode(), hashlib.sha256).digest()
    assert signature == base64.urlsafe_b64encode(expected).decode().rstrip("=")
    page = await service.client.get("/dashboard/deliveries?status=failed", headers=HTML)
    assert page.status_code == 200
    assert "<h1>Deliveries</h1>" in page.text


async def test_https_deployments_get_a_secure_cookie(
    service_factory: Callable[..., contextlib.AbstractAsyncContextManager[Service]],
) -> None:
    async with service_factory(public_url="https://notifier.example") as svc:
        cookie = SimpleCookie((await sign_in(svc)).headers["set-cookie"])["notifier_dashboard"]
    assert cookie["secure"] is True


async def test_without_a_session_browsers_go_to_login_and_scripts_get_401(service: Service) -> None:
    redirect = await service.client.get("/dashboard/deliveries?status=failed", headers=HTML)
    assert redirect.status_code == 303
    assert redirect.headers["location"] == "/dashboard/login?next=%2Fdashboard%2Fdeliveries%3Fstatus%3Dfailed"
    script = await service.client.get("/dashboard/deliveries")
    assert script.status_code == 401
    assert script.headers["content-type"] == "application/problem+json"
    with_key = await service.client.get("/dashboard", headers={**service.auth, **HTML})
    assert with_key.status_code == 200
    assert 'id="channel-stats"' in with_key.text
    assert 'action="/dashboard/logout"' not in with_key.text  # no session, no forms
    as_user = await service.client.get("/dashboard", headers={"Authorization": f"Bearer {user_token('user-1')}"})
    assert as_user.status_code == 403


async def test_wrong_key_tampered_expired_or_foreign_sessions_are_refused(service: Service) -> None:
    wrong = await sign_in(service, key=SERVICE_KEY + "x")
    assert wrong.status_code == 401
    assert "not a valid service API key" in wrong.text
    assert "set-cookie" not in wrong.headers
    token = SimpleCookie((await sign_in(service)).headers["set-cookie"])["notifier_dashboard"].value
    expires, nonce, signature = token.split(".")
    foreign_secret = hmac.new(b"some-other-key-0123456789", b"dashboard-session", hashlib.sha256).digest()
    foreign = base64.urlsafe_b64encode(hmac.new(foreign_secret, f"{expires}.{nonce}".encode(), "sha256").digest())
    forged = [
        f"{int(expires) + 3600}.{nonce}.{signature}",  # extended expiry
        f"{expires}.{nonce}x.{signature}",
        f"{expires}.{nonce}.{foreign.decode().rstrip('=')}",  # signed with a key this service does not have
        f"{int(time.time()) - 1}.{nonce}.{signature}",
        SERVICE_KEY,
        "",
    ]
    for value in forged:
        service.client.cookies.set("notifier_dashboard", value, path="/dashboard")
        response = await service.client.get("/dashboard", headers=HTML)
        assert response.status_code == 303, value
        assert response.headers["location"] == "/dashboard/login"
    service.client.cookies.set("notifier_dashboard", token, path="/dashboard")
    assert (await service.client.get("/dashboard", headers=HTML)).status_code == 200


async def test_a_session_is_valid_under_any_configured_key_and_ends_when_its_key_is_removed(
    service_factory: Callable[..., contextlib.AbstractAsyncContextManager[Service]],
) -> None:
    new_key = "rotated-in-key-0123456789-abcdefghijkl"
    async with service_factory(api_keys=f"{new_key},{SERVICE_KEY}") as both:
        token = SimpleCookie((await sign_in(both)).headers["set-cookie"])["notifier_dashboard"].value
        assert (await both.client.get("/dashboard", headers=HTML)).status_code == 200  # signed by the second key
    async with service_factory(api_keys=new_key) as rotated:
        rotated.client.cookies.set("notifier_dashboard", token, path="/dashboard")
        ended = await rotated.client.get("/dashboard", headers=HTML)
        assert ended.status_code == 303
        assert ended.headers["location"] == "/dashboard/login"


async def test_pages_link_the_shared_base_stylesheet_before_their_own(service: Service) -> None:
    pages = {"/dashboard/login": "dashboard.css", "/preferences": "preferences.css"}
    for path, own in pages.items():
        page = await service.client.get(path, headers=HTML)
        sheets = re.findall(r'<link rel="stylesheet" href="([^"]+)">', page.text)
        assert [sheet.split("?")[0] for sheet in sheets] == ["/web/static/base.css", f"/web/static/{own}"], path
        for sheet in sheets:
            served = await service.client.get(sheet)
            assert served.status_code == 200, sheet
            assert served.headers["content-type"].startswith("text/css")
        own_rules = (await service.client.get(sheets[1])).text
        assert "--ink:" not in own_rules  # the palette is defined once, in base.css
        assert ":focus-visible" not in own_rules


async def test_unknown_delivery_pages_are_html_404_and_a_lost_session_returns_to_the_page(service: Service) -> None:
    await sign_in(service)
    for raw in ("00000000-0000-0000-0000-000000000000", "not-a-uuid"):
        missing = await service.client.get(f"/dashboard/deliveries/{raw}", headers=HTML)
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("text/html")
        assert "Delivery not found" in missing.text
    service.client.cookies.clear()
    delivery = "/dashboard/deliveries/00000000-0000-0000-0000-000000000000"
    lost = await service.client.post(f"{delivery}/retry", data={"csrf": "x"}, headers=HTML)
    assert lost.status_code == 303
    assert lost.headers["location"] == "/dashboard/login?next=" + delivery.replace("/", "%2F")


async def test_login_only_follows_next_within_the_dashboard(service: Service) -> None:
    for target in ("https://evil.example/", "//evil.example", "/v1/deliveries", "/dashboard\r\nX-Evil: 1"):
        response = await sign_in(service, next_page=target)
        assert response.headers["location"] == "/dashboard", target


async def test_retry_form_needs_the_sessions_csrf_token(pushing: Service, onesignal_fake: OneSignalFake) -> None:
    onesignal_fake.fail_next(Fault.http(400, {"errors": [PROVIDER_SAYS]}))
    await pushing.post_event(payment("user-1"))
    await pushing.drain()
    [failed] = (await pushing.get("/v1/deliveries", params={"status": "failed"})).json()["data"]
    await sign_in(pushing)
    page = await pushing.client.get(f"/dashboard/deliveries/{failed['id']}", headers=HTML)
    assert page.status_code == 200
    assert PROVIDER_SAYS in page.text
    retry = f"/dashboard/deliveries/{failed['id']}/retry"
    for fields in ({}, {"csrf": "forged"}):
        refused = await pushing.client.post(retry, data=fields)
        assert refused.status_code == 403
    assert (await pushing.get(f"/v1/deliveries/{failed['id']}")).json()["status"] == "failed"

    done = await pushing.client.post(retry, data={"csrf": csrf_of(page.text)})
    assert done.status_code == 303
    assert done.headers["location"] == f"/dashboard/deliveries/{failed['id']}?retried=1"
    await pushing.drain()
    assert (await pushing.get(f"/v1/deliveries/{failed['id']}")).json()["status"] == "sent"
    again = await pushing.client.post(retry, data={"csrf": csrf_of(page.text)})
    assert again.status_code == 409
    assert "only failed deliveries can be retried" in again.text

    logout = await pushing.client.post("/dashboard/logout", data={"csrf": csrf_of(page.text)})
    assert logout.status_code == 303
    assert 'notifier_dashboard=""' in logout.headers["set-cookie"]
    assert (await pushing.client.get("/dashboard", headers=HTML)).status_code == 303


async def test_signing_out_ends_the_session_on_the_server_for_every_replica(
    service_factory: Callable[..., contextlib.AbstractAsyncContextManager[Service]],
) -> None:
    async with service_factory() as replica_a, service_factory() as replica_b:  # one database, two processes
        signed_in = await sign_in(replica_a)
        captured = SimpleCookie(signed_in.headers["set-cookie"])["notifier_dashboard"].value
        page = await replica_a.client.get("/dashboard", headers=HTML)
        assert page.status_code == 200
        csrf = csrf_of(page.text)
        other = SimpleCookie((await sign_in(replica_b)).headers["set-cookie"])["notifier_dashboard"].value
        replica_b.client.cookies.clear()
        replica_b.client.cookies.set("notifier_dashboard", captured, path="/dashboard")
        assert (await replica_b.client.get("/dashboard", headers=HTML)).status_code == 200

        signed_out = await replica_a.client.post("/dashboard/logout", data={"csrf": csrf})
        assert signed_out.status_code == 303

        for replica in (replica_a, replica_b):  # a copy of the cookie made before signing out is dead everywhere
            replica.client.cookies.clear()
            replica.client.cookies.set("notifier_dashboard", captured, path="/dashboard")
            refused = await replica.client.get("/dashboard/deliveries", headers=HTML)
            assert refused.status_code == 303
            assert refused.headers["location"].startswith("/dashboard/login")
            assert (await replica.client.get("/dashboard")).status_code == 401
            forged_form = await replica.client.post("/dashboard/logout", data={"csrf": csrf})
            assert forged_form.status_code == 401
        replica_b.client.cookies.clear()
        replica_b.client.cookies.set("notifier_dashboard", other, path="/dashboard")
        assert (await replica_b.client.get("/dashboard", headers=HTML)).status_code == 200  # other sessions live on


async def test_overview_counts_the_last_day_per_channel_with_p95_latency(
    pushing: Service, onesignal_fake: OneSignalFake
) -> None:
    onesignal_fake.fail_next(Fault.http(500))
    onesignal_fake.forget("user-3")
    for user in ("user-1", "user-2", "user-3"):
        await pushing.post_event(payment(user))
    await pushing.post_event(booking_event(recipients=["user-4"]))
    await pushing.drain()
    async with pushing.runtime.sessions() as session:
        rows = await session.execute(sa.select(DeliveryAttempt).where(col(DeliveryAttempt.finished_at).is_not(None)))
        attempts = list(rows.scalars())
    response = await pushing.client.get("/dashboard", headers={**pushing.auth, **HTML})
    assert response.status_code == 200
    table = response.text.split('id="channel-stats"')[1].split("</table>")[0]
    cells = {
        row[0]: row[1:]
        for row in (re.findall(r">([^<>]+)</t[hd]>", tr) for tr in table.split("<tr>")[2:])
    }  # fmt: skip
    assert cells["push"][:3] == ["2", "1", "0"]  # user-1 (after a 500) and user-2 sent, user-3 not_subscribed
    assert cells["email"][:3] == ["0", "0", "4"]  # no email provider: suppressed
    assert cells["in_app"][:3] == ["4", "0", "0"]
    assert cells["push"][4] == "4"  # four push attempts measured
    push_ms = [
        (a.finished_at - a.started_at).total_seconds() * 1000 for a in attempts if a.finished_at and a.http_status
    ]
    assert cells["push"][3] == f"{p95(push_ms):.0f} ms"
    assert cells["email"][3] == "—"
    assert "<script" not in response.text
    assert " style=" not in response.text  # CSP default-src 'self': no inline styles
    assert response.headers["content-security-policy"].startswith("default-src 'self'")
    bars = re.findall(r'width="(\d+)" height="14" class="bar-\w+"><title>([^<]+)</title>', response.text)
    widths = {title: int(width) for width, title in bars}
    assert len(widths) == 9
    assert widths["in_app sent: 4"] == widths["email suppressed: 4"] == 360  # the longest bar spans the plot
    assert widths["push sent: 2"] == 180
    assert widths["push failed: 1"] == 90


def test_p95_and_chart_geometry() -> None:
    assert p95([]) is None
    assert p95([7.0]) == 7.0
    assert p95([float(n) for n in range(1, 21)]) == 19.0  # nearest rank: ceil(0.95 * 20) = 19th
    assert p95([float(n) for n in range(1, 101)]) == 95.0
    chart = bar_chart([ChannelStats("push", 10, 5, 0, None, 0), ChannelStats("email", 0, 0, 20, 12.0, 3)])
    widths = {bar.title: bar.width for bar in chart.bars}
    assert widths == {"push sent: 10": 180, "push failed: 5": 90, "push suppressed: 0": 0, "email sent: 0": 0,
                      "email failed: 0": 0, "email suppressed: 20": 360}  # fmt: skip
    assert [bar.y for bar in chart.bars] == sorted(bar.y for bar in chart.bars)


# --- in a real browser -------------------------------------------------------------------------------------------


@pytest.fixture
def browser(live: LiveService) -> Iterator[Browser]:
    # After ``live``: while Playwright's sync API runs it owns this thread's event loop, so fixtures that use
    # asyncio.run (the PostgreSQL reset) must have run before it starts.
    with launch_chromium() as chromium:
        yield chromium


@pytest.fixture
def live(database_url: str, onesignal_fake: OneSignalFake) -> Iterator[LiveService]:
    with live_service(make_settings(database_url, **onesignal_settings(onesignal_fake))) as service:
        yield service


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 900}, locale="en-GB")
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda message: _record(problems, message))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    yield page
    context.close()
    assert problems == []  # a CSP refusal (inline style or script) or a script error fails the test


def _record(problems: list[str], message: ConsoleMessage) -> None:
    if message.type == "error" and "Failed to load resource" not in message.text:  # a 401 on a wrong key is expected
        problems.append(message.text)


def failed_push(live: LiveService, fake: OneSignalFake) -> str:
    fake.fail_next(Fault.http(400, {"errors": [PROVIDER_SAYS]}))
    with httpx.Client(base_url=live.url, headers=live.auth, timeout=10) as api:
        assert api.post("/v1/events", json=payment("user-1")).status_code == 202
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = api.get("/v1/deliveries", params={"status": "failed"}).json()["data"]
            if found:
                return str(found[0]["id"])
            time.sleep(0.05)
    raise AssertionError("the push never failed")


@pytest.mark.browser
def test_operator_signs_in_finds_the_failure_and_retries_it(
    live: LiveService, onesignal_fake: OneSignalFake, page: Page
) -> None:
    delivery_id = failed_push(live, onesignal_fake)
    page.goto(f"{live.url}/dashboard/deliveries?status=failed")
    expect(page).to_have_url(re.compile(r"/dashboard/login\?next=%2Fdashboard%2Fdeliveries%3Fstatus%3Dfailed$"))
    page.get_by_label("Service API key").fill(SERVICE_KEY)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{live.url}/dashboard/deliveries?status=failed")

    [cookie] = page.context.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (
        "notifier_dashboard", True, "Strict", "/dashboard"
    )  # fmt: skip
    assert SERVICE_KEY not in cookie["value"]

    # Filter through the form, as an operator would.
    page.get_by_role("link", name="Deliveries", exact=True).click()
    expect(page.locator("#deliveries tbody tr")).to_have_count(3)  # push failed, email suppressed, in_app sent
    page.get_by_label("Status").select_option("failed")
    page.get_by_label("Channel").select_option("push")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"status=failed&channel=push"))
    rows = page.locator("#deliveries tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("payment.received")
    expect(rows.first).to_contain_text("rejected")

    page.get_by_role("link", name=f"Delivery {delivery_id}").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(delivery_id)
    expect(page.locator("#delivery-status")).to_have_text("failed")
    attempts = page.locator("#attempts tbody tr")
    expect(attempts).to_have_count(1)
    expect(attempts.first).to_contain_text("400")
    expect(attempts.first).to_contain_text(PROVIDER_SAYS)

    page.get_by_role("button", name="Retry").click()
    expect(page.get_by_role("status")).to_contain_text("Retry queued")
    expect(page.locator("#delivery-status")).to_have_text("sent", timeout=15_000)  # the page follows it
    expect(attempts).to_have_count(2)
    [created] = onesignal_fake.sent_to("user-1")
    expect(attempts.nth(1)).to_contain_text(f"accepted as {created.id}")
    expect(page.get_by_role("button", name="Retry")).to_have_count(0)
    expect(page.locator("#transitions")).to_contain_text("retried by an operator")

    page.get_by_role("link", name="Overview").click()
    expect(page.locator("#channel-stats")).to_contain_text("push")
    expect(page.locator("#recent-events tbody tr")).to_have_count(1)
    expect(page.locator("#recent-events")).to_contain_text("sent 2")
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    captured = page.context.cookies()
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(f"{live.url}/dashboard/login")
    page.goto(f"{live.url}/dashboard")
    expect(page).to_have_url(f"{live.url}/dashboard/login")
    page.context.add_cookies(captured)  # a copy taken before signing out is refused: the session ended on the server
    page.goto(f"{live.url}/dashboard")
    expect(page).to_have_url(f"{live.url}/dashboard/login")


@pytest.mark.browser
def test_wrong_key_shows_an_error_and_no_cookie_means_the_login_page(live: LiveService, page: Page) -> None:
    page.goto(f"{live.url}/dashboard/deliveries/00000000-0000-0000-0000-000000000000")
    expect(page).to_have_url(re.compile(r"/dashboard/login\?next="))
    page.get_by_label("Service API key").fill("not-the-key-0123456789")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("That is not a valid service API key.")
    expect(page.get_by_label("Service API key")).to_have_attribute("aria-invalid", "true")
    assert page.context.cookies() == []
    page.goto(f"{live.url}/dashboard")
    expect(page).to_have_url(f"{live.url}/dashboard/login")
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in to the dashboard")


@pytest.mark.browser
def test_repeated_wrong_keys_lock_the_login_page_until_the_window_passes(live: LiveService, page: Page) -> None:
    clock = FakeClock()
    live.app.state.signin_limiter = SignInLimiter(clock=clock)
    page.goto(f"{live.url}/dashboard/login")
    alert, key = page.get_by_role("alert"), page.get_by_label("Service API key")

    def submit(value: str) -> int:
        key.fill(value)
        with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/dashboard/login")) as sent:
            page.get_by_role("button", name="Sign in").click()
        return sent.value.status

    for n in range(5):
        assert submit(f"not-the-key-{n}-0123456789") == 401
        expect(alert).to_have_text("That is not a valid service API key.")
    assert submit(SERVICE_KEY) == 429  # the right key, but this address is locked out
    expect(alert).to_have_text(
        "Too many failed sign-ins from this address, so this one was not checked. Try again in 5 minutes."
    )
    expect(key).not_to_have_attribute("aria-invalid", "true")
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in to the dashboard")
    assert page.context.cookies() == []

    clock.advance(300)
    assert submit(SERVICE_KEY) == 303
    expect(page).to_have_url(f"{live.url}/dashboard")
    expect(page.get_by_role("heading", level=1)).to_have_text("Overview")
    assert [cookie["name"] for cookie in page.context.cookies()] == ["notifier_dashboard"]
