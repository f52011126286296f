"""A claim that leaves out a send group because another transaction holds one of its members says so
(``contended``), so the feeder claims again in milliseconds instead of after its poll interval (PostgreSQL only:
SQLite has one writer and no ``SKIP LOCKED``); a group claimed whole has its members in id order."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlmodel import col

from notifier.db.models import Delivery
from tests.conftest import make_settings, running_service
from tests.dispatch.test_local import PAYMENT, push_settings
from tests.fakes.onesignal import OneSignalFake

LEASE = dt.timedelta(seconds=30)


async def test_a_group_held_in_part_elsewhere_is_left_out_and_the_claim_says_contended(
    postgres_url: str, onesignal_fake: OneSignalFake
) -> None:
    settings = make_settings(postgres_url, **push_settings(postgres_url, onesignal_fake))
    async with running_service(settings) as svc:
        await svc.runtime.dispatcher.aclose()  # claim by hand below, nothing else may
        await svc.post_event({"type": "payment.received", "recipients": ["u-1", "u-2"], "data": PAYMENT})
        await svc.post_event({"type": "payment.received", "recipients": ["u-3"], "data": PAYMENT})
        async with svc.runtime.sessions() as session:
            rows = (await session.execute(sa.select(Delivery).where(col(Delivery.channel) == "push"))).scalars()
            pushes = {d.user_id: d for d in rows}
        group = pushes["u-1"].send_group
        assert group is not None
        assert pushes["u-2"].send_group == group
        assert pushes["u-3"].send_group is None
        runner = svc.runtime.runner

        async with svc.runtime.sessions() as other, other.begin():  # another replica's claim, mid-transaction
            await other.execute(sa.select(Delivery.id).where(col(Delivery.id) == pushes["u-2"].id).with_for_update())
            contended = await runner.claim_due(limit=50, lease=LEASE)

        claimed = {d.claims[0].delivery.user_id for d in contended if d.claims[0].delivery.channel == "push"}
        assert contended.contended
        assert claimed == {"u-3"}  # the group goes whole or not at all
        after = await runner.claim_due(limit=50, lease=LEASE)  # the other transaction has ended
        assert not after.contended
        [batch] = [b for b in after if b.claims[0].delivery.channel == "push"]
        assert sorted(c.delivery.user_id for c in batch.claims) == ["u-1", "u-2"]


async def test_an_uncontended_claim_is_not_flagged(database_url: str, onesignal_fake: OneSignalFake) -> None:
    settings = make_settings(database_url, **push_settings(database_url, onesignal_fake))
    async with running_service(settings) as svc:
        await svc.runtime.dispatcher.aclose()
        await svc.post_event({"type": "payment.received", "recipients": ["u-1", "u-2"], "data": PAYMENT})
        claimed = await svc.runtime.runner.claim_due(limit=50, lease=LEASE)
    assert not claimed.contended
    assert sum(len(b.claims) for b in claimed) >= 2


async def test_a_groups_members_are_claimed_in_id_order_whatever_the_tables_order(
    database_url: str, onesignal_fake: OneSignalFake
) -> None:
    # A group's request must be the same at every attempt under its key (a provider refuses a key reused with
    # other parameters), so its members come in id order, not in the order of the table's rows.
    settings = make_settings(database_url, **push_settings(database_url, onesignal_fake))
    people = [f"u-{n}" for n in range(6)]
    async with running_service(settings) as svc:
        await svc.runtime.dispatcher.aclose()
        await svc.post_event({"type": "payment.received", "recipients": people, "data": PAYMENT})
        pushes = sa.select(Delivery.id).where(col(Delivery.channel) == "push")
        async with svc.runtime.sessions() as session:
            ids = sorted((await session.execute(pushes)).scalars())
        for delivery_id in reversed(ids):  # each row written anew, the last id first (PostgreSQL's order: reversed)
            async with svc.runtime.sessions() as session, session.begin():
                touch = sa.update(Delivery).where(col(Delivery.id) == delivery_id).values(last_error=None)
                await session.execute(touch)
        claimed = await svc.runtime.runner.claim_due(limit=50, lease=LEASE)
    [batch] = [b for b in claimed if b.claims[0].delivery.channel == "push"]
    assert [claim.delivery.id for claim in batch.claims] == ids
