"""Database tables (SQLModel). Plural names, UUID keys, tz-aware timestamps, named constraints.

Idempotency is enforced by unique constraints (events.idempotency_key, deliveries
(event_id, user_id, channel), inbox_messages.delivery_id, revoked_credentials (kind, credential_id)), never by
check-then-insert.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from notifier.types import utcnow

SQLModel.metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(sa.types.TypeDecorator[dt.datetime]):
    """A timestamp stored in UTC and always read back tz-aware (SQLite forgets the zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def _ts(*, nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=sa.Column(UTCDateTime(), nullable=nullable, index=index))


def _created() -> Any:
    return Field(default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False, default=utcnow))


def _json(default: Any) -> Any:
    return Field(default_factory=default, sa_column=sa.Column(JSONType, nullable=False, default=default))


class User(SQLModel, table=True):
    __tablename__ = "users"

    id: str = Field(primary_key=True, max_length=200)
    organization_id: str | None = Field(default=None, max_length=200, index=True)
    roles: list[str] = _json(list)
    email: str | None = Field(default=None, max_length=320)
    name: str | None = Field(default=None, max_length=200)
    locale: str | None = Field(default=None, max_length=35)
    timezone: str | None = Field(default=None, max_length=64)
    created_at: dt.datetime = _created()
    updated_at: dt.datetime = _created()


