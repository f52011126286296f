"""Turning request bodies into models, with every bad field reported at once."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from notifier.errors import FieldError, ValidationFailed

M = TypeVar("M", bound=BaseModel)


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
