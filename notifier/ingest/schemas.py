"""What producers send: the event body and user profiles, and turning a body into one of them with every
bad field reported at once."""

from __future__ import annotations

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

M = TypeVar("M", bound=BaseModel)

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
