"""Accepting an event: validate → resolve audience → store it (its key dedupes) → load → plan → store
its deliveries, in one transaction.

The dispatcher hears about the new deliveries only after the transaction commits (outbox).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import sqlalchemy as sa
from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from sqlalchemy.ext.asyncio import AsyncSession

from notifier import store
from notifier.catalog import EventType
from notifier.channels.base import PresenceUnavailable
from notifier.dispatch.base import DispatchItem
from notifier.errors import FieldError, IdempotencyConflict, TemplateError, ValidationFailed
from notifier.models import Delivery, Event, utcnow
from notifier.preferences.document import is_timezone
from notifier.routing import Decision, Profile, digest_key_for, plan_deliveries, presence_channel_for
from notifier.runtime import Runtime
from notifier.types import DISPATCHABLE_STATUSES
from notifier.validation import parse_model

_EMAIL = re.compile(r"^[^@\s<>\"',;]+@[^@\s<>\"',;]+\.[^@\s<>\"',;]+$")
MAX_RECIPIENTS = 1000


def _email(value: str | None) -> str | None:
    if value is not None and not _EMAIL.match(value):
        raise ValueError("not a valid email address")
    return value


def _zone(value: str | None) -> str | None:
    if value is not None and not is_timezone(value):
        raise ValueError(f"unknown time zone '{value}'")
    return value


Id = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
Text = Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]


class ProfileIn(BaseModel):
    """Profile fields a producer may set (``PUT /v1/users/{id}`` and inline recipients)."""

    model_config = ConfigDict(extra="forbid")

    organization_id: Id | None = None
    roles: list[Annotated[str, StringConstraints(min_length=1, max_length=100)]] | None = Field(None, max_length=50)
    email: Annotated[str | None, AfterValidator(_email)] = Field(None, max_length=320)
    name: Text | None = None
    locale: Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")] | None = None
    timezone: Annotated[str | None, AfterValidator(_zone)] = None


class RecipientIn(ProfileIn):
    id: Id


def _recipient_object(value: Any) -> Any:
    # A bare string is shorthand for {"id": ...}; one shape keeps error locations simple.
    return {"id": value} if isinstance(value, str) else value


class AudienceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    organization_id: Id
    roles: list[Annotated[str, StringConstraints(min_length=1, max_length=100)]] = Field(default_factory=list)


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=300)] | None = None
    recipients: list[Annotated[RecipientIn, BeforeValidator(_recipient_object)]] = Field(
        default_factory=list, max_length=MAX_RECIPIENTS
    )
    audience: AudienceIn | None = None
    actor: Id | None = None
    organization_id: Id | None = None
    data: dict[str, Any]
    send_at: AwareDatetime | None = None


@dataclass
class Accepted:
    """The result of accepting (or recognising a repeat of) an event."""

    event_id: uuid.UUID
    duplicate: bool
    deliveries: list[dict[str, Any]]
    dispatch: list[DispatchItem] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return {"event_id": str(self.event_id), "duplicate": self.duplicate, "deliveries": self.deliveries}


def body_hash(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def delivery_public(delivery: Delivery) -> dict[str, Any]:
    return _public(
        delivery.id, delivery.user_id, delivery.channel, delivery.status, delivery.reason, delivery.not_before
    )


def _public(
    delivery_id: uuid.UUID,
    user_id: str,
    channel: str,
    status: str,
    reason: str | None,
    not_before: dt.datetime | None,
) -> dict[str, Any]:
    return {
        "id": str(delivery_id),
        "user_id": user_id,
        "channel": channel,
        "status": status,
        "reason": reason,
        "not_before": not_before.isoformat() if not_before else None,
    }


def validate_event(runtime: Runtime, raw: Any) -> tuple[EventIn, EventType]:
    """Parse and check an event body against the catalog; raise ``ValidationFailed`` listing every problem."""
    event = parse_model(EventIn, raw)
    event_type = runtime.catalog.get(event.type)
    if event_type is None:
        known = ", ".join(sorted(runtime.catalog.types))
        raise ValidationFailed([FieldError(("type",), f"unknown event type '{event.type}' (known: {known})")])
    errors = event_type.validate_data(event.data)
    if not event.recipients and event.audience is None and not _implicit_audience(event, event_type):
        errors.append(FieldError(("recipients",), "recipients and/or audience required"))
    if not errors:
        errors.extend(_check_templates(event_type, event.data, _locales(event)))
    if errors:
        raise ValidationFailed(errors)
    return event, event_type


def _implicit_audience(event: EventIn, event_type: EventType) -> bool:
    if event_type.recipient_field and event.data.get(event_type.recipient_field):
        return True
    return bool(event_type.audience_roles and event.organization_id)


def _locales(event: EventIn) -> set[str | None]:
    return {None} | {r.locale for r in event.recipients if r.locale}


def _check_templates(event_type: EventType, data: Mapping[str, Any], locales: set[str | None]) -> list[FieldError]:
    # Render what the type may send, so a missing variable is a 422 now, never a half-rendered message later.
    try:
        event_type.check_templates(data, sorted(locales, key=lambda locale: locale or ""))
    except TemplateError as exc:
        return [FieldError(("data",), exc.detail)]
    return []


async def _resolve_recipients(
    session: AsyncSession, event: EventIn, event_type: EventType
) -> tuple[list[str], list[dict[str, Any]]]:
    """Return (recipient ids in order, inline profiles to upsert)."""
    ids: list[str] = []
    inline: list[dict[str, Any]] = []
    for recipient in event.recipients:
        ids.append(recipient.id)
        fields = recipient.model_dump(exclude_unset=True)
        if len(fields) > 1:
            inline.append(fields)
    if event_type.recipient_field and not event.recipients and event.audience is None:
        ids.append(str(event.data[event_type.recipient_field]))
    audience = event.audience
    if audience is None and not event.recipients and event_type.audience_roles and event.organization_id:
        audience = AudienceIn(organization_id=event.organization_id, roles=list(event_type.audience_roles))
    if audience is not None:
        members = await store.users_with_roles(session, organization_id=audience.organization_id, roles=audience.roles)
        ids.extend(user.id for user in members)
    return list(dict.fromkeys(ids)), inline


async def _present_users(runtime: Runtime, event_type: EventType, data: Mapping[str, Any]) -> frozenset[str]:
    channel_name = presence_channel_for(event_type, data)
    if channel_name is None or runtime.presence is None:
        return frozenset()
    try:
        return await runtime.presence.present_members(channel_name)
    except PresenceUnavailable:
        return frozenset()  # unknown presence: better to notify than to stay silent


async def _plan(
    runtime: Runtime,
    session: AsyncSession,
    *,
    event: EventIn,
    event_type: EventType,
    ids: Sequence[str],
    inline: Sequence[Mapping[str, Any]],
    write: bool,
    present: frozenset[str],
    now: dt.datetime,
) -> list[Decision]:
    """Load (and, when ``write``, create or update) the recipients, then plan every (recipient, channel)."""
    profiles, stored = await _profiles(runtime, session, event, ids, inline, write=write, now=now)
    catalog = runtime.catalog
    organization_preferences = dict(stored.organization_preferences)
    # Organizations the recipients query could not look up: new users' (the event's) and preview overlays'.
    applied = {org for p in profiles if (org := p.organization_id or event.organization_id)}
    if unchecked := applied - stored.checked_organizations:
        organization_preferences.update(
            await store.load_organization_preferences(session, organization_ids=sorted(unchecked), catalog=catalog)
        )
    digest_keys = [k for k in (digest_key_for(event_type, p.id, event.data) for p in profiles) if k]
    return plan_deliveries(
        event_type=event_type,
        data=event.data,
        recipients=profiles,
        actor=event.actor,
        preferences=stored.preferences,
        organization_preferences=organization_preferences,
        live_channels=runtime.channels.live,
        now=now,
        send_at=event.send_at,
        present_users=present,
        open_digests=await store.open_digest_heads(session, digest_keys=digest_keys),
        digest_window=dt.timedelta(seconds=runtime.settings.chat_digest_seconds),
        event_organization_id=event.organization_id,
    )


async def _write_users(
    session: AsyncSession, ids: Sequence[str], inline: Sequence[Mapping[str, Any]], *, now: dt.datetime
) -> None:
    """Upsert the inline profiles and create bare rows for the other ids, in one pass in id order.

    Concurrent events naming the same users then lock their rows in the same order; in recipient
    order (or inline profiles first) PostgreSQL deadlocks them and one of the requests fails.
    """
    by_id: dict[str, list[Mapping[str, Any]]] = {}
    for profile in inline:
        by_id.setdefault(profile["id"], []).append(profile)
    bare: list[str] = []
    profiles: list[Mapping[str, Any]] = []
    for user_id in sorted({*ids, *by_id}):
        if user_id in by_id:
            if bare:
                await store.ensure_users(session, user_ids=bare, now=now)
                bare = []
            profiles.extend(by_id[user_id])
        else:
            if profiles:
                await store.upsert_users(session, profiles=profiles, now=now)
                profiles = []
            bare.append(user_id)
    if bare:
        await store.ensure_users(session, user_ids=bare, now=now)
    if profiles:
        await store.upsert_users(session, profiles=profiles, now=now)


async def _profiles(
    runtime: Runtime,
    session: AsyncSession,
    event: EventIn,
    ids: Sequence[str],
    inline: Sequence[Mapping[str, Any]],
    *,
    write: bool,
    now: dt.datetime,
) -> tuple[list[Profile], store.StoredRecipients]:
    """Return the recipients' profiles (creating or updating users when ``write``) and what is stored about them."""
    if write and inline:
        await _write_users(session, ids, inline, now=now)
    stored = await store.load_recipients(
        session, user_ids=ids, event_organization_id=event.organization_id, catalog=runtime.catalog
    )
    if write and not inline:
        # Without inline profiles only users never seen before need a row: usually none, so no statement.
        await store.ensure_users(session, user_ids=[uid for uid in ids if uid not in stored.profiles], now=now)
    overlay = {p["id"]: p for p in inline} if not write else {}
    profiles = []
    for uid in ids:
        base = stored.profiles.get(uid) or Profile(id=uid)
        extra = {
            k: v for k, v in overlay.get(uid, {}).items() if k in ("organization_id", "email", "locale", "timezone")
        }
        profiles.append(Profile(**{**base.__dict__, **extra}) if extra else base)
    return profiles, stored


