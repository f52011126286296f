"""Provider dedupe windows against notifier's retry schedule.

Every attempt of a delivery carries the same idempotency key, but a provider remembers it only so
long: OneSignal 30 days, Knock 24 hours, Ably 2 minutes. QStash's default schedule (12 s, 2m28s,
30 min, 6.1 h, 1 day) would put Ably's second retry and Knock's fifth past those windows, so after
an attempt whose outcome was unknown (the provider acted, the reply was lost) a late retry would
create a second notification. ``retry_delay`` brings such a retry forward to land just inside the
window where it can; past that, the retry goes out anyway with the same key (at least once).

The schedule is tested by table as a pure function. End to end, the real service (PostgreSQL, no
dispatcher of its own) is driven one attempt at a time, as QStash would, through the real channels
and SDKs against the loopback fakes; between attempts the test travels forward by the delay the
service asked for: the delivery's timestamps move back, the fakes' clocks move forward.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import col

from notifier.channels.ably import AblyRealtime
from notifier.channels.knock import KnockEmail
from notifier.channels.onesignal import OneSignalPush
from notifier.db.models import Delivery, DeliveryAttempt, DeliveryTransition, InboxMessage
from notifier.delivery.outcomes import AttemptReport
from notifier.delivery.retry import backoff_seconds, retry_delay
from tests.conftest import Service, make_settings, running_service
from tests.fakes.ably import AblyFake, ably_error
from tests.fakes.base import FakeProvider, Fault, make_self_signed_cert
from tests.fakes.knock import KnockFake
from tests.reliability.faults import Late, Script, ably_key_of, in_front_of, knock_key_of
from tests.reliability.ledger import payment_event

T0 = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)
HOUR, DAY = 3600.0, 86400.0
UNCAPPED = [12, 161, 1969, 23995, 110395]  # when QStash's default schedule lands each retry (s after the first attempt)


def landings(window: dt.timedelta | None, *, retries: int = 5) -> list[int]:
    """When each retry lands, in seconds after the first attempt (attempts themselves taking no time)."""
    elapsed, landed = 0.0, []
    for n in range(1, retries + 1):
        delay, _ = retry_delay(n, window=window, since=T0, now=T0 + dt.timedelta(seconds=elapsed))
        elapsed += delay
        landed.append(round(elapsed))
    return landed


# --- the schedule, by table -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        # Knock: the 5th retry would land at 30.7 h; it lands at 23 h (24 h less the 1 h margin) instead.
        pytest.param(KnockEmail.dedupe_window, [12, 161, 1969, 23995, 23 * 3600], id="knock-24h"),
        # Ably: the 2nd retry would land at 2m41s; it lands at 90 s (2 min less 30 s). The 3rd cannot
        # be kept inside (the window is over), so from there on the schedule stands.
        pytest.param(AblyRealtime.dedupe_window, [12, 90, 1898, 23925, 110325], id="ably-2min"),
        pytest.param(OneSignalPush.dedupe_window, UNCAPPED, id="onesignal-30d"),  # the schedule fits
        pytest.param(None, UNCAPPED, id="no-window"),  # SMTP, or the inbox without Ably
    ],
)
def test_the_schedule_keeps_retries_inside_the_window_where_it_can(
    window: dt.timedelta | None, expected: list[int]
) -> None:
    assert landings(window) == expected


def test_a_kept_retry_says_so() -> None:
    delay, note = retry_delay(5, window=KnockEmail.dedupe_window, since=T0, now=T0 + dt.timedelta(seconds=23995))
    assert round(delay) == 58805
    assert note == "retry in 16h20m, not 1d: kept inside the provider's 1d dedupe window"
    assert retry_delay(1, window=KnockEmail.dedupe_window, since=T0, now=T0) == (backoff_seconds(1), None)


@pytest.mark.parametrize(
    ("retries_so_far", "elapsed", "window", "retry_after", "expected"),
    [
        # The provider's Retry-After is what it asked for: never shortened, even past the window.
        (2, 12, AblyRealtime.dedupe_window, 300.0, 300.0),
        # Too little of the window left for a step of backoff (under the previous delay): the schedule stands.
        (2, 80, AblyRealtime.dedupe_window, None, backoff_seconds(2)),
        (5, 20 * HOUR, KnockEmail.dedupe_window, None, DAY),
        # The window (less its margin) is over: the schedule stands, the retry goes out with the same key.
        (3, 100, AblyRealtime.dedupe_window, None, backoff_seconds(3)),
        (6, 23 * HOUR, KnockEmail.dedupe_window, None, DAY),
        # Just enough left for a step of backoff: kept, landing at 90 s.
        (2, 77, AblyRealtime.dedupe_window, None, 13.0),
    ],
)
def test_when_the_window_shortens_a_retry(
    retries_so_far: int, elapsed: float, window: dt.timedelta, retry_after: float | None, expected: float
) -> None:
    now = T0 + dt.timedelta(seconds=elapsed)
    delay, _ = retry_delay(retries_so_far, window=window, retry_after=retry_after, since=T0, now=now)
    assert delay == pytest.approx(expected)


def test_a_compressed_schedule_is_never_shortened() -> None:
    # The test suites' retry_backoff_scale: delays of milliseconds fit any window.
    for n in range(1, 6):
        delay, note = retry_delay(n, scale=0.0002, window=AblyRealtime.dedupe_window, since=T0, now=T0)
        assert (delay, note) == (backoff_seconds(n, scale=0.0002), None)


# --- end to end -------------------------------------------------------------------------------------------


def scripted(*plan: Fault | Late | None) -> Script:
    """A per-key script: the n-th request for a key gets ``plan[n - 1]``; requests past the plan pass."""

    def script(key: str, n: int) -> Fault | Late | None:
        return plan[n - 1] if n <= len(plan) else None

    return script


async def travel(svc: Service, delivery_id: uuid.UUID, seconds: float, fakes: Sequence[FakeProvider]) -> None:
    """Let ``seconds`` pass for the delivery (its timestamps move back) and for the providers (their clocks on)."""
    shift = dt.timedelta(seconds=seconds)
    async with svc.runtime.sessions() as session, session.begin():
        delivery = await session.get_one(Delivery, delivery_id)
        delivery.created_at -= shift
        delivery.updated_at -= shift
        if delivery.not_before is not None:
            delivery.not_before -= shift
        attempts = await session.execute(
            sa.select(DeliveryAttempt).where(col(DeliveryAttempt.delivery_id) == delivery_id)
        )
        for attempt in attempts.scalars():
            attempt.started_at -= shift
            attempt.finished_at = attempt.finished_at - shift if attempt.finished_at else None
        moves = await session.execute(
            sa.select(DeliveryTransition).where(col(DeliveryTransition.delivery_id) == delivery_id)
        )
        for move in moves.scalars():
            move.at -= shift
    for fake in fakes:
        fake.advance(seconds)


async def attempt_until_done(
    svc: Service, delivery_id: uuid.UUID, fakes: Sequence[FakeProvider]
) -> list[AttemptReport]:
    """Attempt the delivery as QStash would: again after each retry's delay, until it is not a retry."""
    reports: list[AttemptReport] = []
    while len(reports) < 10:
        [report] = await svc.runtime.runner.attempt(delivery_id, via="qstash")  # a single recipient: alone
        reports.append(report)
        if report.kind != "retry":
            return reports
        assert report.retry_after is not None
        await travel(svc, delivery_id, report.retry_after, fakes)
    raise AssertionError(f"still retrying after {len(reports)} attempts: {[r.detail for r in reports]}")


