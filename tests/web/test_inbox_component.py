"""<notifier-inbox> in a real browser (Debian's Chromium via Playwright), embedded as a product would embed it.

A "product" page on another origin (its own loopback server, strict CSP) loads /static/inbox.js from notifier
under uvicorn and sets the user's JWT on the element. Realtime goes through the TLS loopback Ably fake: the
component exchanges the service's token request there and streams its SSE endpoint. Accessibility is checked
with axe-core (vendored in tests/web/vendor, MPL-2.0): any serious or critical violation fails.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Locator, Page, expect
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from tests.conftest import SERVICE_KEY, LiveService, live_service, make_settings, user_token
from tests.fakes.ably import AblyFake
from tests.fakes.base import free_port, serve
from tests.web.conftest import launch_chromium

AXE = Path(__file__).parent / "vendor" / "axe.min.js"
SCREENSHOT = Path("/tmp/inbox-component.png")
QUIET = "600"  # poll interval (s) when a test must show that realtime, not polling, brought a message:
# waiting up to 10 s for it still proves that, and holds on a loaded machine


@dataclass
class Product:
    """The product's origin: serves a page that embeds the component, and any other path (action URLs)."""

    url: str


def product_app(notifier: str, ably: str | None) -> Starlette:
    connect = f"{notifier} {ably}" if ably else notifier
    csp = (
        f"default-src 'self'; script-src 'self' {notifier}; style-src 'self'; connect-src {connect}; "
        "object-src 'none'; base-uri 'none'"
    )

    async def page(request: Request) -> Response:
        poll = request.query_params.get("poll", "1")
        user = request.query_params.get("user")
        html = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Product</title>
<script src="{notifier}/static/inbox.js" defer></script></head>
<body><header><h1>Product</h1><nav aria-label="Account">
<notifier-inbox base-url="{notifier}" poll-interval="{poll}"{f' user-id="{user}"' if user else ""}></notifier-inbox>
</nav></header><main><p class="title">The product's own content.</p><ul><li>Its own list</li></ul>
<button type="button">Its own button</button></main></body></html>"""
        return HTMLResponse(html, headers={"Content-Security-Policy": csp})

    async def elsewhere(request: Request) -> Response:
        return HTMLResponse(f"<!doctype html><title>{request.url.path}</title><h1>{request.url.path}</h1>")

    return Starlette(routes=[Route("/", page), Route("/{path:path}", elsewhere)])


@contextlib.contextmanager
def stack(database_url: str, ably: AblyFake | None, **overrides: Any) -> Iterator[tuple[LiveService, Product]]:
    port = free_port()
    product_url = f"http://127.0.0.1:{port}"
    settings: dict[str, Any] = {"cors_origins": product_url, **overrides}
    if ably is not None:
        settings |= {"ably_api_key": ably.api_key, "ably_rest_url": ably.url}
    with (
        live_service(make_settings(database_url, **settings)) as live,
        serve(product_app(live.url, ably.url if ably else None), port=port),
    ):
        yield live, Product(product_url)


@pytest.fixture
def live_ably(database_url: str, ably_fake: AblyFake) -> Iterator[tuple[LiveService, Product]]:
    with stack(database_url, ably_fake) as running:
        yield running


@pytest.fixture
def live_polling(database_url: str) -> Iterator[tuple[LiveService, Product]]:
    with stack(database_url, None) as running:
        yield running


@pytest.fixture
def browser() -> Iterator[Browser]:
    # Requested after the live service in every test: Playwright's sync API owns this thread's event loop.
    with launch_chromium() as chromium:
        yield chromium


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    # The Ably fake's certificate is self-signed; nothing else in these pages is served over TLS.
    context = browser.new_context(ignore_https_errors=True, locale="en-GB", viewport={"width": 1100, "height": 800})
    problems: list[str] = []
    context.on("console", lambda message: _record(problems, message))
    context.on("weberror", lambda error: problems.append(f"page error: {error.error}"))
    yield context
    context.close()
    assert problems == []  # a script error or a CSP refusal (inline style, say) fails the test


def _record(problems: list[str], message: ConsoleMessage) -> None:
    # Refused API calls (401/403) are logged by Chromium as failed loads; they are the point of some tests.
    if message.type == "error" and "Failed to load resource" not in message.text:
        problems.append(message.text)


def api(live: LiveService) -> httpx.Client:
    return httpx.Client(base_url=live.url, headers=live.auth, timeout=10)


def send(live: LiveService, user: str = "alice", booking: str = "b-1", guest: str = "Ann Lee") -> None:
    event = {
        "type": "booking.confirmed",
        "recipients": [user],
        "data": {"booking_id": booking, "guest_name": guest, "property": "Seaview 4", "check_in": "2026-12-01"},
    }
    with api(live) as client:
        assert client.post("/v1/events", json=event).status_code == 202


def inbox_of(live: LiveService, user: str = "alice", **params: str) -> dict[str, Any]:
    with api(live) as client:
        body: dict[str, Any] = client.get(f"/v1/users/{user}/inbox", params=params).json()
        return body


def wait_for_inbox(live: LiveService, count: int, user: str = "alice") -> None:
    deadline = time.monotonic() + 10
    while len(inbox_of(live, user, archived="all")["data"]) < count:
        assert time.monotonic() < deadline, f"{user}'s inbox never reached {count} items"
        time.sleep(0.05)


def open_product(context: BrowserContext, product: Product, token: str | None, **query: str) -> Page:
    page = context.new_page()
    page.goto(f"{product.url}/?" + "&".join(f"{k}={v}" for k, v in query.items()))
    wait_until(page, "customElements.get('notifier-inbox') !== undefined")
    if token is not None:
        page.evaluate("(token) => { document.querySelector('notifier-inbox').token = token; }", token)
    return page


def wait_until(page: Page, expression: str, timeout: float = 10) -> None:
    """Wait until ``expression`` is truthy in the page (wait_for_function would need 'unsafe-eval' under its CSP)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"never true: {expression}"
        time.sleep(0.05)