async def preview_event(runtime: Runtime, raw: Any) -> dict[str, Any]:
    """Plan the event without storing or sending anything; explain every (recipient, channel)."""
    event, event_type = validate_event(runtime, raw)
    present = await _present_users(runtime, event_type, event.data)
    now = utcnow()
    async with runtime.sessions() as session:
        ids, inline = await _resolve_recipients(session, event, event_type)
        decisions = await _plan(
            runtime,
            session,
            event=event,
            event_type=event_type,
            ids=ids,
            inline=inline,
            write=False,
            present=present,
            now=now,
        )
    return {
        "type": event.type,
        "recipients": ids,
        "plan": [
            {
                "user_id": d.user_id,
                "channel": str(d.channel),
                "status": str(d.status) if d.status else "none",
                "reason": str(d.reason) if d.reason else None,
                "not_before": d.not_before.isoformat() if d.not_before else None,
                "source": d.source,
                "explanation": d.explanation,
            }
            for d in decisions
        ],
    }


async def accept_event(
    runtime: Runtime, raw: Any, *, source: str = "api", source_message_id: str | None = None
) -> Accepted:
    """Store the event and its deliveries once; a repeat returns the original result with ``duplicate``."""
    if not isinstance(raw, Mapping):
        raise ValidationFailed([FieldError((), "the body must be a JSON object")])
    event, event_type = validate_event(runtime, raw)
    key = event.idempotency_key or (f"qstash:{source_message_id}" if source_message_id else None)
    digest = body_hash(raw)
    present = await _present_users(runtime, event_type, event.data)
    async with runtime.sessions() as session, session.begin():
        return await _store_event(runtime, session, event, event_type, key, digest, present, source, source_message_id)


