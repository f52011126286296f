"""The preference center in a real browser (Debian's Chromium via Playwright) against the app under uvicorn."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect

from tests.conftest import LiveService, live_service, make_settings, user_token
from tests.web.conftest import launch_chromium

SCREENSHOT = Path("/tmp/preference-center.png")
PREFS = "/v1/users/alice/preferences"


@pytest.fixture
def browser(live: LiveService) -> Iterator[Browser]:
    # Function scope, and after ``live``: while Playwright's sync API is running it owns this thread's event
    # loop, so fixtures that use asyncio.run (the PostgreSQL reset) must run before it starts.
    with launch_chromium() as chromium:
        yield chromium


@pytest.fixture
def live(database_url: str) -> Iterator[LiveService]:
    with live_service(make_settings(database_url)) as service:
        yield service


@pytest.fixture
def api(live: LiveService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, headers=live.auth, timeout=10) as client:
        yield client


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 900}, locale="en-GB", timezone_id="Europe/London")
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda message: _record(problems, message))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    yield page
    context.close()
    # Any script error or CSP refusal (an inline script or style would be one) fails the test.
    assert problems == []


def _record(problems: list[str], message: ConsoleMessage) -> None:
    # Failed API calls (401/412/422) are logged by Chromium as errors; they are the point of some tests.
    if message.type == "error" and "Failed to load resource" not in message.text:
        problems.append(message.text)


def open_center(page: Page, live: LiveService, token: str | None = None) -> None:
    page.goto(f"{live.url}/preferences#token={token or user_token('alice')}")


def wait_loaded(page: Page) -> None:
    expect(page.get_by_role("status")).to_have_text("Your preferences are loaded.")


def switch(page: Page, name: str) -> Any:
    return page.get_by_role("switch", name=name, exact=True)


def save(page: Page) -> None:
    page.get_by_role("button", name="Save preferences").click()


@pytest.mark.browser
def test_a_saved_switch_persists_across_reloads_and_steers_the_next_event(
    page: Page, live: LiveService, api: httpx.Client
) -> None:
    assert api.put("/v1/users/alice", json={"email": "alice@example.com"}).status_code == 201
    open_center(page, live)
    wait_loaded(page)
    assert "token" not in page.url  # taken out of the address bar once read
    email = switch(page, "Email for Booking confirmed")
    expect(email).to_be_checked()  # a default channel of booking.confirmed
    expect(switch(page, "Email for Payment failed (critical, always on)")).to_be_disabled()
    expect(switch(page, "Email for Payment failed (critical, always on)")).to_be_checked()
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    email.click()
    save(page)
    expect(page.get_by_role("status")).to_have_text("Your preferences are saved.")
    stored = api.get(PREFS)
    assert stored.json()["event_types"] == {"booking.confirmed": {"email": False}}
    assert stored.headers["etag"] == '"1"'
    assert api.get(f"{PREFS}/history").json()["data"][0]["changed_by"] == "user:alice"

    page.reload()  # the token came from this tab's session storage, not the URL
    wait_loaded(page)
    expect(switch(page, "Email for Booking confirmed")).not_to_be_checked()
    expect(switch(page, "In-app for Booking confirmed")).to_be_checked()

    event = {
        "type": "booking.confirmed",
        "recipients": ["alice", {"id": "bob", "email": "bob@example.com"}],
        "data": {"booking_id": "b-1", "guest_name": "Ann Lee", "property": "Seaview 4", "check_in": "2026-12-01"},
    }
    accepted = api.post("/v1/events", json=event)
    assert accepted.status_code == 202
    outcome = {(d["user_id"], d["channel"]): (d["status"], d["reason"]) for d in accepted.json()["deliveries"]}
    assert outcome[("alice", "email")] == ("suppressed", "opted_out")
    assert outcome[("bob", "email")] == ("suppressed", "channel_unavailable")  # no email provider in this test
    assert outcome[("alice", "in_app")] == ("queued", None)


@pytest.mark.browser
def test_quiet_hours_with_a_time_zone_are_saved(page: Page, live: LiveService, api: httpx.Client) -> None:
    open_center(page, live)
    wait_loaded(page)
    expect(page.get_by_label("From")).to_be_disabled()
    switch(page, "Use quiet hours").check()
    page.get_by_label("From").fill("21:30")
    page.get_by_label("Until").fill("06:45")
    page.get_by_label("Time zone").fill("America/New_York")
    save(page)
    expect(page.get_by_role("status")).to_have_text("Your preferences are saved.")
    quiet = api.get(PREFS).json()["quiet_hours"]
    assert quiet == {"start": "21:30", "end": "06:45", "timezone": "America/New_York"}

    page.reload()
    wait_loaded(page)
    expect(page.get_by_label("From")).to_have_value("21:30")
    expect(page.get_by_label("Time zone")).to_have_value("America/New_York")
    options = page.locator("#timezones option").count()
    assert options > 300  # filled from Intl.supportedValuesOf('timeZone')


@pytest.mark.browser
def test_a_bad_value_shows_the_servers_message_next_to_the_field(
    page: Page, live: LiveService, api: httpx.Client
) -> None:
    open_center(page, live)
    wait_loaded(page)
    switch(page, "Use quiet hours").check()
    zone = page.get_by_label("Time zone")
    zone.fill("Mars/Olympus")
    save(page)
    error = page.locator("#quiet-timezone-error")
    expect(error).to_have_text("unknown time zone 'Mars/Olympus'")
    expect(zone).to_have_attribute("aria-invalid", "true")
    expect(zone).to_have_accessible_description(re.compile(r"^unknown time zone 'Mars/Olympus' An IANA name"))
    expect(zone).to_be_focused()
    assert api.get(PREFS).json()["version"] == 0  # nothing written

    zone.fill("Europe/Berlin")
    save(page)
    expect(page.get_by_role("status")).to_have_text("Your preferences are saved.")
    expect(error).to_have_count(0)
    expect(zone).not_to_have_attribute("aria-invalid", "true")


@pytest.mark.browser
def test_a_stale_tab_is_told_the_preferences_changed_elsewhere(
    page: Page, live: LiveService, api: httpx.Client
) -> None:
    open_center(page, live)
    wait_loaded(page)
    other = api.put(PREFS, json={"channels": {"push": False}}, headers={"If-Match": '"0"'})
    assert other.status_code == 200

    switch(page, "In-app for Booking confirmed").click()
    save(page)
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("changed elsewhere")
    expect(alert).to_contain_text("Reload")
    current = api.get(PREFS).json()
    assert (current["version"], current["event_types"], current["channels"]["push"]) == (1, {}, False)

    alert.get_by_role("button", name="Reload").click()
    wait_loaded(page)
    expect(alert).to_be_hidden()
    expect(switch(page, "Push notifications")).not_to_be_checked()  # the other writer's change
    expect(switch(page, "In-app for Booking confirmed")).to_be_checked()


@pytest.mark.browser
def test_switches_work_from_the_keyboard_alone(page: Page, live: LiveService, api: httpx.Client) -> None:
    open_center(page, live)
    wait_loaded(page)
    target = "type-booking.confirmed-push"
    for _ in range(80):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == target:
            break
    else:
        pytest.fail(f"Tab never reached #{target}")
    expect(switch(page, "Push for Booking confirmed")).not_to_be_checked()
    page.keyboard.press("Space")
    expect(switch(page, "Push for Booking confirmed")).to_be_checked()
    for _ in range(80):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "save":
            break
    else:
        pytest.fail("Tab never reached the Save button")
    page.keyboard.press("Enter")
    expect(page.get_by_role("status")).to_have_text("Your preferences are saved.")
    assert api.get(PREFS).json()["event_types"] == {"booking.confirmed": {"push": True}}


@pytest.mark.browser
def test_mute_for_some_hours_then_unmute(page: Page, live: LiveService, api: httpx.Client) -> None:
    open_center(page, live)
    wait_loaded(page)
    expect(page.locator("#mute-state")).to_have_text("Push and email are not muted.")
    page.get_by_label("Mute push and email for (hours)").fill("3")
    before = dt.datetime.now(dt.UTC)
    page.get_by_role("button", name="Mute", exact=True).click()
    expect(page.locator("#mute-state")).to_contain_text("muted until")
    muted_until = dt.datetime.fromisoformat(api.get(PREFS).json()["muted_until"])
    assert dt.timedelta(hours=3) - dt.timedelta(minutes=1) < muted_until - before < dt.timedelta(hours=3, minutes=1)

    page.get_by_role("button", name="Unmute").click()
    expect(page.locator("#mute-state")).to_have_text("Push and email are not muted.")
    body = api.get(PREFS).json()
    assert (body["muted_until"], body["version"]) == (None, 2)


@pytest.mark.browser
def test_an_expired_link_is_explained(page: Page, live: LiveService) -> None:
    open_center(page, live, token=user_token("alice", expires_in=-60))
    expect(page.get_by_role("alert")).to_contain_text("This link has expired")
    expect(page.locator("#preferences")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0  # the dead token is not kept


@pytest.mark.browser
def test_without_a_token_the_page_says_where_to_get_one(page: Page, live: LiveService) -> None:
    page.goto(f"{live.url}/preferences")
    expect(page.get_by_role("alert")).to_contain_text("needs your personal link")


def test_the_page_is_static_and_locked_down(live: LiveService) -> None:
    with httpx.Client(base_url=live.url) as client:
        page = client.get("/preferences")
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert page.headers["referrer-policy"] == "no-referrer"
        assert page.headers["cache-control"] == "no-store"
        assert "<script>" not in page.text  # every script is a file
        script = page.text.split('<script src="', 1)[1].split('"', 1)[0]
        asset = client.get(script)
        assert asset.status_code == 200
        assert asset.headers["content-type"].startswith("text/javascript")
        assert "immutable" in asset.headers["cache-control"]
        assert client.get("/web/static/missing.js").status_code == 404
        assert client.get("/web/static/..%2Fapp.py").status_code == 404
