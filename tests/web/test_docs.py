"""The API viewer at /docs: the vendored Swagger UI, and the page in Debian's Chromium against the app under uvicorn."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect

from notifier.api.ops import SWAGGER_UI_DIR
from notifier.api.pages import CONTENT_SECURITY_POLICY
from tests.conftest import LiveService, live_service, make_settings
from tests.web.conftest import launch_chromium

SCREENSHOT = Path("/tmp/docs.png")
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveService]:
    # The viewer reads no table: one SQLite file is enough, no PostgreSQL run.
    with live_service(make_settings(f"sqlite+aiosqlite:///{tmp_path / 'notifier.db'}")) as service:
        yield service


@pytest.fixture
def browser(live: LiveService) -> Iterator[Browser]:
    with launch_chromium() as chromium:
        yield chromium


@pytest.fixture
def page(browser: Browser, live: LiveService) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 900}, locale="en-GB")
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda message: _record(problems, message))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    # Offline and no CDN: every request the page makes (scripts, styles, fonts, images, the document, a validator
    # badge) must go to this service.
    page.on("request", lambda request: _same_origin(problems, live, request.url))
    yield page
    context.close()
    assert problems == []  # a script error, a CSP refusal or a request elsewhere fails the test


def _record(problems: list[str], message: ConsoleMessage) -> None:
    if message.type == "error":
        problems.append(message.text)


def _same_origin(problems: list[str], live: LiveService, url: str) -> None:
    if not url.startswith((f"{live.url}/", "data:")):
        problems.append(f"request to another origin: {url}")


def operations_in(document: dict[str, object]) -> list[tuple[str, str]]:
    paths = document["paths"]
    assert isinstance(paths, dict)
    return [(method.upper(), path) for path, item in paths.items() for method in item if method in METHODS]


@pytest.mark.browser
def test_docs_renders_every_operation_and_schema_of_the_openapi_document(live: LiveService, page: Page) -> None:
    document = httpx.get(f"{live.url}/openapi.json", timeout=10).json()
    operations = operations_in(document)
    assert len(operations) > 40  # the whole API, not a stub

    page.goto(f"{live.url}/docs")
    shown = page.locator(".opblock")
    expect(shown).to_have_count(len(operations), timeout=15_000)
    expect(page.locator("body")).not_to_contain_text("Unable to render this definition")
    expect(page.locator(".info .title")).to_contain_text(document["info"]["title"])
    expect(page.locator(".info .title")).to_contain_text(f"OAS {document['openapi'][:3]}")  # the version it read

    rendered = [
        (
            block.locator(".opblock-summary-method").inner_text(),
            block.locator(".opblock-summary-path").get_attribute("data-path"),
        )
        for block in shown.all()
    ]
    assert sorted(rendered) == sorted(operations)
    schemas = page.locator('.models article[data-json-schema-level="0"] > div > button .json-schema-2020-12__title')
    expect(schemas).to_have_count(len(document["components"]["schemas"]))
    assert sorted(schemas.all_inner_texts()) == sorted(document["components"]["schemas"])
    page.screenshot(path=str(SCREENSHOT), full_page=False)


@pytest.mark.browser
def test_an_operation_shows_an_example_built_from_its_3_1_request_schema(live: LiveService, page: Page) -> None:
    # EventIn's optional fields are pydantic's `anyOf: [..., {"type": "null"}]`, a JSON Schema 2020-12 form that
    # OpenAPI 3.0 viewers cannot read.
    event_in = httpx.get(f"{live.url}/openapi.json", timeout=10).json()["components"]["schemas"]["EventIn"]
    page.goto(f"{live.url}/docs")
    events = page.locator('.opblock-post:has(.opblock-summary-path[data-path="/v1/events"])')
    events.locator(".opblock-summary").click()
    body = events.locator(".opblock-section-request-body")
    expect(body).to_contain_text("application/json", timeout=15_000)
    example = json.loads(body.locator(".highlight-code").inner_text())
    assert set(example) == set(event_in["properties"])
    assert example["send_at"] is None  # anyOf [date-time, null] with default null


@pytest.mark.browser
def test_try_it_out_calls_the_service_under_the_pages_csp(live: LiveService, page: Page) -> None:
    served = httpx.get(f"{live.url}/docs", timeout=10)
    assert served.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "'unsafe-inline'" not in served.headers["content-security-policy"]
    page.goto(f"{live.url}/docs")
    healthz = page.locator('.opblock-get:has(.opblock-summary-path[data-path="/healthz"])')
    healthz.locator(".opblock-summary").click()
    healthz.get_by_role("button", name="Try it out").click()
    healthz.get_by_role("button", name="Execute").click()
    live_response = healthz.locator(".live-responses-table")
    expect(live_response.locator("tbody .response-col_status")).to_have_text("200", timeout=15_000)
    expect(live_response).to_contain_text('"status": "ok"')


# --- the vendored files ------------------------------------------------------------------------------------------


def test_the_vendored_swagger_ui_is_the_release_its_readme_names() -> None:
    readme = (SWAGGER_UI_DIR / "README.md").read_text()
    listed = dict(re.findall(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \|$", readme, flags=re.MULTILINE))
    present = {path.name for path in SWAGGER_UI_DIR.iterdir() if path.name != "README.md"}
    assert set(listed) == present
    for name, digest in listed.items():
        assert hashlib.sha256((SWAGGER_UI_DIR / name).read_bytes()).hexdigest() == digest, name
    [version] = set(re.findall(r"swagger-ui-dist@(\d+\.\d+\.\d+)", readme))
    assert f'PACKAGE_VERSION:"{version}"' in (SWAGGER_UI_DIR / "swagger-ui-bundle.js").read_text()


def test_the_wheel_carries_every_vendored_file() -> None:
    setuptools = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]
    assert "notifier.web.swagger_ui" in setuptools["packages"]
    patterns = setuptools["package-data"]["notifier.web.swagger_ui"]
    for path in SWAGGER_UI_DIR.iterdir():
        if path.name != "README.md":
            assert any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns), path.name