_events, _deliveries = Event.metadata.tables["events"], Delivery.metadata.tables["deliveries"]
_EXISTING_QUERY = (
    sa.select(
        _events.c.id,
        _events.c.body_hash,
        _deliveries.c.id.label("delivery_id"),
        _deliveries.c.user_id,
        _deliveries.c.channel,
        _deliveries.c.status,
        _deliveries.c.reason,
        _deliveries.c.not_before,
        _deliveries.c.attempts,
    )
    .select_from(_events.outerjoin(_deliveries, _deliveries.c.event_id == _events.c.id))
    .where(_events.c.idempotency_key == sa.bindparam("key"))
    .order_by(_deliveries.c.user_id, _deliveries.c.channel)
)


async def _existing(session: AsyncSession, key: str, digest: str) -> Accepted | None:
    """The event stored with ``key`` as a duplicate answer; raise ``IdempotencyConflict`` if its body differs."""
    rows = (await session.execute(_EXISTING_QUERY, {"key": key})).all()
    if not rows:
        return None
    if rows[0].body_hash != digest:
        raise IdempotencyConflict(f"idempotency key '{key}' was used with a different body")
    public = [
        _public(row.delivery_id, row.user_id, row.channel, row.status, row.reason, row.not_before)
        for row in rows
        if row.delivery_id is not None
    ]
    # The original request may have committed and then lost its dispatch (a crash or a dropped connection
    # between the commit and the publish): a producer's retry hands the rows still waiting for their first
    # attempt to the dispatcher again, rather than leaving them to the sweep. Harmless when the first dispatch
    # did happen: QStash dedupes by delivery id, and a worker woken for nothing claims nothing.
    again = [
        DispatchItem(row.delivery_id, row.not_before)
        for row in rows
        if row.delivery_id is not None and row.status in DISPATCHABLE_STATUSES and row.attempts == 0
    ]
    return Accepted(rows[0].id, True, public, again)


