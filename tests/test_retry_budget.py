"""The retry budget is absolute: a delivery is never sent again once 1 + NOTIFIER_MAX_RETRIES attempts are spent,
even when the outcome of an attempt could not be stored; and an outcome the columns cannot hold is stored cut
to fit, not lost (which would leave the row ``sending`` to be taken over and sent again, forever)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlmodel import col

from notifier.db.models import Delivery, DeliveryAttempt, DeliveryTransition
from tests.conftest import Service, make_settings, running_service
from tests.db_faults import dsn_of
from tests.fakes.base import Fault
from tests.fakes.knock import KnockFake
from tests.fakes.onesignal import OneSignalFake
from tests.reliability.ledger import eventually

PAYMENT = {"payment_id": "p-1", "amount": "10", "currency": "EUR", "payer_name": "Ann"}
USER = {"id": "u-1", "email": "u-1@example.com"}


def knock(fake: KnockFake) -> dict[str, Any]:
    return {"knock_api_key": fake.api_key, "knock_base_url": fake.url, "max_retries": 2}


async def email_of(svc: Service) -> Delivery:
    async with svc.runtime.sessions() as session:
        [row] = (await session.execute(sa.select(Delivery).where(col(Delivery.channel) == "email"))).scalars()
        return row


async def attempts_of(svc: Service, delivery_id: uuid.UUID) -> list[DeliveryAttempt]:
    async with svc.runtime.sessions() as session:
        rows = await session.execute(sa.select(DeliveryAttempt).where(col(DeliveryAttempt.delivery_id) == delivery_id))
        return sorted(rows.scalars(), key=lambda a: a.number)


async def test_a_provider_id_longer_than_its_column_is_stored_cut_and_sent_once(
    database_url: str, knock_fake: KnockFake
) -> None:
    run_id = "wrun_" + "x" * 295  # 300 characters; the columns hold 200
    knock_fake.fail_next(Fault.http(200, {"workflow_run_id": run_id}))
    async with running_service(make_settings(database_url, **knock(knock_fake))) as svc:
        assert (
            await svc.post_event({"type": "payment.received", "recipients": [USER], "data": PAYMENT})
        ).status_code == 202
        await svc.drain()
        email = await email_of(svc)
        [attempt] = await attempts_of(svc, email.id)
    assert (email.status, email.attempts, email.provider_message_id) == ("sent", 1, run_id[:200])
    assert attempt.provider_message_id == run_id[:200]
    assert len(knock_fake.trigger_requests()) == 1  # sent once, never again


async def test_a_provider_reply_with_nul_characters_is_stored_without_them(
    database_url: str, knock_fake: KnockFake
) -> None:
    knock_fake.fail_next(Fault.http(400, "bad\x00request"))  # a JSON string: decoded, the NUL is real
    async with running_service(make_settings(database_url, **knock(knock_fake))) as svc:
        await svc.post_event({"type": "payment.received", "recipients": [USER], "data": PAYMENT})
        await svc.drain()
        email = await email_of(svc)
        [attempt] = await attempts_of(svc, email.id)
    assert (email.status, email.reason) == ("failed", "rejected")
    assert "\x00" not in (email.last_error or "")
    assert "badrequest" in (attempt.error or "")
    assert len(knock_fake.trigger_requests()) == 1


async def test_a_delivery_whose_attempts_are_spent_is_failed_by_the_claim_not_sent(
    database_url: str, knock_fake: KnockFake
) -> None:
    settings = make_settings(database_url, **knock(knock_fake))
    async with running_service(settings) as svc:
        await svc.runtime.dispatcher.aclose()  # nothing claims until the row is set up below
        await svc.post_event({"type": "payment.received", "recipients": [USER], "data": PAYMENT})
        email = await email_of(svc)
        # Three attempts made (1 + NOTIFIER_MAX_RETRIES), the last one's outcome never stored: the row was left
        # ``sending`` under a lease that has run out.
        async with svc.runtime.sessions() as session, session.begin():
            await session.execute(
                sa.update(Delivery)
                .where(col(Delivery.id) == email.id)
                .values(status="sending", attempts=3, claimed_until=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
            )
        batches = await svc.runtime.runner.claim_due(limit=10, lease=dt.timedelta(seconds=30))
        ended = await email_of(svc)
        async with svc.runtime.sessions() as session:
            moves = (
                await session.execute(
                    sa.select(DeliveryTransition).where(col(DeliveryTransition.delivery_id) == email.id)
                )
            ).scalars()
            notes = [t.note for t in moves if t.to_status == "failed"]
    assert all(email.id not in b.delivery_ids for b in batches)
    assert (ended.status, ended.reason, ended.attempts) == ("failed", "retries_exhausted", 3)
    [note] = notes
    assert "retry budget was spent" in (note or "")
    assert knock_fake.trigger_requests() == []  # never sent again


async def test_the_fallback_of_a_delivery_the_claim_fails_is_sent_without_waiting_for_the_poll(
    database_url: str, knock_fake: KnockFake, onesignal_fake: OneSignalFake
) -> None:
    providers = {**knock(knock_fake), **onesignal_fake.settings()}
    async with running_service(make_settings(database_url, **providers)) as svc:
        await svc.runtime.dispatcher.aclose()  # nothing claims until the row is set up below
        chat = {"conversation_id": "c-1", "sender_name": "Bob", "preview": "hi"}
        await svc.post_event({"type": "chat.message.offline", "recipients": [USER], "data": chat})
        async with svc.runtime.sessions() as session, session.begin():  # its attempts spent, the last unrecorded
            await session.execute(
                sa.update(Delivery)
                .where(col(Delivery.channel) == "push")
                .values(status="sending", attempts=3, claimed_until=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
            )
    # A dispatcher that polls every 30 s: its first claim fails the push and plans the email fallback, due now.
    async with running_service(make_settings(database_url, poll_interval_seconds=30, **providers)) as svc:
        await eventually(lambda: bool(knock_fake.trigger_requests()), timeout=5, what="the fallback email")
    assert onesignal_fake.requests == []


@pytest.mark.postgres_only
async def test_an_outcome_the_database_refuses_is_stored_as_failed_not_left_to_be_sent_again(
    postgres_url: str, knock_fake: KnockFake
) -> None:
    # A database that refuses the attempt's values (a data error, as a value too long or an invalid byte once
    # were): a trigger standing in for whatever a provider may one day answer that the columns cannot take.
    conn = await asyncpg.connect(dsn_of(postgres_url))
    try:
        await conn.execute(
            """
            CREATE FUNCTION refuse_run() RETURNS trigger AS $$ BEGIN
              IF NEW.provider_message_id = 'wrun-refused' THEN
                RAISE EXCEPTION 'value refused' USING ERRCODE = '22001';
              END IF;
              RETURN NEW;
            END $$ LANGUAGE plpgsql;
            CREATE TRIGGER refuse_run BEFORE UPDATE ON delivery_attempts FOR EACH ROW EXECUTE FUNCTION refuse_run();
            """
        )
        knock_fake.fail_next(Fault.http(200, {"workflow_run_id": "wrun-refused"}))
        async with running_service(make_settings(postgres_url, **knock(knock_fake))) as svc:
            await svc.post_event({"type": "payment.received", "recipients": [USER], "data": PAYMENT})
            await svc.drain()
            email = await email_of(svc)
            counted = {
                sample.labels["outcome"]: sample.value
                for metric in svc.runtime.metrics.registry.collect()
                if metric.name == "notifier_delivery_attempts"
                for sample in metric.samples
                if sample.name.endswith("_total") and sample.labels["channel"] == "email"
            }
    finally:
        await conn.execute(
            "DROP TRIGGER IF EXISTS refuse_run ON delivery_attempts; DROP FUNCTION IF EXISTS refuse_run()"
        )
        await conn.close()
    assert counted == {"failed": 1.0}  # one attempt, counted as stored: not once per write of it
    assert (email.status, email.reason) == ("failed", "retries_exhausted")
    assert "could not be stored" in (email.last_error or "")
    assert len(knock_fake.trigger_requests()) == 1
