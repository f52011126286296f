"""Checking an event body before anything is stored: its schema, its type's data, its audience, and what its
data becomes (rendered templates, digest keys, action URLs) against where that goes. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from notifier.catalog import Catalog, EventType, templates
from notifier.db.models import DELIVERIES, INBOX_MESSAGES, string_length
from notifier.errors import FieldError, Loc, TemplateError, ValidationFailed
from notifier.ingest.schemas import EventIn, parse_model
from notifier.types import id_problem

# Where values derived from an event's data are stored: they must fit before anything is written.
USER_ID_LIMIT = string_length(DELIVERIES.c.user_id)
DIGEST_KEY_LIMIT = string_length(DELIVERIES.c.digest_key)
ACTION_URL_LIMIT = string_length(INBOX_MESSAGES.c.action_url)


def body_hash(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _implicit_audience(event: EventIn, event_type: EventType) -> bool:
    if event_type.recipient_field and event.data.get(event_type.recipient_field):
        return True
    return bool(event_type.audience_roles and event.organization_id)


def _locales(event: EventIn) -> set[str | None]:
    return {None} | {r.locale for r in event.recipients if r.locale}


def _recipient_field_errors(name: str, value: Any) -> list[FieldError]:
    """Errors for the data field that names the recipient (``approval.responded``: ``requester_id``)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return [FieldError(("data", name), "must be a user id (a string)")]
    problem = id_problem(str(value), longest=USER_ID_LIMIT)
    return [] if problem is None else [FieldError(("data", name), f"must be a user id: {problem}")]


def _fields_in(source: str, data: Mapping[str, Any]) -> list[Loc]:
    """Where in the event the data fields a template reads are (``("data",)`` if it reads none of them)."""
    return [("data", name) for name in sorted(templates.variables(source)) if name in data] or [("data",)]


def _derived_errors(event_type: EventType, data: Mapping[str, Any], locales: Sequence[str | None]) -> list[FieldError]:
    """Errors for what ``data`` becomes besides itself, checked against where it goes, so that nothing refuses it
    later (PostgreSQL a column's length; the email package a subject's line break, retried for hours).

    Raises ``TemplateError`` as ``check_templates`` would (call it first).
    """
    errors: list[FieldError] = []
    action_url = event_type.action_url_for(data)
    if event_type.action_url and action_url is not None and len(action_url) > ACTION_URL_LIMIT:
        message = (
            f"makes an action URL of {len(action_url)} characters ({event_type.action_url}; at most {ACTION_URL_LIMIT})"
        )
        errors += [FieldError(loc, message) for loc in _fields_in(event_type.action_url, data)]
    digest_key = event_type.digest_key("", data)  # the recipient's id goes in the middle
    if event_type.digest and digest_key is not None and len(digest_key) + USER_ID_LIMIT > DIGEST_KEY_LIMIT:
        longest = DIGEST_KEY_LIMIT - USER_ID_LIMIT - len(event_type.name) - 2
        message = f"is too long for a digest key ({event_type.digest.key} must stay within {longest} characters)"
        errors += [FieldError(loc, message) for loc in _fields_in(event_type.digest.key, data)]
    for name in event_type.subject_line_breaks(data, locales):
        message = "contains a line break, which an email subject (rendered from it) cannot carry"
        errors.append(FieldError(("data", name) if name else ("data",), message))
    return errors


def validate_event(raw: Any, catalog: Catalog) -> tuple[EventIn, EventType]:
    """Parse and check an event body against the catalog; raise ``ValidationFailed`` listing every problem."""
    if not isinstance(raw, Mapping):
        raise ValidationFailed([FieldError((), "the body must be a JSON object")])
    event = parse_model(EventIn, raw)
    event_type = catalog.get(event.type)
    if event_type is None:
        known = ", ".join(sorted(catalog.types))
        raise ValidationFailed([FieldError(("type",), f"unknown event type '{event.type}' (known: {known})")])
    errors = event_type.validate_data(event.data)
    if not event.recipients and event.audience is None and not _implicit_audience(event, event_type):
        errors.append(FieldError(("recipients",), "recipients and/or audience required"))
    elif (
        event_type.recipient_field
        and not event.recipients
        and event.audience is None
        and (named := event.data.get(event_type.recipient_field)) not in (None, "")
    ):
        errors += _recipient_field_errors(event_type.recipient_field, named)
    if not errors:
        # Render what the type may send, so a missing variable is a 422 now, never a half-rendered message.
        locales = sorted(_locales(event), key=lambda locale: locale or "")
        try:
            event_type.check_templates(event.data, locales)
            errors += _derived_errors(event_type, event.data, locales)
        except TemplateError as exc:
            errors.append(FieldError(("data",), exc.detail))
    if errors:
        raise ValidationFailed(errors)
    return event, event_type
