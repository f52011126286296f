"""A template variable the data lacks is a 422 at ingest, whichever template needs it; nothing is stored.

The catalog below requires no data field, so only rendering can find what is missing: each template
(a channel's title, body or HTML, the digest message, the digest key, the presence channel, the
action URL, a locale's variant) uses a variable of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Service

CATALOG = """
[types."room.note"]
category = "chat"
description = "Every kind of template, each with a variable of its own."
default_channels = ["push", "in_app"]
also_allowed = ["email"]
required = []
presence_channel = "room:{{ room }}"
presence_suppresses = ["push"]
action_url = "/rooms/{{ url_part }}"

[types."room.note".digest]
channel = "push"
key = "{{ thread }}"

[types."room.note".templates.default.en]
title = "{{ title_part }}"
body = "{{ body_part }}"

[types."room.note".templates.default.de]
title = "{{ german_part }}"
body = "{{ body_part }}"

[types."room.note".templates.digest.en]
title = "{{ title_part }}"
body = "{{ count }} notes, last: {{ digest_part }}"

[types."room.note".templates.email.en]
title = "{{ title_part }}"
body = "{{ body_part }}"
html = "<p>{{ html_part }}</p>"
"""

COMPLETE = {
    "room": "r-1",
    "url_part": "r-1",
    "thread": "t-1",
    "title_part": "Hello",
    "body_part": "A note",
    "german_part": "Hallo",
    "digest_part": "the latest",
    "html_part": "<b>escaped</b>",
}


@pytest.fixture
async def service(tmp_path: Path, service_factory: Callable[..., AbstractAsyncContextManager[Service]]) -> Any:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(CATALOG, encoding="utf-8")
    async with service_factory(catalog_path=catalog) as running:
        yield running


def note(data: dict[str, Any], *recipients: Any) -> dict[str, Any]:
    return {"type": "room.note", "recipients": list(recipients) or ["user-1"], "data": data}


async def test_complete_data_is_accepted(service: Service) -> None:
    response = await service.post_event(note(COMPLETE, "user-1", {"id": "user-2", "locale": "de"}))
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("missing", "recipient", "kind"),
    [
        ("title_part", "user-1", "email template"),  # channels are checked in name order: email first
        ("body_part", "user-1", "email template"),
        ("html_part", "user-1", "email template"),
        ("german_part", {"id": "user-2", "locale": "de"}, "in_app template"),
        ("digest_part", "user-1", "digest template"),
        ("thread", "user-1", "digest key template"),
        ("room", "user-1", "presence channel template"),
        ("url_part", "user-1", "action_url template"),
    ],
)
async def test_a_variable_missing_from_any_template_is_a_422_naming_it(
    service: Service, missing: str, recipient: Any, kind: str
) -> None:
    data = {name: value for name, value in COMPLETE.items() if name != missing}
    response = await service.post_event(note(data, recipient))

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    [error] = response.json()["errors"]
    assert error["loc"] == ["data"]
    assert error["msg"].startswith(f"{kind}: missing template variable")
    assert f"'{missing}'" in error["msg"]
    listed = await service.get("/v1/deliveries", params={"limit": "10"})
    assert listed.json()["data"] == []  # nothing stored


async def test_a_locale_nobody_uses_is_not_required(service: Service) -> None:
    data = {name: value for name, value in COMPLETE.items() if name != "german_part"}
    response = await service.post_event(note(data, "user-1"))
    assert response.status_code == 202, response.text