async def post_payment(svc: Service, channel: str) -> uuid.UUID:
    response = await svc.post_event(payment_event(f"pay-{uuid.uuid4().hex[:8]}", "u-1"))
    assert response.status_code == 202, response.text
    [delivery] = [d for d in response.json()["deliveries"] if d["channel"] == channel]
    return uuid.UUID(delivery["id"])


async def notes_of(svc: Service, delivery_id: uuid.UUID) -> list[str]:
    async with svc.runtime.sessions() as session:
        rows = await session.execute(
            sa.select(DeliveryTransition.note)
            .where(col(DeliveryTransition.delivery_id) == delivery_id, col(DeliveryTransition.to_status) == "queued")
            .order_by(col(DeliveryTransition.at))
        )
        return [note for note in rows.scalars() if note]


def landed(reports: Sequence[AttemptReport]) -> list[int]:
    """When each retry was asked for, in seconds after the first attempt (attempts themselves took well under 2 s)."""
    elapsed, times = 0.0, []
    for report in reports:
        if report.retry_after is not None:
            elapsed += report.retry_after
            times.append(round(elapsed))
    return times


async def test_knock_reply_lost_then_four_503s_still_makes_one_email(postgres_url: str, knock_fake: KnockFake) -> None:
    # Attempt 1: Knock starts the run, the reply is lost (timeout). Attempts 2-5: 503. Attempt 6 goes through,
    # 16h20m after the 5th instead of a day later (30.7 h in all): inside Knock's 24 h, so the key is replayed.
    script = scripted(Late(1.5), *[Fault.http(503)] * 4)
    with in_front_of(knock_fake.app, knock_key_of, script) as (url, faults):
        settings = make_settings(
            postgres_url,
            embedded_dispatcher=False,
            retry_backoff_scale=1.0,
            max_retries=5,
            provider_timeout_seconds=0.5,
            knock_api_key=knock_fake.api_key,
            knock_base_url=url,
        )
        async with running_service(settings) as svc:
            delivery_id = await post_payment(svc, "email")
            reports = await attempt_until_done(svc, delivery_id, [knock_fake])
            notes = await notes_of(svc, delivery_id)
    assert [r.kind for r in reports] == ["retry"] * 5 + ["sent"]
    assert faults.seen[str(delivery_id)] == 6
    # One email: the 6th request came inside 24 h and was answered from Knock's key store.
    assert [t.idempotency_key for t in knock_fake.triggers] == [str(delivery_id)]
    assert landed(reports)[-1] < DAY  # the schedule alone: 30.7 h
    # The 5th retry's transition says why it came early, then what Knock said.
    assert notes[-1].startswith(
        "retry in 16h20m, not 1d: kept inside the provider's 1d dedupe window; knock answered 503"
    )
    assert not any("dedupe window" in note for note in notes[:-1])