def bell(page: Page) -> Locator:
    return page.locator("notifier-inbox").get_by_role("button", name="Notifications")


def badge(page: Page) -> Locator:
    return page.locator("notifier-inbox .badge")


def panel(page: Page) -> Locator:
    return page.locator("notifier-inbox").get_by_role("dialog", name="Notifications")


def item(page: Page, text: str) -> Locator:
    return page.locator("notifier-inbox li.item").filter(has_text=text)


def realtime_mode(page: Page) -> str:
    mode: str = page.evaluate("document.querySelector('notifier-inbox').realtimeMode")
    return mode


def axe_violations(page: Page) -> list[str]:
    """Serious and critical axe-core violations on the page, shadow roots included."""
    # Evaluated through the debugging protocol: a <script> tag would be refused by the page's CSP, as it should.
    page.evaluate(AXE.read_text(encoding="utf-8") + "\n;undefined")
    results = page.evaluate(
        """async () => {
          const result = await axe.run(document, {resultTypes: ["violations"]});
          return result.violations.map((v) => ({id: v.id, impact: v.impact,
            nodes: v.nodes.map((n) => n.target.join(" ")).join(", ")}));
        }"""
    )
    return [f"{v['id']} ({v['impact']}): {v['nodes']}" for v in results if v["impact"] in ("serious", "critical")]


# ---- realtime -------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_a_new_message_arrives_within_two_seconds_with_the_badge_incremented(
    live_ably: tuple[LiveService, Product], ably_fake: AblyFake, context: BrowserContext
) -> None:
    live, product = live_ably
    send(live, booking="b-1", guest="First Guest")
    wait_for_inbox(live, 1)
    page = open_product(context, product, user_token("alice"), poll=QUIET)
    expect(badge(page)).to_have_text("1")
    expect(bell(page)).to_have_accessible_name("Notifications, 1 unread")
    wait_until(page, "document.querySelector('notifier-inbox').realtimeMode === 'ably'")
    [stream] = ably_fake.open_streams("notifications:alice")
    assert stream.token is not None
    assert (stream.token.capability, stream.token.client_id) == ({"notifications:alice": ["subscribe"]}, "alice")
    bell(page).click()
    expect(item(page, "First Guest")).to_be_visible()

    started = time.monotonic()
    send(live, booking="b-2", guest="Second Guest")
    expect(badge(page)).to_have_text("2", timeout=10_000)
    expect(item(page, "Second Guest")).to_be_visible(timeout=10_000)
    assert time.monotonic() - started < 2.0
    expect(bell(page)).to_have_accessible_name("Notifications, 2 unread")
    expect(page.locator("notifier-inbox li.item").first).to_contain_text("Second Guest")  # newest on top
    expect(page.locator("notifier-inbox [role=status]")).to_contain_text("New notification: Booking confirmed")
    assert realtime_mode(page) == "ably"  # polling (every 10 min here) cannot have brought it
    page.screenshot(path=str(SCREENSHOT))


