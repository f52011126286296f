"""The dashboard's figures (``db.stats``): the p95 latency is aggregated in the database, equal to the
nearest-rank p95 taken over every duration, without the durations ever reaching Python."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import col

from notifier.db.models import Delivery, DeliveryAttempt, Event
from notifier.db.stats import channel_stats, p95
from tests.conftest import Sessions

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
MS = 1000  # microseconds


def _shuffled(values: list[int]) -> list[int]:
    random.Random(17).shuffle(values)
    return values


CASES: dict[str, list[int]] = {  # attempt durations in microseconds
    "one attempt": [7 * MS],
    "20: rank 19": [n * MS for n in range(1, 21)],
    "21: rank 20": [n * MS for n in range(1, 22)],
    "19: rank 19, the largest": [n * MS for n in range(1, 20)],
    "100 shuffled: rank 95": _shuffled([n * MS for n in range(1, 101)]),
    "101 with ties": _shuffled([5 * MS] * 50 + [9 * MS] * 45 + [400 * MS] * 6),
    "microseconds apart": [1, 2, 3, 999_999, 1_000_000, 1_000_001],
    "seconds and minutes": [1_500_000, 61_250_125, 3_600_000_001, 250 * MS],
    "zero": [0, 0, 0],
}


async def _store(sessions: Sessions, durations: dict[str, list[int]], **attempt: Any) -> None:
    """One delivery per channel with an attempt of each duration (started within the last hour)."""
    async with sessions() as session, session.begin():
        event = Event(type="booking.confirmed", body_hash="x", received_at=NOW - dt.timedelta(hours=1))
        session.add(event)
        await session.flush()
        for channel, values in durations.items():
            delivery = Delivery(
                event_id=event.id, event_type="booking.confirmed", user_id="u-1", channel=channel, status="sent"
            )
            delivery.created_at = NOW - dt.timedelta(hours=1)
            session.add(delivery)
            await session.flush()
            for number, micros in enumerate(values, start=1):
                started = NOW - dt.timedelta(minutes=30, microseconds=number * 7919)
                session.add(
                    DeliveryAttempt(
                        delivery_id=delivery.id,
                        number=number,
                        started_at=started,
                        finished_at=started + dt.timedelta(microseconds=micros),
                        outcome=attempt.get("outcome", "sent"),
                    )
                )


@pytest.mark.parametrize("durations", CASES.values(), ids=CASES.keys())
async def test_the_p95_is_the_nearest_rank_p95_of_every_duration(sessions: Sessions, durations: list[int]) -> None:
    await _store(sessions, {"push": durations})
    async with sessions() as session:
        stats = {s.channel: s for s in await channel_stats(session, now=NOW)}
    started = NOW - dt.timedelta(minutes=30)
    # What the dashboard computed before the SQL did: each duration as a timedelta, in ms, ranked in Python.
    in_python = [(started + dt.timedelta(microseconds=d) - started).total_seconds() * 1000 for d in durations]
    assert stats["push"].measured == len(durations)
    assert stats["push"].p95_ms == pytest.approx(p95(in_python), rel=1e-12, abs=1e-9)
    assert (stats["email"].p95_ms, stats["email"].measured) == (None, 0)


async def test_unfinished_interrupted_and_old_attempts_are_not_measured(sessions: Sessions) -> None:
    await _store(sessions, {"push": [5 * MS, 6 * MS]})
    await _store(sessions, {"push": [900 * MS]}, outcome="interrupted")
    async with sessions() as session, session.begin():
        delivery_id = (await session.execute(sa.select(col(Delivery.id)).limit(1))).scalar_one()
        session.add(DeliveryAttempt(delivery_id=delivery_id, number=99, started_at=NOW - dt.timedelta(minutes=1)))
        session.add(
            DeliveryAttempt(
                delivery_id=delivery_id,
                number=98,
                started_at=NOW - dt.timedelta(hours=25),
                finished_at=NOW - dt.timedelta(hours=24, minutes=59),
                outcome="sent",
            )
        )
    async with sessions() as session:
        [push] = [s for s in await channel_stats(session, now=NOW) if s.channel == "push"]
    assert (push.p95_ms, push.measured) == (6.0, 2)


async def test_the_durations_stay_in_the_database(sessions: Sessions) -> None:
    # 3 x 1000 attempts; the statements return one row per channel (and status), not one per attempt.
    await _store(sessions, {channel: [n * 37 for n in range(1000)] for channel in ("push", "email", "in_app")})
    fetched: list[int] = []
    async with sessions() as session:
        execute = session.execute

        async def counting(*args: Any, **kwargs: Any) -> Any:
            frozen = (await execute(*args, **kwargs)).freeze()
            fetched.append(len(frozen.data))
            return frozen()

        session.execute = counting  # type: ignore[method-assign]
        stats = await channel_stats(session, now=NOW)
    assert [s.measured for s in stats] == [1000, 1000, 1000]
    assert sum(fetched) <= 3 + 3 * 7, fetched  # statuses per channel, plus one p95 row per channel
    assert len(fetched) == 2
