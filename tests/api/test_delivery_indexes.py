"""Every filter GET /v1/deliveries offers is served by an index (PostgreSQL plans), and 0002 downgrades."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.ext.asyncio import AsyncConnection

from notifier import db
from notifier.db.delivery_reads import DeliveryFilters, page_query
from notifier.db.models import Delivery, Event

COMMON_TYPES = ("approval.requested", "approval.responded", "booking.confirmed", "chat.message.offline",
                "payment.received", "reservation.checkin_reminder", "reservation.checkout_reminder")  # fmt: skip
RARE_TYPE = "payment.failed"  # one event in 50: the kind of type an operator goes looking for
CHANNELS = ("push", "email", "in_app")
NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
ROWS = 10_000


def _status(i: int) -> tuple[str, str | None]:
    # Mostly sent, like a healthy service: failures and pending rows are the needles operators look for.
    bucket = i % 100
    if bucket < 2:
        return "failed", "rejected"
    if bucket < 4:
        return "queued", None
    if bucket < 14:
        return "suppressed", "opted_out"
    return "sent", None


async def _populate(conn: AsyncConnection) -> list[uuid.UUID]:
    event_ids = [uuid.uuid4() for _ in range(ROWS // 10)]
    events = [
        {"id": event_ids[e], "type": RARE_TYPE if e % 50 == 0 else COMMON_TYPES[e % 7], "body_hash": "0" * 64,
         "data": {}, "recipients": [], "source": "api", "received_at": NOW - dt.timedelta(minutes=100 * e)}
        for e in range(ROWS // 10)
    ]  # fmt: skip
    await conn.execute(sa.insert(Event), events)
    rows = []
    for i in range(ROWS):
        event = events[i // 10]  # ten deliveries per event, to ten different users
        status, reason = _status(i)
        created = NOW - dt.timedelta(minutes=i * 10)  # ~70 days of traffic
        rows.append(
            {"id": uuid.uuid4(), "event_id": event["id"], "event_type": event["type"], "user_id": f"user-{i % 500}",
             "channel": CHANNELS[i % 3], "status": status, "reason": reason, "attempts": 1, "retry_base": 0,
             "created_at": created, "updated_at": created}
        )  # fmt: skip
    await conn.execute(sa.insert(Delivery), rows)
    await conn.execute(sa.text("ANALYZE deliveries"))
    await conn.execute(sa.text("ANALYZE events"))
    return event_ids


async def _plan(conn: AsyncConnection, statement: sa.Select[Delivery]) -> str:
    sql = statement.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
    rows = await conn.execute(sa.text(f"EXPLAIN {sql}"))
    return "\n".join(row[0] for row in rows)


@pytest.mark.postgres_only
async def test_each_filter_is_served_by_an_index(postgres_url: str) -> None:
    engine = db.create_engine(postgres_url)
    try:
        async with engine.begin() as conn:
            event_ids = await _populate(conn)
        cases = [
            ("user", DeliveryFilters(user_id="user-7"), None, ("ix_deliveries_user_created",)),
            ("event", DeliveryFilters(event_id=event_ids[3]), None,
             ("ix_deliveries_event_id", "uq_deliveries_event_id_user_id_channel")),
            ("status+channel", DeliveryFilters(status="failed", channel="push"), None,
             ("ix_deliveries_status_channel_created",)),
            ("status+channel, page 2", DeliveryFilters(status="failed", channel="push"),
             (NOW - dt.timedelta(days=5), uuid.UUID(int=0)), ("ix_deliveries_status_channel_created",)),
            # status alone: the planner may walk the composite index, the due index or created_at backwards
            ("status", DeliveryFilters(status="failed"), None,
             ("ix_deliveries_status_channel_created", "ix_deliveries_due", "ix_deliveries_created")),
            ("type+since", DeliveryFilters(type=RARE_TYPE, since=NOW - dt.timedelta(days=7)), None,
             ("ix_deliveries_type_created",)),
            ("type", DeliveryFilters(type=RARE_TYPE), None, ("ix_deliveries_type_created",)),
            ("since", DeliveryFilters(since=NOW - dt.timedelta(days=1)), None, ("ix_deliveries_created",)),
            ("no filter", DeliveryFilters(), None, ("ix_deliveries_created",)),
        ]  # fmt: skip
        plans: dict[str, str] = {}
        async with engine.connect() as conn:
            for name, filters, cursor, indexes in cases:
                plan = await _plan(conn, page_query(filters, cursor=cursor, limit=50))
                plans[name] = plan
                assert any(index in plan for index in indexes), f"{name}: expected one of {indexes}, got\n{plan}"
                assert "Seq Scan" not in plan, f"{name}:\n{plan}"
        print("\n\n".join(f"-- {name}\n{plan}" for name, plan in plans.items()))
    finally:
        await engine.dispose()


def test_0002_downgrades_and_upgrades_again(tmp_path: Path) -> None:
    path = tmp_path / "migrations.db"
    config = db.alembic_config(f"sqlite+aiosqlite:///{path}")

    def indexes() -> set[str]:
        engine = sa.create_engine(f"sqlite:///{path}")
        try:
            return {index["name"] or "" for index in sa.inspect(engine).get_indexes("deliveries")}
        finally:
            engine.dispose()

    new = {"ix_deliveries_status_channel_created", "ix_deliveries_type_created"}
    command.upgrade(config, "head")
    assert new <= indexes()
    command.downgrade(config, "0001")
    assert not new & indexes()
    assert "ix_deliveries_user_created" in indexes()  # 0001's own indexes stay
    command.upgrade(config, "head")
    assert new <= indexes()