@pytest.mark.browser
def test_the_stream_is_renewed_when_its_token_expires(
    live_ably: tuple[LiveService, Product], ably_fake: AblyFake, context: BrowserContext
) -> None:
    live, product = live_ably
    page = open_product(context, product, user_token("alice"), poll=QUIET)
    wait_until(page, "document.querySelector('notifier-inbox').realtimeMode === 'ably'")
    assert len(ably_fake.tokens) == 1
    ably_fake.expire_tokens()  # Ably ends the stream with a 40142 error event
    deadline = time.monotonic() + 10
    while len(ably_fake.open_streams("notifications:alice")) != 1 or len(ably_fake.tokens) != 2:
        assert time.monotonic() < deadline, "the component did not reconnect with a new token"
        time.sleep(0.05)
    send(live, guest="After Renewal")
    expect(badge(page)).to_have_text("1", timeout=10_000)
    assert realtime_mode(page) == "ably"


@pytest.mark.browser
def test_without_ably_it_polls_the_unread_count(
    live_polling: tuple[LiveService, Product], context: BrowserContext
) -> None:
    live, product = live_polling
    page = open_product(context, product, user_token("alice"), poll="1")
    expect(bell(page)).to_have_accessible_name("Notifications, none unread")
    wait_until(page, "document.querySelector('notifier-inbox').realtimeMode === 'polling'")
    send(live, guest="Polled Guest")
    expect(badge(page)).to_have_text("1", timeout=10_000)
    bell(page).click()
    expect(item(page, "Polled Guest")).to_be_visible()


# ---- reading, archiving, persistence --------------------------------------------------------------------


@pytest.mark.browser
def test_read_unread_archive_and_read_all_persist_across_reload(
    live_ably: tuple[LiveService, Product], context: BrowserContext
) -> None:
    live, product = live_ably
    for n, guest in enumerate(["Guest Alpha", "Guest Bravo", "Guest Charlie"]):
        send(live, booking=f"b-{n}", guest=guest)
    wait_for_inbox(live, 3)
    page = open_product(context, product, user_token("alice"))
    expect(badge(page)).to_have_text("3")
    bell(page).click()

    # Opening a message marks it read, then follows its action URL (in the product).
    item(page, "Guest Alpha").get_by_role("button", name="Unread: Booking confirmed").click()
    page.wait_for_url(f"{product.url}/bookings/b-0")
    assert inbox_of(live, status="unread")["unread_count"] == 2
    page.go_back()
    wait_until(page, "customElements.get('notifier-inbox') !== undefined")
    page.evaluate("(token) => { document.querySelector('notifier-inbox').token = token; }", user_token("alice"))
    expect(badge(page)).to_have_text("2")
    bell(page).click()
    alpha = item(page, "Guest Alpha")
    expect(alpha).not_to_have_class("item unread")
    alpha.get_by_role("button", name="Mark unread").click()
    expect(badge(page)).to_have_text("3")
    item(page, "Guest Charlie").get_by_role("button", name="Archive").click()
    expect(item(page, "Guest Charlie")).to_have_count(0)
    expect(badge(page)).to_have_text("2")
    panel(page).get_by_role("tab", name="Archived").click()
    expect(item(page, "Guest Charlie")).to_be_visible()
    expect(item(page, "Guest Alpha")).to_have_count(0)
    panel(page).get_by_role("tab", name="Inbox").click()
    panel(page).get_by_role("button", name="Mark all as read").click()
    expect(badge(page)).to_be_hidden()
    expect(bell(page)).to_have_accessible_name("Notifications, none unread")

    page.reload()
    page.evaluate("(token) => { document.querySelector('notifier-inbox').token = token; }", user_token("alice"))
    expect(bell(page)).to_have_accessible_name("Notifications, none unread")
    bell(page).click()
    expect(page.locator("notifier-inbox li.item")).to_have_count(2)
    expect(page.locator("notifier-inbox li.item.unread")).to_have_count(0)
    panel(page).get_by_role("tab", name="Archived").click()
    expect(page.locator("notifier-inbox li.item")).to_have_count(1)
    stored = {i["body"].split(" is")[0]: i for i in inbox_of(live, archived="all")["data"]}
    assert all(i["read_at"] for name, i in stored.items() if name != "Guest Charlie")
    assert stored["Guest Charlie"]["archived_at"] is not None


