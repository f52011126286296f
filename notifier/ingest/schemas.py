"""What producers send: the event body and user profiles, and turning a body into one of them with every
bad field reported at once."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from notifier.errors import FieldError, ValidationFailed
from notifier.preferences.document import is_timezone
from notifier.types import CONTROL_CHARACTERS, as_utc, segment_problem

M = TypeVar("M", bound=BaseModel)

# fullmatch, not "$": "$" also matches before a trailing newline ("ann@example.com\n").
_ADDRESS_PART = f"[^@\\s<>\"',;{CONTROL_CHARACTERS}]+"
_EMAIL = re.compile(f"{_ADDRESS_PART}@{_ADDRESS_PART}\\.{_ADDRESS_PART}")
MAX_RECIPIENTS = 1000


def _email(value: str | None) -> str | None:
    if value is not None and not _EMAIL.fullmatch(value):
        raise ValueError("not a valid email address")
    return value


def _instant(value: dt.datetime | None) -> dt.datetime | None:
    """``value`` in UTC; ``ValueError`` when it is out of range (``9999-12-31T23:59:59-23:59``)."""
    return as_utc(value) if value is not None else None


def _zone(value: str | None) -> str | None:
    if value is not None and not is_timezone(value):
        raise ValueError(f"unknown time zone '{value}'")
    return value


def _segment(value: str) -> str:
    if (problem := segment_problem(value)) is not None:
        raise ValueError(problem)
    return value


# Ids and names: no control characters (C0, DEL, C1) and no line or paragraph separator. A name may become an
# email header (a recipient's display name), which no line break may reach. A user's or organization's id is
# also a URL path segment (/v1/users/{id}), or nothing could reach what is stored under it.
Id = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, pattern=f"^[^{CONTROL_CHARACTERS}]+$"),
    AfterValidator(_segment),
]
Text = Annotated[str, StringConstraints(max_length=200, pattern=f"^[^{CONTROL_CHARACTERS}]*$")]
Role = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=f"^[^{CONTROL_CHARACTERS}]+$")]


class ProfileIn(BaseModel):
    """Profile fields a producer may set (``PUT /v1/users/{id}`` and inline recipients)."""

    model_config = ConfigDict(extra="forbid")

    organization_id: Id | None = None
    roles: list[Role] | None = Field(None, max_length=50)
    email: Annotated[str | None, AfterValidator(_email)] = Field(None, max_length=320)
    name: Text | None = None
    locale: (
        Annotated[str, StringConstraints(max_length=35, pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")] | None
    ) = None
    timezone: Annotated[str | None, AfterValidator(_zone)] = None


class RecipientIn(ProfileIn):
    id: Id


def _recipient_object(value: Any) -> Any:
    # A bare string is shorthand for {"id": ...}; one shape keeps error locations simple.
    return {"id": value} if isinstance(value, str) else value


class AudienceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    organization_id: Id
    roles: list[Role] = Field(default_factory=list)


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
    send_at: Annotated[AwareDatetime | None, AfterValidator(_instant)] = None


def field_errors(exc: ValidationError) -> list[FieldError]:
    """One FieldError per pydantic error; messages say what is wrong without echoing huge inputs."""
    errors = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-")))
        errors.append(FieldError(loc, error["msg"]))
    return errors


def parse_model(model: type[M], raw: Any) -> M:
    """Return ``model`` validated from ``raw``; raise ``ValidationFailed`` naming every bad field."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ValidationFailed(field_errors(exc)) from exc