async def _store_event(
    runtime: Runtime,
    session: AsyncSession,
    event: EventIn,
    event_type: EventType,
    key: str | None,
    digest: str,
    present: frozenset[str],
    source: str,
    source_message_id: str | None,
) -> Accepted:
    """Store the event, its deliveries and their first transitions, in this order (foreign keys)."""
    now = utcnow()
    ids, inline = await _resolve_recipients(session, event, event_type)
    event_id = uuid.uuid4()
    row = {
        "id": event_id,
        "type": event.type,
        "idempotency_key": key,
        "body_hash": digest,
        "organization_id": event.organization_id,
        "actor": event.actor,
        "data": event.data,
        "recipients": ids,
        "send_at": event.send_at,
        "source": source,
        "source_message_id": source_message_id,
        "received_at": now,
    }
    # Insert first and let the unique key say whether this is a repeat: no look-up before every new event,
    # and a concurrent repeat waits here, before it has written or locked anything else.
    while not await store.insert_event(session, row=row):
        assert key is not None  # only a key can be taken
        if (existing := await _existing(session, key, digest)) is not None:
            return existing
        # The event holding the key was deleted (retention) in between: the key is free again.
    decisions = await _plan(
        runtime,
        session,
        event=event,
        event_type=event_type,
        ids=ids,
        inline=inline,
        write=True,
        present=present,
        now=now,
    )
    created = [d for d in decisions if d.status is not None]
    rows: list[dict[str, Any]] = [
        {
            "id": uuid.uuid4(),
            "event_id": event_id,
            "event_type": event.type,
            "user_id": d.user_id,
            "channel": str(d.channel),
            "provider": d.provider,
            "status": str(d.status),
            "reason": str(d.reason) if d.reason else None,
            "not_before": d.not_before,
            "digest_key": d.digest_key,
            "created_at": now,
            "updated_at": now,
        }
        for d in created
    ]
    await store.insert_deliveries(session, rows=rows)
    context = {"event_id": str(event_id)}
    await store.record_transitions(
        session,
        transitions=[
            store.NewTransition(
                delivery_id=r["id"],
                from_status=None,
                to_status=r["status"],
                reason=r["reason"],
                note=d.explanation,
                context={"channel": r["channel"], **context},
            )
            for r, d in zip(rows, created, strict=True)
        ],
        at=now,
    )
    dispatch = [DispatchItem(r["id"], r["not_before"]) for r, d in zip(rows, created, strict=True) if d.dispatchable]
    public = [_public(r["id"], r["user_id"], r["channel"], r["status"], r["reason"], r["not_before"]) for r in rows]
    return Accepted(event_id, False, public, dispatch)