@pytest.mark.browser
def test_read_on_open_marks_what_the_panel_shows(
    live_ably: tuple[LiveService, Product], context: BrowserContext
) -> None:
    live, product = live_ably
    send(live, booking="b-1", guest="Guest One")
    send(live, booking="b-2", guest="Guest Two")
    wait_for_inbox(live, 2)
    page = open_product(context, product, user_token("alice"), poll=QUIET)
    page.evaluate("document.querySelector('notifier-inbox').setAttribute('read-on', 'open')")
    expect(badge(page)).to_have_text("2")
    bell(page).click()
    expect(badge(page)).to_be_hidden()
    expect(page.locator("notifier-inbox li.item.unread")).to_have_count(0)
    assert inbox_of(live)["unread_count"] == 0


@pytest.mark.browser
def test_reads_in_one_tab_show_in_another(live_ably: tuple[LiveService, Product], context: BrowserContext) -> None:
    live, product = live_ably
    send(live, booking="b-1", guest="Guest One")
    send(live, booking="b-2", guest="Guest Two")
    wait_for_inbox(live, 2)
    first = open_product(context, product, user_token("alice"), poll=QUIET)
    second = open_product(context, product, user_token("alice"), poll=QUIET)
    expect(badge(first)).to_have_text("2")
    expect(badge(second)).to_have_text("2")
    bell(second).click()
    bell(first).click()
    item(first, "Guest One").get_by_role("button", name="Mark read").click()
    expect(badge(second)).to_have_text("1")  # no reload, no poll: told by the other tab
    expect(item(second, "Guest One")).not_to_have_class("item unread")
    panel(first).get_by_role("button", name="Mark all as read").click()
    expect(badge(second)).to_be_hidden()
    expect(second.locator("notifier-inbox li.item.unread")).to_have_count(0)


@pytest.mark.browser
def test_infinite_scroll_pages_through_the_feed(
    live_ably: tuple[LiveService, Product], context: BrowserContext
) -> None:
    live, product = live_ably
    for n in range(12):
        send(live, booking=f"b-{n}", guest=f"Guest {n:02d}")
    wait_for_inbox(live, 12)
    page = open_product(context, product, user_token("alice"), poll=QUIET)
    page.evaluate("document.querySelector('notifier-inbox').setAttribute('page-size', '5')")
    bell(page).click()
    items = page.locator("notifier-inbox li.item")
    expect(items).to_have_count(5)
    page.locator("notifier-inbox .feed").evaluate("(feed) => { feed.scrollTop = feed.scrollHeight; }")
    expect(items).to_have_count(10)
    page.locator("notifier-inbox .feed").evaluate("(feed) => { feed.scrollTop = feed.scrollHeight; }")
    expect(items).to_have_count(12)
    expect(page.locator("notifier-inbox .more")).to_be_hidden()
    names = [text.split("Ann")[0] for text in items.all_inner_texts()]
    assert len(set(names)) == len(names) == 12


# ---- who may see what -----------------------------------------------------------------------------------


