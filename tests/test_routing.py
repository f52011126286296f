"""Routing rules by table: one row per rule of the contract's resolution section (and ours)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import pytest

from notifier.catalog import Catalog, load_catalog
from notifier.preferences.document import PreferenceDocument, parse_document
from notifier.routing import ChannelInfo, Decision, Profile, digest_key_for, group_sends, plan_deliveries
from notifier.types import ChannelName, DeliveryStatus, Reason

CATALOG: Catalog = load_catalog()
NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)  # 13:00 in Berlin
ALL_LIVE = {
    ChannelName.push: ChannelInfo("onesignal"),
    ChannelName.email: ChannelInfo("knock", needs_email=True),
    ChannelName.in_app: ChannelInfo("inbox"),
}
BOOKING = {"booking_id": "b", "guest_name": "Ann", "property": "Sea", "check_in": "2026-12-01"}
PAYMENT = {"payment_id": "p", "amount": "10", "currency": "EUR", "payer_name": "Ann", "failure_reason": "card"}
CHAT = {"conversation_id": "c-1", "sender_name": "Ann", "preview": "hi"}


def doc(**raw: Any) -> PreferenceDocument:
    return parse_document(raw, CATALOG)


@dataclass
class Case:
    name: str
    event_type: str
    channel: ChannelName
    expected: tuple[DeliveryStatus | None, Reason | None]
    user: dict[str, Any] = field(default_factory=dict)
    org: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=lambda: dict(BOOKING))
    email: str | None = "u@example.com"
    timezone: str | None = "Europe/Berlin"
    actor: str | None = None
    live: dict[ChannelName, ChannelInfo] = field(default_factory=lambda: dict(ALL_LIVE))
    present: bool = False
    open_digest: bool = False
    source: str | None = None


CASES = [
    Case(
        "default channel is on", "booking.confirmed", ChannelName.email, (DeliveryStatus.queued, None), source="default"
    ),
    Case("non-default channel is off without a row", "booking.confirmed", ChannelName.push, (None, None)),
    Case(
        "1. global channel switch off",
        "booking.confirmed",
        ChannelName.email,
        (DeliveryStatus.suppressed, Reason.opted_out),
        user={"channels": {"email": False}},
        source="channel",
    ),
    Case(
        "1. global switch beats an event-type opt-in",
        "booking.confirmed",
        ChannelName.push,
        (DeliveryStatus.suppressed, Reason.opted_out),
        user={"channels": {"push": False}, "event_types": {"booking.confirmed": {"push": True}}},
    ),
    Case(
        "2. user event type opts in to an allowed channel",
        "booking.confirmed",
        ChannelName.push,
        (DeliveryStatus.queued, None),
        user={"event_types": {"booking.confirmed": {"push": True}}},
        source="event_type",
    ),
    Case(
        "2. user event type beats user category",
        "booking.confirmed",
        ChannelName.email,
        (DeliveryStatus.queued, None),
        user={"event_types": {"booking.confirmed": {"email": True}}, "categories": {"bookings": {"email": False}}},
        source="event_type",
    ),
    Case(
        "2. user category opts out",
        "booking.confirmed",
        ChannelName.email,
        (DeliveryStatus.suppressed, Reason.opted_out),
        user={"categories": {"bookings": {"email": False}}},
        source="category",
    ),
    Case(
        "2. user category beats organization event type",
        "booking.confirmed",
        ChannelName.email,
        (DeliveryStatus.queued, None),
        user={"categories": {"bookings": {"email": True}}},
        org={"event_types": {"booking.confirmed": {"email": False}}},
        source="category",
    ),
    Case(
        "2. organization event type opts out",
        "booking.confirmed",
        ChannelName.email,
        (DeliveryStatus.suppressed, Reason.opted_out),
        org={"event_types": {"booking.confirmed": {"email": False}}},
        source="organization",
    ),
    Case(
        "2. organization event type beats organization category",
        "booking.confirmed",
        ChannelName.email,
        (DeliveryStatus.queued, None),
        org={"event_types": {"booking.confirmed": {"email": True}}, "categories": {"bookings": {"email": False}}},
        source="organization",
    ),
    Case(
        "2. organization category opts in to an allowed channel",
        "booking.confirmed",
        ChannelName.push,
        (DeliveryStatus.queued, None),
        org={"categories": {"bookings": {"push": True}}},
        source="organization",
    ),
    Case(
        "2. a channel the type does not allow can never be enabled",
        "payment.received",
        ChannelName.in_app,
        (DeliveryStatus.queued, None),
        data=dict(PAYMENT),
    ),  # sanity: in_app IS allowed for payments
    Case(
        "2. unsupported channel stays off even when the category says on",
        "approval.requested",
        ChannelName.email,
        (DeliveryStatus.queued, None),
        data={"approval_id": "a", "title": "t", "requested_by_name": "n"},
        user={"categories": {"approvals": {"email": True}}},
    ),
    Case(
        "3. muted suppresses push",
        "payment.received",
        ChannelName.push,
        (DeliveryStatus.suppressed, Reason.muted),
        user={"muted_until": "2026-11-28T18:00:00Z"},
        data=dict(PAYMENT),
    ),
    Case(
        "3. muted suppresses email",
        "payment.received",
        ChannelName.email,
        (DeliveryStatus.suppressed, Reason.muted),
        user={"muted_until": "2026-11-28T18:00:00Z"},
        data=dict(PAYMENT),
    ),
    Case(
        "3. muted still stores in-app",
        "payment.received",
        ChannelName.in_app,
        (DeliveryStatus.queued, None),
        user={"muted_until": "2026-11-28T18:00:00Z"},
        data=dict(PAYMENT),
    ),
    Case(
        "3. a mute in the past is no mute",
        "payment.received",
        ChannelName.push,
        (DeliveryStatus.queued, None),
        user={"muted_until": "2026-11-28T11:00:00Z"},
        data=dict(PAYMENT),
    ),
    Case(
        "4. quiet hours defer push",
        "payment.received",
        ChannelName.push,
        (DeliveryStatus.deferred, None),
        user={"quiet_hours": {"start": "12:00", "end": "14:00"}},
        data=dict(PAYMENT),
    ),
    Case(
        "4. quiet hours defer email",
        "payment.received",
        ChannelName.email,
        (DeliveryStatus.deferred, None),
        user={"quiet_hours": {"start": "12:00", "end": "14:00"}},
        data=dict(PAYMENT),
    ),
    Case(
        "4. quiet hours leave in-app immediate",
        "payment.received",
        ChannelName.in_app,
        (DeliveryStatus.queued, None),
        user={"quiet_hours": {"start": "12:00", "end": "14:00"}},
        data=dict(PAYMENT),
    ),
    Case(
        "4. outside quiet hours sends now",
        "payment.received",
        ChannelName.push,
        (DeliveryStatus.queued, None),
        user={"quiet_hours": {"start": "22:00", "end": "07:00"}},
        data=dict(PAYMENT),
    ),
    Case(
        "critical ignores the global switch",
        "payment.failed",
        ChannelName.email,
        (DeliveryStatus.queued, None),
        user={"channels": {"email": False}},
        data=dict(PAYMENT),
        source="critical",
    ),
    Case(
        "critical ignores event-type opt-out",
        "payment.failed",
        ChannelName.push,
        (DeliveryStatus.queued, None),
        user={"event_types": {"payment.failed": {"push": False}}},
        data=dict(PAYMENT),
        source="critical",
    ),
    Case(
        "critical ignores mute",
        "payment.failed",
        ChannelName.push,
        (DeliveryStatus.queued, None),
        user={"muted_until": "2026-11-28T18:00:00Z"},
        data=dict(PAYMENT),
    ),
    Case(
        "critical ignores quiet hours",
        "payment.failed",
        ChannelName.email,
        (DeliveryStatus.queued, None),
        user={"quiet_hours": {"start": "12:00", "end": "14:00"}},
        data=dict(PAYMENT),
    ),
    Case(
        "actor is never notified",
        "booking.confirmed",
        ChannelName.email,
        (DeliveryStatus.suppressed, Reason.actor),
        actor="u-1",
    ),
    Case(
        "actor exclusion holds for critical types too",
        "payment.failed",
        ChannelName.email,
        (DeliveryStatus.suppressed, Reason.actor),
        actor="u-1",
        data=dict(PAYMENT),
    ),
    Case(
        "email without an address",
        "booking.confirmed",
        ChannelName.email,
        (DeliveryStatus.suppressed, Reason.no_address),
        email=None,
    ),
    Case(
        "provider not configured",
        "booking.confirmed",
        ChannelName.email,
        (DeliveryStatus.suppressed, Reason.channel_unavailable),
        live={ChannelName.in_app: ChannelInfo("inbox")},
    ),
    Case(
        "chat push skipped while the reader is present",
        "chat.message.offline",
        ChannelName.push,
        (DeliveryStatus.suppressed, Reason.recipient_online),
        data=dict(CHAT),
        present=True,
    ),
    Case(
        "presence does not hold back in-app",
        "chat.message.offline",
        ChannelName.in_app,
        (DeliveryStatus.queued, None),
        data=dict(CHAT),
        present=True,
    ),
    Case(
        "chat push folds into an open digest",
        "chat.message.offline",
        ChannelName.push,
        (DeliveryStatus.suppressed, Reason.digested),
        data=dict(CHAT),
        open_digest=True,
    ),
    Case(
        "in-app is never digested",
        "chat.message.offline",
        ChannelName.in_app,
        (DeliveryStatus.queued, None),
        data=dict(CHAT),
        open_digest=True,
    ),
]


def plan_one(case: Case, now: dt.datetime = NOW, **kwargs: Any) -> Decision:
    event_type = CATALOG.get(case.event_type)
    assert event_type is not None
    profile = Profile(id="u-1", organization_id="org-1", email=case.email, timezone=case.timezone)
    decisions = plan_deliveries(
        event_type=event_type,
        data=case.data,
        recipients=[profile],
        actor=case.actor,
        preferences={"u-1": doc(**case.user)},
        organization_preferences={"org-1": doc(**case.org)} if case.org else {},
        live_channels=case.live,
        now=now,
        present_users={"u-1"} if case.present else set(),
        open_digests={digest_key_for(event_type, "u-1", case.data) or ""} if case.open_digest else set(),
        **kwargs,
    )
    [decision] = [d for d in decisions if d.channel == case.channel]
    return decision


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_resolution_rule(case: Case) -> None:
    decision = plan_one(case)
    assert (decision.status, decision.reason) == case.expected, decision.explanation
    if case.source is not None:
        assert decision.source == case.source


def test_quiet_hours_defer_until_the_window_ends_in_the_users_zone() -> None:
    case = Case(
        "",
        "payment.received",
        ChannelName.push,
        (DeliveryStatus.deferred, None),
        data=dict(PAYMENT),
        user={"quiet_hours": {"start": "12:00", "end": "14:00"}},
    )
    decision = plan_one(case)
    assert decision.not_before == dt.datetime(2026, 11, 28, 13, 0, tzinfo=dt.UTC)  # 14:00 Berlin (UTC+1)


def test_quiet_hours_zone_in_the_document_wins_over_the_profile() -> None:
    case = Case(
        "",
        "payment.received",
        ChannelName.push,
        (DeliveryStatus.deferred, None),
        data=dict(PAYMENT),
        user={"quiet_hours": {"start": "06:00", "end": "08:00", "timezone": "America/New_York"}},
    )
    decision = plan_one(case)  # 07:00 in New York
    assert decision.status == DeliveryStatus.deferred
    assert decision.not_before == dt.datetime(2026, 11, 28, 13, 0, tzinfo=dt.UTC)  # 08:00 EST


def test_send_at_defers_every_channel() -> None:
    case = Case(
        "",
        "reservation.checkin_reminder",
        ChannelName.push,
        (DeliveryStatus.deferred, None),
        data={"reservation_id": "r", "property": "Sea", "check_in": "2026-12-01"},
    )
    send_at = NOW + dt.timedelta(days=2)
    decision = plan_one(case, send_at=send_at)
    assert (decision.status, decision.not_before) == (DeliveryStatus.deferred, send_at)


def test_quiet_hours_apply_at_send_at_not_now() -> None:
    case = Case(
        "",
        "reservation.checkin_reminder",
        ChannelName.push,
        (DeliveryStatus.deferred, None),
        data={"reservation_id": "r", "property": "Sea", "check_in": "2026-12-01"},
        user={"quiet_hours": {"start": "22:00", "end": "07:00"}},
    )
    send_at = dt.datetime(2026, 11, 30, 22, 30, tzinfo=dt.UTC)  # 23:30 Berlin: inside the window
    decision = plan_one(case, send_at=send_at)
    assert decision.not_before == dt.datetime(2026, 12, 1, 6, 0, tzinfo=dt.UTC)  # 07:00 Berlin next morning


def test_digest_head_waits_for_the_window() -> None:
    case = Case("", "chat.message.offline", ChannelName.push, (DeliveryStatus.deferred, None), data=dict(CHAT))
    decision = plan_one(case, digest_window=dt.timedelta(seconds=60))
    assert decision.status == DeliveryStatus.deferred
    assert decision.not_before == NOW + dt.timedelta(seconds=60)
    assert decision.digest_key == "chat.message.offline:003:u-1:c-1"


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (("tenant:1", "general"), ("tenant", "1:general")),
        (("a:b", "c:d"), ("a", "b:c:d")),
        (("a", "b"), ("a:b", "")),
    ],
)
def test_digest_keys_of_different_users_never_collide(one: tuple[str, str], other: tuple[str, str]) -> None:
    # Ids and conversation ids may both contain ":": one user's messages must not fold into another's digest.
    chat = CATALOG.get("chat.message.offline")
    assert chat is not None
    keys = [
        digest_key_for(chat, user, {**CHAT, "conversation_id": conversation}) for user, conversation in (one, other)
    ]
    assert keys[0] != keys[1]


def test_fallback_plans_an_also_allowed_channel_as_if_it_were_default() -> None:
    case = Case("", "chat.message.offline", ChannelName.email, (DeliveryStatus.queued, None), data=dict(CHAT))
    assert plan_one(case).status is None  # email is not a default channel of chat messages
    event_type = CATALOG.get("chat.message.offline")
    assert event_type is not None
    [decision] = plan_deliveries(
        event_type=event_type,
        data=CHAT,
        recipients=[Profile(id="u-1", email="u@example.com")],
        actor=None,
        preferences={},
        organization_preferences={},
        live_channels=ALL_LIVE,
        now=NOW,
        channels=[ChannelName.email],
        fallback_for=ChannelName.push,
    )
    assert decision.status == DeliveryStatus.queued


def test_fallback_still_respects_an_explicit_opt_out() -> None:
    event_type = CATALOG.get("chat.message.offline")
    assert event_type is not None
    [decision] = plan_deliveries(
        event_type=event_type,
        data=CHAT,
        recipients=[Profile(id="u-1", email="u@example.com")],
        actor=None,
        preferences={"u-1": doc(categories={"chat": {"email": False}})},
        organization_preferences={},
        live_channels=ALL_LIVE,
        now=NOW,
        channels=[ChannelName.email],
        fallback_for=ChannelName.push,
    )
    assert (decision.status, decision.reason) == (DeliveryStatus.suppressed, Reason.opted_out)


def test_every_recipient_gets_a_decision_per_channel_in_order() -> None:
    event_type = CATALOG.get("booking.confirmed")
    assert event_type is not None
    decisions = plan_deliveries(
        event_type=event_type,
        data=BOOKING,
        recipients=[Profile(id="a"), Profile(id="b")],
        actor=None,
        preferences={},
        organization_preferences={},
        live_channels=ALL_LIVE,
        now=NOW,
    )
    assert [(d.user_id, d.channel) for d in decisions] == [
        (u, c) for u in ("a", "b") for c in (ChannelName.push, ChannelName.email, ChannelName.in_app)
    ]


# --- send groups: which of one event's deliveries share a provider call ----------------------------------------

GROUPABLE = {
    ChannelName.push: ChannelInfo("onesignal", group_limit=2000),
    ChannelName.email: ChannelInfo("knock", needs_email=True, group_limit=3),
    ChannelName.in_app: ChannelInfo("inbox", group_limit=1000),
}
LATER = NOW + dt.timedelta(hours=1)


def decision(
    user: str, channel: ChannelName, status: DeliveryStatus | None = DeliveryStatus.queued, **kw: Any
) -> Decision:
    return Decision(user, channel, status, kw.get("reason"), kw.get("not_before"), "default", "", "p", kw.get("digest"))


@dataclass
class GroupCase:
    name: str
    decisions: list[Decision]
    expected: list[list[int]]  # the groups, as indexes into ``decisions``
    locales: dict[str, str | None] = field(default_factory=dict)
    live: dict[ChannelName, ChannelInfo] = field(default_factory=lambda: dict(GROUPABLE))
    event_type: str = "payment.received"


GROUP_CASES = [
    GroupCase("one recipient goes alone", [decision("a", ChannelName.push)], []),
    GroupCase(
        "same channel, same template: one group",
        [decision("a", ChannelName.push), decision("b", ChannelName.push), decision("c", ChannelName.push)],
        [[0, 1, 2]],
    ),
    GroupCase(
        "one group per channel",
        [decision(u, c) for u in "ab" for c in (ChannelName.push, ChannelName.in_app)],
        [[0, 2], [1, 3]],
    ),
    GroupCase(
        "another template (German) is another group; a locale without one (fr) shares English",
        [decision(u, ChannelName.push) for u in ("en", "de1", "fr", "de2")],
        [[0, 2], [1, 3]],
        locales={"en": "en", "de1": "de", "fr": "fr", "de2": "de-AT"},
    ),
    GroupCase(
        "a later due time (quiet hours, send_at) is another group",
        [
            decision("a", ChannelName.push),
            decision("b", ChannelName.push, DeliveryStatus.deferred, not_before=LATER),
            decision("c", ChannelName.push),
            decision("d", ChannelName.push, DeliveryStatus.deferred, not_before=LATER),
        ],
        [[0, 2], [1, 3]],
    ),
    GroupCase(
        "suppressed deliveries and rows not created are in no group",
        [
            decision("a", ChannelName.push),
            decision("b", ChannelName.push, DeliveryStatus.suppressed, reason=Reason.opted_out),
            decision("c", ChannelName.push, None),
            decision("d", ChannelName.push),
        ],
        [[0, 3]],
    ),
    GroupCase(
        "digest deliveries go alone (each counts its own folded messages)",
        [decision(u, ChannelName.push, digest=f"chat:{u}:c-1") for u in "ab"],
        [],
        event_type="chat.message.offline",
    ),
    GroupCase(
        "the channel's limit splits a group; a remainder of one goes alone",
        [decision(u, ChannelName.email) for u in "abcdefg"],
        [[0, 1, 2], [3, 4, 5]],
    ),
    GroupCase(
        "a provider taking one recipient per call groups nothing",
        [decision(u, ChannelName.push) for u in "ab"],
        [],
        live={ChannelName.push: ChannelInfo("onesignal")},
    ),
]


@pytest.mark.parametrize("case", GROUP_CASES, ids=lambda case: case.name)
def test_send_groups(case: GroupCase) -> None:
    event_type = CATALOG.types[case.event_type]
    groups = group_sends(case.decisions, event_type=event_type, locales=case.locales, live_channels=case.live)
    assert groups == case.expected


def test_quiet_hours_hold_through_the_repeated_hour_of_the_fall_back_night() -> None:
    # 06:15Z on 1 November 2026 is 01:15 EST, the second 01:15 of the night in New York: inside 22:00-01:30.
    case = Case(
        "",
        "payment.received",
        ChannelName.push,
        (DeliveryStatus.deferred, None),
        data=dict(PAYMENT),
        user={"quiet_hours": {"start": "22:00", "end": "01:30", "timezone": "America/New_York"}},
    )
    now = dt.datetime(2026, 11, 1, 6, 15, tzinfo=dt.UTC)
    decision = plan_one(case, now=now)
    assert (decision.status, decision.not_before) == (
        DeliveryStatus.deferred,
        dt.datetime(2026, 11, 1, 6, 30, tzinfo=dt.UTC),
    )
