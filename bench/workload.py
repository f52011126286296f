"""The benchmark workload: users, their preferences and a mix of events, deterministic per seed.

Every event type of the built-in catalog is used, each with 1-5 explicit recipients. Some users
opt out of a channel (globally or for one event type), some are inside quiet hours for the whole
run (a window around the start time, so push and email are deferred, in-app is sent), the rest
take the catalog defaults. All users have an email address, so all three channels are live.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from dataclasses import dataclass, field
from typing import Any

ORG_SIZE = 5
ROLES = ("PROPERTY_MGR", "ORG_ADMIN", "GUEST")

# (event type, weight): chat and bookings are the bulk of real traffic, reminders and approvals less.
EVENT_MIX: tuple[tuple[str, int], ...] = (
    ("chat.message.offline", 25),
    ("booking.confirmed", 20),
    ("approval.requested", 10),
    ("approval.responded", 10),
    ("payment.received", 15),
    ("payment.failed", 5),
    ("reservation.checkin_reminder", 8),
    ("reservation.checkout_reminder", 7),
)


@dataclass(frozen=True)
class User:
    id: str
    profile: dict[str, Any]
    preferences: dict[str, Any] | None  # None: catalog defaults, no document stored


@dataclass
class Workload:
    users: list[User]
    events: list[dict[str, Any]] = field(default_factory=list)

    def event_lines(self) -> list[bytes]:
        """Each event as the JSON body the load generator sends."""
        return [json.dumps(e, separators=(",", ":")).encode() for e in self.events]


def quiet_window(now: dt.datetime) -> dict[str, Any]:
    """A quiet-hours window in UTC that contains ``now`` and the next three hours (the whole run)."""
    start = (now - dt.timedelta(hours=1)).strftime("%H:%M")
    end = (now + dt.timedelta(hours=3)).strftime("%H:%M")
    return {"start": start, "end": end, "timezone": "UTC"}


def make_users(count: int, *, seed: int, now: dt.datetime) -> list[User]:
    """``count`` users in organizations of five; about 25% opt out of something, 8% are in quiet hours."""
    rng = random.Random(seed)
    users = []
    quiet = quiet_window(now)
    for i in range(count):
        uid = f"bench-user-{i:06d}"
        profile = {
            "organization_id": f"bench-org-{i // ORG_SIZE:05d}",
            "roles": [rng.choice(ROLES)],
            "email": f"user{i}@bench.example.com",
            "name": f"Bench User {i}",
            "locale": "de" if i % 7 == 0 else "en",
            "timezone": "Europe/Berlin" if i % 3 == 0 else "UTC",
        }
        roll = rng.random()
        prefs: dict[str, Any] | None = None
        if roll < 0.10:
            prefs = {"channels": {"push": False}}
        elif roll < 0.17:
            prefs = {"channels": {"email": False}}
        elif roll < 0.25:
            prefs = {"event_types": {"booking.confirmed": {"email": False}, "payment.received": {"push": False}}}
        elif roll < 0.33:
            prefs = {"quiet_hours": quiet}
        users.append(User(uid, profile, prefs))
    return users


def _data(event_type: str, n: int, recipients: list[str]) -> dict[str, Any]:
    if event_type == "chat.message.offline":
        # A conversation per event: no digest folding, so every planned push is sent.
        return {"conversation_id": f"conv-{n}", "sender_name": "Ann Lee", "preview": f"Message number {n}, see you"}
    if event_type == "booking.confirmed":
        return {"booking_id": f"b-{n}", "guest_name": "Ann Lee", "property": "Seaview 4", "check_in": "2026-12-01"}
    if event_type == "approval.requested":
        return {"approval_id": f"a-{n}", "title": f"Invoice {n}", "requested_by_name": "Bob Stone"}
    if event_type == "approval.responded":
        return {"approval_id": f"a-{n}", "title": f"Invoice {n}", "decision": "approved", "requester_id": recipients[0]}
    if event_type == "payment.received":
        return {"payment_id": f"p-{n}", "amount": "120.00", "currency": "EUR", "payer_name": "Ann Lee"}
    if event_type == "payment.failed":
        return {"payment_id": f"p-{n}", "amount": "120.00", "currency": "EUR", "failure_reason": "card declined"}
    if event_type == "reservation.checkin_reminder":
        return {"reservation_id": f"r-{n}", "property": "Seaview 4", "check_in": "2026-12-01"}
    return {"reservation_id": f"r-{n}", "property": "Seaview 4", "check_out": "2026-12-08"}


def make_events(
    count: int, users: list[User], *, seed: int, run_id: str, min_recipients: int = 1, max_recipients: int = 5
) -> list[dict[str, Any]]:
    """``count`` event bodies with unique idempotency keys (``run_id`` keeps repeated runs apart)."""
    rng = random.Random(seed + 1)
    types = [t for t, _ in EVENT_MIX]
    weights = [w for _, w in EVENT_MIX]
    events = []
    for n in range(count):
        event_type = rng.choices(types, weights)[0]
        k = rng.randint(min_recipients, max_recipients)
        recipients = [u.id for u in rng.sample(users, k)]
        events.append(
            {
                "type": event_type,
                "idempotency_key": f"{run_id}-{n}",
                "recipients": recipients,
                "actor": "bench-actor",
                "data": _data(event_type, n, recipients),
            }
        )
    return events