@pytest.mark.browser
def test_another_users_token_never_sees_the_feed(
    live_ably: tuple[LiveService, Product], ably_fake: AblyFake, context: BrowserContext
) -> None:
    live, product = live_ably
    send(live, guest="Secret Guest")
    wait_for_inbox(live, 1)
    page = open_product(context, product, user_token("bob"), user="alice", poll="1")
    bell(page).click()
    expect(panel(page).get_by_role("alert")).to_contain_text("These notifications belong to another account.")
    expect(page.locator("notifier-inbox li.item")).to_have_count(0)
    expect(badge(page)).to_be_hidden()
    assert "Secret Guest" not in page.content()
    assert ably_fake.tokens == {}  # never got as far as asking for a realtime token
    refused = page.evaluate(
        """async ([base, token]) => {
          const headers = {Authorization: `Bearer ${token}`};
          const feed = await fetch(`${base}/v1/users/alice/inbox`, {headers});
          const grant = await fetch(`${base}/v1/users/alice/inbox/realtime-token`, {method: "POST", headers});
          return [feed.status, grant.status];
        }""",
        [live.url, user_token("bob")],
    )
    assert refused == [403, 403]


@pytest.mark.browser
def test_an_expired_token_shows_a_clear_state_not_a_broken_panel(
    live_ably: tuple[LiveService, Product], context: BrowserContext
) -> None:
    live, product = live_ably
    send(live)
    wait_for_inbox(live, 1)
    page = open_product(context, product, None, poll="1")
    page.evaluate(
        """(token) => {
          const inbox = document.querySelector('notifier-inbox');
          window.authErrors = [];
          inbox.addEventListener('notifier-auth-error', (event) => window.authErrors.push(event.detail.status));
          inbox.token = token;
        }""",
        user_token("alice", expires_in=-60),
    )
    expect(bell(page)).to_have_accessible_name("Notifications unavailable")
    expect(badge(page)).to_be_hidden()
    bell(page).click()
    expect(panel(page).get_by_role("alert")).to_contain_text(
        "Your session has expired. Sign in again to see your notifications."
    )
    expect(panel(page).get_by_role("button", name="Mark all as read")).to_be_hidden()
    expect(panel(page).get_by_role("tablist")).to_be_hidden()
    assert page.evaluate("window.authErrors") == [401]
    assert axe_violations(page) == []

    # A host that can mint tokens gives a callback instead; the component asks it whenever one is stale.
    page.evaluate(
        """(token) => { document.querySelector('notifier-inbox').tokenProvider = async () => token; }""",
        user_token("alice"),
    )
    expect(badge(page)).to_have_text("1")
    expect(panel(page).get_by_role("alert")).to_be_hidden()


# ---- accessibility, keyboard, styling -------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_finds_no_serious_violations(
    live_ably: tuple[LiveService, Product], context: BrowserContext, scheme: str
) -> None:
    live, product = live_ably
    send(live, booking="b-1", guest="Guest One")
    send(live, booking="b-2", guest="Guest Two")
    wait_for_inbox(live, 2)
    page = open_product(context, product, user_token("alice"), poll=QUIET)
    page.emulate_media(color_scheme=scheme)  # type: ignore[arg-type]
    expect(badge(page)).to_have_text("2")
    assert axe_violations(page) == []
    bell(page).click()
    item(page, "Guest One").get_by_role("button", name="Mark read").click()
    expect(badge(page)).to_have_text("1")
    assert axe_violations(page) == []
    panel(page).get_by_role("tab", name="Archived").click()
    expect(panel(page).get_by_text("No archived notifications.")).to_be_visible()
    assert axe_violations(page) == []