@pytest.mark.parametrize(
    ("outage", "announcements"),
    [
        # Reply lost, one 503, then through on the 3rd attempt: kept at 90 s, inside Ably's 2 minutes.
        pytest.param(1, 1, id="inside-the-window"),
        # Reply lost, two 503s: the 3rd retry cannot be kept inside (the window is over), so Ably announces
        # the item again under the same message id. The honest boundary: the inbox still holds one row,
        # and a client that remembers message ids (= delivery ids) can drop the repeat.
        pytest.param(2, 2, id="past-the-window"),
    ],
)
async def test_in_app_reply_lost_on_the_announcement(
    postgres_url: str,
    ably_fake: AblyFake,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    outage: int,
    announcements: int,
) -> None:
    tls = make_self_signed_cert(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))
    script = scripted(Late(1.5), *[ably_error(503, 50300)] * outage)
    with in_front_of(ably_fake.app, ably_key_of, script, tls=tls) as (url, _):
        settings = make_settings(
            postgres_url,
            embedded_dispatcher=False,
            retry_backoff_scale=1.0,
            provider_timeout_seconds=0.5,
            ably_api_key=ably_fake.api_key,
            ably_rest_url=url,
        )
        async with running_service(settings) as svc:
            delivery_id = await post_payment(svc, "in_app")
            reports = await attempt_until_done(svc, delivery_id, [ably_fake])
            async with svc.runtime.sessions() as session:
                inbox = (await session.execute(sa.select(InboxMessage))).scalars().all()
    assert [r.kind for r in reports] == ["retry"] * (1 + outage) + ["sent"]
    assert [m.id for m in ably_fake.messages("notifications:u-1")] == [str(delivery_id)] * announcements
    assert [m.delivery_id for m in inbox] == [delivery_id]
    assert landed(reports)[1] <= 90  # the 2nd retry: 2m41s on the schedule alone
