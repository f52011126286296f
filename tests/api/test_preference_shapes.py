"""A preference document member of the wrong JSON type is a 422 naming it, never "no opinion": for a user (by
service key or by their own token) and an organization, through PUT and merge PATCH, with nothing written.
``null`` keeps its meaning: absent in a document, "remove the member" in a merge patch."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.test_preferences import MERGE, USER, bearer, patch, put
from tests.conftest import Service, user_token

ORGANIZATION = "/v1/organizations/org-1/preferences"
OPTED_OUT = {"push": False, "email": False}
# Falsy values once read as {} (every channel back on); the truthy ones were always refused.
NOT_OBJECTS: list[Any] = [False, [], 0, "", True, ["push"], "push"]


async def _assert_untouched(service: Service, path: str) -> None:
    current = (await service.get(path)).json()
    assert (current["version"], current["channels"]) == (1, {**OPTED_OUT, "in_app": True})


@pytest.mark.parametrize("path", [USER, ORGANIZATION], ids=["user", "organization"])
async def test_channels_that_are_not_an_object_are_422_and_keep_the_opt_outs(service: Service, path: str) -> None:
    assert (await put(service, {"channels": OPTED_OUT}, path=path)).status_code == 200
    for value in NOT_OBJECTS:
        for write in (put, patch):
            response = await write(service, {"channels": value}, path=path)
            assert response.status_code == 422, (write.__name__, value, response.text)
            assert [e["loc"] for e in response.json()["errors"]] == [["channels"]], (write.__name__, value)
    await _assert_untouched(service, path)


async def test_a_user_token_gets_the_same_422(service: Service) -> None:
    token = bearer(user_token("alice"))
    assert (await service.client.put(USER, json={"channels": OPTED_OUT}, headers=token)).status_code == 200
    responses: list[httpx.Response] = [
        await service.client.put(USER, json={"channels": False}, headers=token),
        await service.client.patch(USER, content=b'{"channels": []}', headers={**token, **MERGE}),
    ]
    for response in responses:
        assert response.status_code == 422, response.text
        assert [e["loc"] for e in response.json()["errors"]] == [["channels"]]
    await _assert_untouched(service, USER)


@pytest.mark.parametrize("path", [USER, ORGANIZATION], ids=["user", "organization"])
async def test_every_member_of_the_wrong_type_is_named_at_once(service: Service, path: str) -> None:
    response = await put(service, {"channels": [], "categories": [], "event_types": 0}, path=path)
    assert response.status_code == 422, response.text
    assert sorted(e["loc"] for e in response.json()["errors"]) == [["categories"], ["channels"], ["event_types"]]
    assert (await service.get(path)).json()["version"] == 0


async def test_null_is_no_opinion_in_a_document_and_removes_in_a_merge_patch(service: Service) -> None:
    assert (await put(service, {"channels": OPTED_OUT, "categories": {"chat": {"push": False}}})).status_code == 200
    removed = await patch(service, {"channels": None})
    assert removed.status_code == 200, removed.text
    assert removed.json()["channels"] == {"push": True, "email": True, "in_app": True}
    assert removed.json()["categories"] == {"chat": {"push": False}}
    replaced = await put(service, {"channels": None, "categories": None, "event_types": None})
    assert replaced.status_code == 200, replaced.text
    assert (replaced.json()["categories"], replaced.json()["version"]) == ({}, 3)