@pytest.mark.browser
def test_it_works_from_the_keyboard_alone(live_ably: tuple[LiveService, Product], context: BrowserContext) -> None:
    live, product = live_ably
    send(live, guest="Keyboard Guest")
    wait_for_inbox(live, 1)
    page = open_product(context, product, user_token("alice"), poll=QUIET)
    expect(badge(page)).to_have_text("1")
    bell(page).focus()
    page.keyboard.press("Enter")
    expect(panel(page)).to_be_visible()
    expect(bell(page)).to_have_attribute("aria-expanded", "true")
    expect(panel(page)).to_be_focused()
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.querySelector('notifier-inbox').shadowRoot.activeElement?.id") == "tab-inbox":
            break
    else:
        pytest.fail("Tab never reached the Inbox tab")
    page.keyboard.press("ArrowRight")
    expect(panel(page).get_by_role("tab", name="Archived")).to_be_focused()
    expect(panel(page).get_by_role("tab", name="Archived")).to_have_attribute("aria-selected", "true")
    page.keyboard.press("ArrowLeft")
    expect(item(page, "Keyboard Guest")).to_be_visible()
    page.keyboard.press("Tab")
    expect(item(page, "Keyboard Guest").get_by_role("button", name="Unread: Booking confirmed")).to_be_focused()
    page.keyboard.press("Tab")
    expect(item(page, "Keyboard Guest").get_by_role("button", name="Mark read")).to_be_focused()
    page.keyboard.press("Enter")
    expect(badge(page)).to_be_hidden()
    page.keyboard.press("Escape")
    expect(panel(page)).to_be_hidden()
    expect(bell(page)).to_be_focused()


@pytest.mark.browser
def test_it_adds_no_global_css_and_can_be_themed(
    live_ably: tuple[LiveService, Product], context: BrowserContext
) -> None:
    _, product = live_ably
    page = open_product(context, product, user_token("alice"), poll=QUIET)
    before = page.evaluate(
        """() => ({sheets: document.styleSheets.length, adopted: document.adoptedStyleSheets.length,
                   title: getComputedStyle(document.querySelector('p.title')).fontWeight,
                   list: getComputedStyle(document.querySelector('main ul')).listStyleType})"""
    )
    expect(bell(page)).to_have_accessible_name("Notifications, none unread")
    bell(page).click()
    after = page.evaluate(
        """() => ({sheets: document.styleSheets.length, adopted: document.adoptedStyleSheets.length,
                   title: getComputedStyle(document.querySelector('p.title')).fontWeight,
                   list: getComputedStyle(document.querySelector('main ul')).listStyleType})"""
    )
    assert after == before == {"sheets": 0, "adopted": 0, "title": "400", "list": "disc"}
    # Custom properties and ::part reach inside; nothing else does.
    theme = (
        "notifier-inbox { --notifier-surface: rgb(1, 2, 3); } notifier-inbox::part(heading) { color: rgb(4, 5, 6); }"
    )
    page.evaluate(
        "(css) => { const s = new CSSStyleSheet(); s.replaceSync(css); document.adoptedStyleSheets = [s]; }", theme
    )
    styles = page.evaluate(
        """() => { const root = document.querySelector('notifier-inbox').shadowRoot;
                   return [getComputedStyle(root.querySelector('.panel')).backgroundColor,
                           getComputedStyle(root.querySelector('#heading')).color]; }"""
    )
    assert styles == ["rgb(1, 2, 3)", "rgb(4, 5, 6)"]


# ---- the demo page --------------------------------------------------------------------------------------


@pytest.mark.browser
def test_the_demo_page_shows_a_users_inbox_and_sends_to_it(
    live_ably: tuple[LiveService, Product], context: BrowserContext
) -> None:
    live, _ = live_ably
    page = context.new_page()
    page.goto(f"{live.url}/inbox-demo")
    assert axe_violations(page) == []
    page.get_by_label("Service API key").fill(SERVICE_KEY)
    page.get_by_label("User id").fill("dana")
    page.get_by_role("button", name="Show the inbox").click()
    expect(page.get_by_role("heading", name="The inbox of dana")).to_be_visible()
    expect(bell(page)).to_have_accessible_name("Notifications, none unread")
    wait_until(page, "document.querySelector('notifier-inbox').realtimeMode === 'ably'")
    page.get_by_role("button", name="Send a test notification").click()
    expect(page.locator("#send-status")).to_have_text("Sent. Watch the bell.")
    expect(badge(page)).to_have_text("1", timeout=10_000)
    bell(page).click()
    item(page, "Booking confirmed").get_by_role("button", name="Unread: Booking confirmed").click()
    expect(page.locator("#send-status")).to_contain_text("In your product this would open /bookings/demo-")
    expect(badge(page)).to_be_hidden()
    assert axe_violations(page) == []
