"""The data layer's batch functions on SQLite and PostgreSQL: they write and read what the one-row ones did."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col

from notifier import db
from notifier.catalog import load_catalog
from notifier.db import deliveries, digests, events
from notifier.db import users as user_rows
from notifier.db.models import Delivery, DeliveryTransition, Event, OrganizationPreferences, User, UserPreferences
from notifier.delivery.recipients import load_recipients
from notifier.delivery.state import DeliveryStates, Move, NewDelivery
from notifier.metrics import Metrics
from notifier.routing import Profile
from notifier.types import ChannelName, utcnow
from tests.conftest import Sessions

NOW = utcnow()
CATALOG = load_catalog()


async def users_by_id(sessions: Sessions) -> dict[str, User]:
    async with sessions() as session:
        return {user.id: user for user in (await session.execute(sa.select(User))).scalars()}


async def test_upsert_users_changes_only_the_fields_each_profile_names(sessions: Sessions) -> None:
    async with sessions() as session, session.begin():
        await user_rows.ensure(session, user_ids=["c", "a"], now=NOW)
        await user_rows.upsert(session, profiles=[{"id": "b", "email": "b@example.com", "locale": "de"}], now=NOW)
    later = utcnow()
    profiles: list[dict[str, Any]] = [
        {"id": "c", "email": "c@example.com", "locale": "en"},
        {"id": "a", "email": "a@example.com", "locale": "en"},
        {"id": "b", "email": None},  # an explicit null clears the field
        {"id": "a", "name": "Ann"},  # the same id twice: both apply, in order
        {"id": "a", "locale": "fr"},
        {"id": "d", "organization_id": "org-1", "roles": ["ORG_ADMIN"]},
    ]
    async with sessions() as session, session.begin():
        await user_rows.upsert(session, profiles=profiles, now=later)
    users = await users_by_id(sessions)
    assert {u: (users[u].email, users[u].locale, users[u].name) for u in "abc"} == {
        "a": ("a@example.com", "fr", "Ann"),
        "b": (None, "de", None),
        "c": ("c@example.com", "en", None),
    }
    assert (users["d"].organization_id, users["d"].roles) == ("org-1", ["ORG_ADMIN"])
    assert all(users[u].updated_at == later for u in "abcd")
    assert users["a"].created_at == NOW


async def test_load_recipients_reads_profiles_and_the_documents_routing_applies(sessions: Sessions) -> None:
    async with sessions() as session, session.begin():
        await user_rows.upsert(
            session,
            profiles=[
                {"id": "in-org", "organization_id": "org-1", "email": "x@example.com", "timezone": "Europe/Berlin"},
                {"id": "no-org", "locale": "de"},
                {"id": "bare-org", "organization_id": "org-2"},
            ],
            now=NOW,
        )
        session.add(UserPreferences(user_id="in-org", document={"channels": {"push": False}}))
        session.add(OrganizationPreferences(organization_id="org-1", document={"channels": {"email": False}}))
        session.add(OrganizationPreferences(organization_id="org-event", document={"channels": {"in_app": False}}))
    async with sessions() as session:
        stored = await load_recipients(
            session,
            user_ids=["in-org", "missing", "no-org", "bare-org"],
            event_organization_id="org-event",
            catalog=CATALOG,
        )
    assert stored.profiles == {
        "in-org": Profile(id="in-org", organization_id="org-1", email="x@example.com", timezone="Europe/Berlin"),
        "no-org": Profile(id="no-org", locale="de"),
        "bare-org": Profile(id="bare-org", organization_id="org-2"),
    }
    assert {uid: doc.channels for uid, doc in stored.preferences.items()} == {"in-org": {ChannelName.push: False}}
    # a user's own organization, else the event's; org-2 has no document but was looked up
    assert {org: doc.channels for org, doc in stored.organization_preferences.items()} == {
        "org-1": {ChannelName.email: False},
        "org-event": {ChannelName.in_app: False},
    }
    assert stored.checked_organizations == {"org-1", "org-2", "org-event"}


def event_row(key: str | None = None, body_hash: str = "0" * 64) -> dict[str, Any]:
    return {
        "id": uuid.uuid4(),
        "type": "booking.confirmed",
        "idempotency_key": key,
        "body_hash": body_hash,
        "data": {},
        "recipients": [],
        "received_at": NOW,
    }


def delivery_row(event_id: uuid.UUID, channel: str) -> dict[str, Any]:
    return {
        "id": uuid.uuid4(),
        "event_id": event_id,
        "event_type": "booking.confirmed",
        "user_id": "u",
        "channel": channel,
        "status": "queued",
        "created_at": NOW,
        "updated_at": NOW,
    }


async def test_insert_event_refuses_a_taken_idempotency_key_and_keeps_the_first(sessions: Sessions) -> None:
    async with sessions() as session, session.begin():
        assert await events.insert(session, row=event_row("k", "1" * 64))
        assert not await events.insert(session, row=event_row("k", "2" * 64))
        assert await events.insert(session, row=event_row(None, "3" * 64))
        assert await events.insert(session, row=event_row(None, "4" * 64))
    async with sessions() as session:
        hashes = sorted((await session.execute(sa.select(col(Event.body_hash)))).scalars())
    assert hashes == ["1" * 64, "3" * 64, "4" * 64]


async def test_recorded_transitions_log_a_line_each_and_are_stored_in_one_statement(
    sessions: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    event = event_row()
    rows = [delivery_row(event["id"], "email"), delivery_row(event["id"], "in_app")]
    first, second = (d["id"] for d in rows)
    states = DeliveryStates(Metrics())
    async with sessions() as session, session.begin():
        await events.insert(session, row=event)
        with caplog.at_level(logging.INFO, logger="notifier.delivery"):
            await states.create(session, [NewDelivery(rows[0], "x" * 600)], now=NOW)
            await deliveries.insert(session, rows=rows[1:])
            other_row = Delivery(**rows[1])
            other_row.status, other_row.reason = "suppressed", "opted_out"
            await states.record(session, [Move(other_row, "queued")], now=NOW)
    one, other = caplog.records
    fields = ("delivery_id", "from_status", "to_status", "reason", "channel")
    assert one.getMessage() == "delivery new -> queued"
    assert [getattr(one, f) for f in (*fields, "event_id")] == [
        str(first),
        None,
        "queued",
        None,
        "email",
        str(event["id"]),
    ]
    assert other.getMessage() == "delivery queued -> suppressed"
    assert [getattr(other, f) for f in fields] == [str(second), "queued", "suppressed", "opted_out", "in_app"]
    async with sessions() as session:
        rows = list((await session.execute(sa.select(DeliveryTransition))).scalars())
    stored = sorted((r.delivery_id == first, r.from_status or "", r.to_status, r.reason, r.note, r.at) for r in rows)
    assert stored == [
        (False, "queued", "suppressed", "opted_out", None, NOW),
        (True, "", "queued", None, "x" * 500, NOW),
    ]


async def test_the_inbox_stores_one_message_per_delivery_and_a_repeat_gets_the_first_back(sessions: Sessions) -> None:
    import asyncio

    from notifier.channels.base import Message, Recipient
    from notifier.db.models import InboxMessage
    from notifier.delivery.inbox_store import DatabaseInboxStore

    inbox = DatabaseInboxStore(sessions)
    first, second = uuid.uuid4(), uuid.uuid4()

    def message(delivery_id: uuid.UUID, title: str) -> Message:
        return Message(
            delivery_id=delivery_id,
            event_id=uuid.uuid4(),
            event_type="payment.received",
            channel=ChannelName.in_app,
            recipient=Recipient(id="user-1"),
            title=title,
            body="body",
            data={"amount": 12},
            action_url="/payments/1",
        )

    original = await inbox.store(message(first, "original"))
    # A retried attempt of the first delivery, stored in the same batch as a new one.
    repeat, new = await asyncio.gather(inbox.store(message(first, "changed")), inbox.store(message(second, "new")))

    assert repeat == original
    assert (original["title"], original["data"], original["delivery_id"]) == ("original", {"amount": 12}, str(first))
    assert (new["title"], new["delivery_id"]) == ("new", str(second))
    async with sessions() as session:
        stored = {m.delivery_id: m for m in (await session.execute(sa.select(InboxMessage))).scalars()}
    assert set(stored) == {first, second}
    assert {str(stored[first].id), str(stored[second].id)} == {original["id"], new["id"]}
    assert stored[first].title == "original"
    assert original["created_at"] == stored[first].created_at.isoformat()


async def test_a_digest_head_counts_itself_and_what_was_folded_into_it(sessions: Sessions) -> None:
    import datetime as dt

    event = event_row()
    at = [NOW + dt.timedelta(seconds=s) for s in range(4)]

    def row(key: str, created: dt.datetime, status: str = "deferred", head: Any = None) -> dict[str, Any]:
        return delivery_row(event["id"], "push") | {
            "user_id": uuid.uuid4().hex, "digest_key": key, "status": status, "created_at": created,
            "updated_at": created, "reason": "digested" if head else None, "digest_head": head and head["id"],
        }  # fmt: skip

    sent_k, head_l = row("K", at[0], "sent"), row("L", at[0])
    older_k, newer_k = row("K", at[1], "queued"), row("K", at[2])  # two open heads of one key
    rows = [
        sent_k,
        head_l,
        older_k,
        newer_k,
        row("K", at[1], "suppressed", sent_k),  # folded into K's sent digest
        row("K", at[3], "suppressed", older_k),  # folded into the older head after the newer one was created
        row("K", at[0], "suppressed", newer_k),  # stamped before its head: another replica's clock
        row("K", at[3], "suppressed", newer_k),
        row("M", at[3], "suppressed", row("M", at[0])),  # another key altogether
    ]
    async with sessions() as session, session.begin():
        await events.insert(session, row=event)
        await deliveries.insert(session, rows=rows)
    async with sessions() as session:
        heads = list(
            (
                await session.execute(
                    sa.select(Delivery).where(col(Delivery.id).in_([older_k["id"], newer_k["id"], head_l["id"]]))
                )
            ).scalars()
        )
        counts = await digests.counts(session, heads=heads)
        assert await digests.counts(session, heads=[]) == {}
        # Where the next message of each key goes: the newer of K's open heads; none is open for M.
        assert await digests.open_heads(session, digest_keys=["K", "L", "M"]) == {"K": newer_k["id"], "L": head_l["id"]}
        assert await digests.open_heads(session, digest_keys=[]) == {}
    assert counts == {older_k["id"]: 2, newer_k["id"]: 3, head_l["id"]: 1}


@pytest.mark.postgres_only
async def test_a_snapshot_reads_the_database_as_of_one_moment_and_leaves_the_pool_as_it_was(
    postgres_engine: AsyncEngine,
) -> None:
    sessions = db.create_session_factory(postgres_engine)
    users = sa.select(sa.func.count()).select_from(User)
    for snapshot, seen_later in ((True, 0), (False, 1)):
        async with sessions() as reader:
            if snapshot:
                await db.snapshot(reader)
            before = await reader.scalar(users)
            async with sessions() as writer, writer.begin():
                writer.add(User(id=f"committed-meanwhile-{snapshot}"))
            assert await reader.scalar(users) == (before or 0) + seen_later
    async with sessions() as session:  # the pooled connection went back at the default isolation level
        assert await session.scalar(sa.text("SHOW transaction_isolation")) == "read committed"


async def test_users_upserted_and_ensured_in_one_statement_keep_their_fields_and_the_last_profile_wins(
    sessions: Sessions,
) -> None:
    async with sessions() as session, session.begin():
        await user_rows.ensure(session, user_ids=["b", "a", "b"], now=NOW)
        first = {"id": "a", "email": "old@example.com", "roles": ["manager"]}
        again = {"id": "a", "email": "new@example.com", "roles": ["owner"]}
        await user_rows.upsert(session, profiles=[first, {"id": "c", "locale": "fr"}, again], now=NOW)
        await user_rows.ensure(session, user_ids=["a", "d"], now=NOW)  # "a" exists: left as it is
    async with sessions() as session:
        stored = {u.id: u for u in (await session.execute(sa.select(User))).scalars()}
    assert sorted(stored) == ["a", "b", "c", "d"]
    assert (stored["a"].email, stored["a"].roles, stored["a"].locale) == ("new@example.com", ["owner"], None)
    assert (stored["b"].email, stored["b"].roles) == (None, [])
    assert (stored["c"].locale, stored["c"].email) == ("fr", None)
    assert stored["a"].created_at == stored["d"].created_at == NOW