class UserPreferences(SQLModel, table=True):
    __tablename__ = "preferences"

    user_id: str = Field(
        sa_column=sa.Column(sa.String(200), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    )
    document: dict[str, Any] = _json(dict)
    version: int = Field(default=1)
    updated_at: dt.datetime = _created()


class OrganizationPreferences(SQLModel, table=True):
    __tablename__ = "organization_preferences"

    organization_id: str = Field(primary_key=True, max_length=200)
    document: dict[str, Any] = _json(dict)
    version: int = Field(default=1)
    updated_at: dt.datetime = _created()


class PreferenceChange(SQLModel, table=True):
    """Audit trail: one row per preference write, in the same transaction as the write."""

    __tablename__ = "preference_changes"
    __table_args__ = (sa.Index("ix_preference_changes_subject", "subject_kind", "subject_id", "changed_at"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    subject_kind: str = Field(max_length=20)  # "user" | "organization"
    subject_id: str = Field(max_length=200)
    changed_by: str = Field(max_length=220)  # "service" or "user:<id>"
    old_document: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(JSONType, nullable=True))
    new_document: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(JSONType, nullable=True))
    version: int
    changed_at: dt.datetime = _created()


class Event(SQLModel, table=True):
    __tablename__ = "events"
    __table_args__ = (sa.Index("ix_events_type_received_at", "type", "received_at"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    type: str = Field(max_length=100)
    idempotency_key: str | None = Field(default=None, max_length=300, unique=True)
    body_hash: str = Field(max_length=64)
    organization_id: str | None = Field(default=None, max_length=200)
    actor: str | None = Field(default=None, max_length=200)
    data: dict[str, Any] = _json(dict)
    recipients: list[str] = _json(list)  # the resolved audience, for the record
    send_at: dt.datetime | None = _ts()
    source: str = Field(default="api", max_length=20)  # "api" | "qstash"
    source_message_id: str | None = Field(default=None, max_length=200)
    received_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False, index=True)
    )


class Delivery(SQLModel, table=True):
    __tablename__ = "deliveries"
    __table_args__ = (
        sa.UniqueConstraint("event_id", "user_id", "channel"),
        sa.Index("ix_deliveries_due", "status", "not_before"),
        sa.Index("ix_deliveries_user_created", "user_id", "created_at"),
        sa.Index("ix_deliveries_created", "created_at"),
        sa.Index("ix_deliveries_digest", "digest_key", "status"),
        sa.Index("ix_deliveries_status_channel_created", "status", "channel", "created_at", "id"),
        sa.Index("ix_deliveries_type_created", "event_type", "created_at", "id"),
        sa.Index("ix_deliveries_send_group", "send_group"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    event_id: uuid.UUID = Field(
        sa_column=sa.Column(sa.Uuid(), sa.ForeignKey("events.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    event_type: str = Field(max_length=100)
    user_id: str = Field(max_length=200)
    channel: str = Field(max_length=20)
    provider: str | None = Field(default=None, max_length=40)
    status: str = Field(max_length=20)
    reason: str | None = Field(default=None, max_length=40)
    not_before: dt.datetime | None = _ts()
    claimed_until: dt.datetime | None = _ts()
    claim_token: uuid.UUID | None = Field(default=None)  # fencing token of the attempt (or batch) that holds the row
    attempts: int = Field(default=0)
    # Attempts the retry budget does not count: those made before the last operator retry, and claims released
    # before they reached the provider (at shutdown). The budget counts attempts - retry_base.
    retry_base: int = Field(default=0)
    provider_message_id: str | None = Field(default=None, max_length=200)
    last_error: str | None = Field(default=None, max_length=1000)
    digest_key: str | None = Field(default=None, max_length=500)
    # On a ``digested`` row, the head delivery it was folded into: that head's digest counts it, and no other does.
    digest_head: uuid.UUID | None = Field(default=None)
    fallback_of: uuid.UUID | None = Field(default=None)
    # The members of one send group are attempted with one provider call under the group's idempotency key.
    send_group: uuid.UUID | None = Field(default=None)
    # Numbers each deliberate re-dispatch to QStash (part of the message's deduplication id).
    dispatch_generation: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    # The generation whose QStash message QStash gave up on, and how often it did since the last operator retry.
    gave_up_generation: int | None = Field(default=None)
    gave_up_count: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    created_at: dt.datetime = _created()
    updated_at: dt.datetime = _created()
    sent_at: dt.datetime | None = _ts()


class DeliveryAttempt(SQLModel, table=True):
    __tablename__ = "delivery_attempts"
    __table_args__ = (sa.UniqueConstraint("delivery_id", "number"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    delivery_id: uuid.UUID = Field(
        sa_column=sa.Column(sa.Uuid(), sa.ForeignKey("deliveries.id", ondelete="CASCADE"), nullable=False)
    )
    number: int
    started_at: dt.datetime = _created()
    finished_at: dt.datetime | None = _ts()
    outcome: str | None = Field(default=None, max_length=20)  # sent | retry | failed | interrupted
    http_status: int | None = Field(default=None)
    provider_message_id: str | None = Field(default=None, max_length=200)
    error: str | None = Field(default=None, max_length=1000)
    via: str = Field(default="local", max_length=20)  # local | qstash | operator
    send_group: uuid.UUID | None = Field(default=None)  # the group the attempt went with (None: alone)


class DeliveryTransition(SQLModel, table=True):
    """Every status change of a delivery, in the transaction that makes it."""

    __tablename__ = "delivery_transitions"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    delivery_id: uuid.UUID = Field(
        sa_column=sa.Column(sa.Uuid(), sa.ForeignKey("deliveries.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    from_status: str | None = Field(default=None, max_length=20)
    to_status: str = Field(max_length=20)
    reason: str | None = Field(default=None, max_length=40)
    note: str | None = Field(default=None, max_length=500)
    at: dt.datetime = _created()


class InboxMessage(SQLModel, table=True):
    __tablename__ = "inbox_messages"
    __table_args__ = (sa.Index("ix_inbox_messages_user_created", "user_id", "created_at", "id"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: str = Field(max_length=200)
    delivery_id: uuid.UUID | None = Field(default=None, unique=True)
    event_id: uuid.UUID | None = Field(default=None)
    event_type: str = Field(max_length=100)
    title: str = Field(sa_column=sa.Column(sa.Text(), nullable=False))
    body: str = Field(sa_column=sa.Column(sa.Text(), nullable=False))
    data: dict[str, Any] = _json(dict)
    action_url: str | None = Field(default=None, max_length=2000)
    created_at: dt.datetime = _created()
    seen_at: dt.datetime | None = _ts()
    read_at: dt.datetime | None = _ts()
    archived_at: dt.datetime | None = _ts()


class RevokedCredential(SQLModel, table=True):
    """A credential refused until it would have expired anyway: a QStash signature once used (its ``jti``), a
    dashboard session once signed out (its nonce). Kept in the database so that every replica refuses it."""

    __tablename__ = "revoked_credentials"

    kind: str = Field(primary_key=True, max_length=20)  # revocations.CredentialKind
    credential_id: str = Field(primary_key=True, max_length=200)
    expires_at: dt.datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False, index=True))
    revoked_at: dt.datetime = _created()


def _table(model: type[SQLModel]) -> sa.Table:
    table: sa.Table = model.__table__  # type: ignore[attr-defined]
    return table


def string_length(column: sa.ColumnElement[Any]) -> int:
    """The declared length of a string column: PostgreSQL refuses a longer value (SQLite stores it)."""
    length = getattr(column.type, "length", None)
    if not isinstance(length, int):
        raise TypeError(f"{column} has no declared length")
    return length


# The tables as SQLAlchemy Core objects, for set-based statements that skip the ORM's per-row bookkeeping
# (ingest, claims and outcomes write many rows and read none back as objects). The one way to get them.
USERS = _table(User)
PREFERENCES = _table(UserPreferences)
ORGANIZATION_PREFERENCES = _table(OrganizationPreferences)
PREFERENCE_CHANGES = _table(PreferenceChange)
EVENTS = _table(Event)
DELIVERIES = _table(Delivery)
ATTEMPTS = _table(DeliveryAttempt)
TRANSITIONS = _table(DeliveryTransition)
INBOX_MESSAGES = _table(InboxMessage)
REVOKED_CREDENTIALS = _table(RevokedCredential)
