"""The benchmark workload: organizations of users with preferences, and a mix of events with realistic
fan-out, deterministic per seed.

Fan-out follows the shape of the product's traffic:

* ``approval.requested`` goes to the managers of one organization: the event names the organization
  (``organization_id``, so the catalog's default roles PROPERTY_MGR and ORG_ADMIN apply) or, every
  other one, spells the same audience out (``audience``). Organizations have ``MANAGERS`` managers
  and admins among ``OTHERS_PER_MANAGER`` times as many other members.
* ``chat.message.offline`` goes to the ``CHAT_PARTICIPANTS`` participants of a group conversation, of
  whom about ``PRESENT_SHARE`` are present in it (Ably presence: their push is suppressed).
* bookings, payments, reminders and ``approval.responded`` go to one recipient.

Some users opt out of a channel (globally or for one event type), some are inside quiet hours for the
whole run (a window around the start time, so push and email are deferred, in-app is sent), the rest
take the catalog defaults. All users have an email address, so all three channels are live.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Managers and admins per organization: 2 + floor(14 r^2) for r uniform in [0, 1), so small organizations
# are common and large ones rare (2-15, mean ~6.2, median 5).
MANAGERS = (2, 15)
# Other members (guests, staff, owners) per manager: an organization has 2-4 times its managers as members.
OTHERS_PER_MANAGER = (1, 3)
# Of the managers, ORG_ADMIN alone, both roles, else PROPERTY_MGR.
ADMIN_SHARE, BOTH_SHARE = 0.15, 0.05
OTHER_ROLES = ("GUEST", "STAFF", "OWNER")
AUDIENCE_ROLES = ("PROPERTY_MGR", "ORG_ADMIN")  # the catalog's audience_roles of approval.requested
CHAT_PARTICIPANTS = (2, 10)
PRESENT_SHARE = 0.2

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
class EventSet:
    """Event bodies, and who is present on which Ably channel while they run (``channel -> client ids``)."""

    events: list[dict[str, Any]]
    present: dict[str, list[str]] = field(default_factory=dict)

    def lines(self) -> list[bytes]:
        """Each event as the JSON body the load generator sends."""
        return [json.dumps(e, separators=(",", ":")).encode() for e in self.events]


def quiet_window(now: dt.datetime) -> dict[str, Any]:
    """A quiet-hours window in UTC that contains ``now`` and the next three hours (the whole run)."""
    start = (now - dt.timedelta(hours=1)).strftime("%H:%M")
    end = (now + dt.timedelta(hours=3)).strftime("%H:%M")
    return {"start": start, "end": end, "timezone": "UTC"}


def _preferences(rng: random.Random, quiet: dict[str, Any]) -> dict[str, Any] | None:
    """About 25% opt out of something, 8% are in quiet hours, the rest have no document."""
    roll = rng.random()
    if roll < 0.10:
        return {"channels": {"push": False}}
    if roll < 0.17:
        return {"channels": {"email": False}}
    if roll < 0.25:
        return {"event_types": {"booking.confirmed": {"email": False}, "payment.received": {"push": False}}}
    if roll < 0.33:
        return {"quiet_hours": quiet}
    return None


def _organization_roles(rng: random.Random) -> list[list[str]]:
    """The roles of one organization's members, managers first (so a truncated organization keeps some)."""
    managers = MANAGERS[0] + int((MANAGERS[1] - MANAGERS[0] + 1) * rng.random() ** 2)
    roles = []
    for _ in range(managers):
        roll = rng.random()
        if roll < ADMIN_SHARE:
            roles.append(["ORG_ADMIN"])
        elif roll < ADMIN_SHARE + BOTH_SHARE:
            roles.append(["PROPERTY_MGR", "ORG_ADMIN"])
        else:
            roles.append(["PROPERTY_MGR"])
    others = managers * rng.randint(*OTHERS_PER_MANAGER)
    roles += [[rng.choice(OTHER_ROLES)] for _ in range(others)]
    return roles


def make_users(count: int, *, seed: int, now: dt.datetime) -> list[User]:
    """``count`` users in organizations of ``MANAGERS`` managers and more members (the last one cut at ``count``)."""
    rng = random.Random(seed)
    quiet = quiet_window(now)
    users: list[User] = []
    org = 0
    while len(users) < count:
        for roles in _organization_roles(rng)[: count - len(users)]:
            i = len(users)
            profile = {
                "organization_id": f"bench-org-{org:05d}",
                "roles": roles,
                "email": f"user{i}@bench.example.com",
                "name": f"Bench User {i}",
                "locale": "de" if i % 7 == 0 else "en",
                "timezone": "Europe/Berlin" if i % 3 == 0 else "UTC",
            }
            users.append(User(f"bench-user-{i:06d}", profile, _preferences(rng, quiet)))
        org += 1
    return users


def organizations(users: Sequence[User]) -> dict[str, list[User]]:
    """Members by organization, in user order."""
    out: dict[str, list[User]] = {}
    for user in users:
        out.setdefault(user.profile["organization_id"], []).append(user)
    return out


def _data(event_type: str, n: int, recipients: list[str], conversation: str) -> dict[str, Any]:
    if event_type == "chat.message.offline":
        return {"conversation_id": conversation, "sender_name": "Ann Lee", "preview": f"Message number {n}, see you"}
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


def make_events(count: int, users: Sequence[User], *, seed: int, run_id: str) -> EventSet:
    """``count`` event bodies with unique idempotency keys and conversations (``run_id`` keeps repeated runs apart).

    Approvals go to one of the organizations of ``users``, chats and single recipients are drawn from ``users``.
    """
    rng = random.Random(seed + 1)
    types = [t for t, _ in EVENT_MIX]
    weights = [w for _, w in EVENT_MIX]
    orgs = sorted(organizations(users))
    events: list[dict[str, Any]] = []
    present: dict[str, list[str]] = {}
    approvals = 0
    for n in range(count):
        event_type = rng.choices(types, weights)[0]
        conversation = f"conv-{run_id}-{n}"
        event: dict[str, Any] = {"type": event_type, "idempotency_key": f"{run_id}-{n}", "actor": "bench-actor"}
        recipients: list[str] = []
        if event_type == "approval.requested":
            org = rng.choice(orgs)
            event["organization_id"] = org
            if approvals % 2:  # a producer that spells the default audience out
                event["audience"] = {"organization_id": org, "roles": list(AUDIENCE_ROLES)}
            approvals += 1
        elif event_type == "chat.message.offline":
            k = min(rng.randint(*CHAT_PARTICIPANTS), len(users))
            recipients = [u.id for u in rng.sample(list(users), k)]
            online = [uid for uid in recipients if rng.random() < PRESENT_SHARE]
            if online:
                present[f"chat:{conversation}"] = online
        else:
            recipients = [rng.choice(users).id]
        if recipients:
            event["recipients"] = recipients
        event["data"] = _data(event_type, n, recipients, conversation)
        events.append(event)
    return EventSet(events, present)
