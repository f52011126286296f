"""Every list route names every bad query parameter (and a bad path id) in one 422, as a body's bad fields are
named all at once: a caller fixes the request once, not once per parameter."""

from __future__ import annotations

import pytest

from tests.conftest import Service

BAD_PAGE = {"limit": "0", "cursor": "abc"}
PAGE_LOCS = [["query", "cursor"], ["query", "limit"]]


@pytest.mark.parametrize(
    ("path", "params", "locs"),
    [
        (
            "/v1/events",
            {**BAD_PAGE, "since": "x", "type": "\x00"},
            [*PAGE_LOCS, ["query", "since"], ["query", "type"]],
        ),
        (
            "/v1/deliveries",
            {**BAD_PAGE, "since": "x", "status": "lost", "user_id": "\x00"},
            [*PAGE_LOCS, ["query", "since"], ["query", "status"], ["query", "user_id"]],
        ),
        (
            "/v1/users/u/inbox",
            {**BAD_PAGE, "status": "x", "archived": "maybe"},
            [*PAGE_LOCS, ["query", "archived"], ["query", "status"]],
        ),
        ("/v1/users/%00/inbox", {**BAD_PAGE, "status": "x"}, [["path", "user_id"], *PAGE_LOCS, ["query", "status"]]),
        ("/v1/users/u/preferences/history", BAD_PAGE, PAGE_LOCS),
        ("/v1/users/%00/preferences/history", BAD_PAGE, [["path", "user_id"], *PAGE_LOCS]),
        ("/v1/organizations/o/preferences/history", BAD_PAGE, PAGE_LOCS),
    ],
    ids=["events", "deliveries", "inbox", "inbox-path", "user-history", "user-history-path", "org-history"],
)
async def test_a_list_route_names_every_bad_parameter_at_once(
    service: Service, path: str, params: dict[str, str], locs: list[list[str]]
) -> None:
    response = await service.get(path, params=params)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert sorted(e["loc"] for e in response.json()["errors"]) == sorted(locs)


@pytest.mark.parametrize(
    "path",
    ["/v1/events", "/v1/deliveries", "/v1/users/u/inbox", "/v1/users/u/preferences/history"],
    ids=["events", "deliveries", "inbox", "history"],
)
@pytest.mark.parametrize(("name", "value"), [("limit", "201"), ("limit", "²"), ("cursor", "!")])
async def test_each_list_route_words_a_bad_page_parameter_alike(
    service: Service, path: str, name: str, value: str
) -> None:
    response = await service.get(path, params={name: value})
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    expected = "must be an integer from 1 to 200" if name == "limit" else "not a cursor this service issued"
    assert (error["loc"], error["msg"]) == (["query", name], expected)
