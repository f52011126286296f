"""The in-app inbox: pages, unread count, read/unread/archive/read-all, and the delivery's status."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import sqlalchemy as sa
from sqlmodel import col

from notifier.db.models import Delivery
from tests.conftest import Service, booking_event, user_token
from tests.fakes.ably import AblyFake, ably_error

Factory = Callable[..., contextlib.AbstractAsyncContextManager[Service]]


async def fill_inbox(service: Service, count: int, user_id: str = "user-1") -> list[str]:
    for i in range(count):
        response = await service.post_event(
            booking_event(recipients=[user_id], data={**booking_event()["data"], "booking_id": f"b-{i}"})
        )
        assert response.status_code == 202
    await service.drain()
    items = (await service.get(f"/v1/users/{user_id}/inbox", params={"limit": "200"})).json()["data"]
    return [item["id"] for item in items]


async def test_inbox_pages_newest_first_with_a_stable_cursor(service: Service) -> None:
    ids = await fill_inbox(service, 7)
    assert len(ids) == 7
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        page = (await service.get("/v1/users/user-1/inbox", params=params)).json()
        assert page["unread_count"] == 7
        seen.extend(item["id"] for item in page["data"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids  # same order, no gaps, no repeats


async def test_read_unread_archive_and_read_all(service: Service) -> None:
    first, second, third = await fill_inbox(service, 3)
    auth = service.auth
    read = await service.client.post(f"/v1/users/user-1/inbox/{first}/read", headers=auth)
    assert read.status_code == 200
    assert read.json()["read_at"] is not None
    assert read.json()["unread_count"] == 2
    unread = (await service.get("/v1/users/user-1/inbox", params={"status": "unread"})).json()
    assert {i["id"] for i in unread["data"]} == {second, third}
    assert (await service.client.post(f"/v1/users/user-1/inbox/{first}/unread", headers=auth)).json()["read_at"] is None
    archived = await service.client.post(f"/v1/users/user-1/inbox/{second}/archive", headers=auth)
    assert archived.json()["unread_count"] == 2
    default_view = (await service.get("/v1/users/user-1/inbox")).json()
    assert second not in {i["id"] for i in default_view["data"]}
    archived_view = (await service.get("/v1/users/user-1/inbox", params={"archived": "true"})).json()
    assert [i["id"] for i in archived_view["data"]] == [second]
    everything = await service.client.post("/v1/users/user-1/inbox/read-all", headers=auth)
    assert everything.json() == {"marked_read": 2, "unread_count": 0}
    assert (await service.get("/v1/users/user-1/inbox", params={"status": "unread"})).json()["data"] == []


async def test_reading_an_item_marks_its_delivery_read(service: Service) -> None:
    [item_id] = await fill_inbox(service, 1)
    item = (await service.get("/v1/users/user-1/inbox")).json()["data"][0]
    await service.client.post(f"/v1/users/user-1/inbox/{item_id}/read", headers=service.auth)
    event = (await service.get(f"/v1/events/{item['event_id']}")).json()
    [in_app] = [d for d in event["deliveries"] if d["channel"] == "in_app"]
    assert in_app["status"] == "read"
    await service.client.post(f"/v1/users/user-1/inbox/{item_id}/unread", headers=service.auth)
    event = (await service.get(f"/v1/events/{item['event_id']}")).json()
    assert [d["status"] for d in event["deliveries"] if d["channel"] == "in_app"] == ["sent"]


async def test_a_user_reaches_only_their_own_inbox(service: Service) -> None:
    [own] = await fill_inbox(service, 1, "user-1")
    await fill_inbox(service, 1, "user-2")
    mine = {"Authorization": f"Bearer {user_token('user-1')}"}
    assert (await service.client.get("/v1/users/user-1/inbox", headers=mine)).status_code == 200
    assert (await service.client.get("/v1/users/user-2/inbox", headers=mine)).status_code == 403
    assert (await service.client.post(f"/v1/users/user-1/inbox/{own}/read", headers=mine)).status_code == 200
    # another user's message id under one's own path is simply not found
    other = (await service.get("/v1/users/user-2/inbox")).json()["data"][0]["id"]
    assert (await service.client.post(f"/v1/users/user-1/inbox/{other}/read", headers=mine)).status_code == 404


async def test_bad_inbox_queries_are_422(service: Service) -> None:
    response = await service.get(
        "/v1/users/user-1/inbox", params={"status": "maybe", "archived": "perhaps", "limit": "0"}
    )
    assert response.status_code == 422
    locs = [e["loc"] for e in response.json()["errors"]]
    assert ["query", "status"] in locs
    assert ["query", "archived"] in locs
    assert (await service.get("/v1/users/user-1/inbox", params={"cursor": "not-a-cursor"})).status_code == 422


async def test_a_message_read_before_its_delivery_is_recorded_sent_ends_read(
    service_factory: Factory, ably_fake: AblyFake
) -> None:
    # The inbox message is stored before it is announced; the announcement fails, so the delivery is queued for a
    # retry while its reader can already open the message. Recorded sent later, the delivery must end read.
    ably_fake.fail_next(ably_error(503, 50300))
    async with service_factory(ably_api_key=ably_fake.api_key, ably_rest_url=ably_fake.url) as svc:
        await svc.runtime.dispatcher.aclose()  # attempts are made by hand below
        assert (await svc.post_event(booking_event())).status_code == 202
        runner = svc.runtime.runner
        [first] = await runner.claim_due(limit=10, lease=runner.lease)
        assert [report.kind for report in await runner.complete(first)] == ["retry"]
        [item] = (await svc.get("/v1/users/user-1/inbox")).json()["data"]
        read = await svc.client.post(f"/v1/users/user-1/inbox/{item['id']}/read", headers=svc.auth)
        assert read.status_code == 200
        async with svc.runtime.sessions() as session, session.begin():  # the retry is due now
            await session.execute(
                sa.update(Delivery).where(col(Delivery.id) == first.claims[0].delivery.id).values(not_before=None)
            )
        [second] = await runner.claim_due(limit=10, lease=runner.lease)
        assert [report.kind for report in await runner.complete(second)] == ["sent"]
        delivery = (await svc.get(f"/v1/deliveries/{item['delivery_id']}")).json()
    assert delivery["status"] == "read"
    assert [(t["from"], t["to"]) for t in delivery["transitions"]][-2:] == [
        ("sending", "sent"),
        ("sent", "read"),
    ]
