"""Preferences: a user's document (ETag/If-Match, merge patch, audit trail), its effective values, tenant defaults.

Every write is a compare-and-swap on the document's version (``db.preferences``) and appends a history row in
the same transaction, so concurrent writers with the same ``If-Match`` cannot both win.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from notifier.api.auth import principal_of
from notifier.api.common import (
    ApiRoute,
    Auth,
    Endpoint,
    collect,
    collect_json,
    encode_cursor,
    path_id,
    query_page,
    refuse_if,
    runtime_of,
)
from notifier.catalog import Catalog
from notifier.db import preferences, users
from notifier.db.models import PreferenceChange
from notifier.db.preferences import LostRace, Subject
from notifier.delivery.recipients import load_organization_preferences
from notifier.errors import Conflict, FieldError, PreconditionFailed, ValidationFailed
from notifier.preferences.document import EMPTY_DOCUMENT, PreferenceDocument, load_stored, parse_document
from notifier.preferences.merge_patch import merge_patch
from notifier.preferences.resolution import resolve_channel
from notifier.types import ALL_CHANNELS, utcnow

Kind = Literal["user", "organization"]
MERGE_PATCH = "application/merge-patch+json"
WRITE_ATTEMPTS = 3  # unconditional writes retry a lost race; conditional ones answer 412 at once
ANY: Final = "*"


def _entity_tags(header: str, *, weak: bool) -> frozenset[str]:
    """The entity tags a comma-separated list names, as opaque strings compared exactly (never parsed as numbers).

    With ``weak`` (If-None-Match's weak comparison) ``W/"3"`` counts as ``"3"``; without it a weak tag names nothing.
    """
    tags = set()
    for tag in header.split(","):
        tag = tag.strip()
        if weak and tag.startswith("W/"):
            tag = tag[2:]
        if len(tag) >= 2 and tag[0] == tag[-1] == '"':
            tags.add(tag)
    return frozenset(tags)


def parse_if_match(header: str | None) -> frozenset[str] | Literal["*"] | None:
    """Return the entity tags an ``If-Match`` header accepts, ``"*"``, or None when absent.

    Weak or foreign entity tags never match (If-Match uses strong comparison).
    """
    if header is None:
        return None
    if header.strip() == ANY:
        return ANY
    return _entity_tags(header, weak=False)


def if_none_match(header: str | None, current: int) -> bool:
    """Whether ``If-None-Match`` names version ``current`` (RFC 9110 §13.1.2), so a GET may answer 304.

    Weak comparison; ``*`` matches only a stored document (as for ``If-Match: *``: version 0 is the defaults).
    A malformed header names nothing.
    """
    if header is None:
        return False
    if header.strip() == ANY:
        return current > 0
    return etag(current) in _entity_tags(header, weak=True)


def etag(version: int) -> str:
    return f'"{version}"'


def _check_precondition(wanted: frozenset[str] | Literal["*"] | None, current: int, header: str | None) -> None:
    if wanted is None:
        return
    if wanted == ANY:
        if current == 0:
            raise PreconditionFailed("If-Match: * needs stored preferences, and there are none yet")
        return
    if etag(current) not in wanted:
        raise PreconditionFailed(f"If-Match {header} does not match the current version {etag(current)}")


def validate(raw: Any, subject: Subject, catalog: Catalog) -> PreferenceDocument:
    """Return the document ``raw`` describes for ``subject``; raise ``ValidationFailed`` listing every bad field."""
    errors: list[FieldError] = []
    if isinstance(raw, Mapping) and subject.kind == "organization":
        for key in ("quiet_hours", "muted_until"):
            if raw.get(key) is not None:
                errors.append(FieldError((key,), f"{key} is personal; organization defaults cannot set it"))
    try:
        document = parse_document(raw, catalog)
    except ValidationFailed as exc:
        raise ValidationFailed([*exc.errors, *errors]) from None
    if errors:
        raise ValidationFailed(errors)
    return document


def current_view(document: PreferenceDocument, now: dt.datetime) -> PreferenceDocument:
    """A mute that has ended reads as "not muted"."""
    if document.muted_until is not None and document.muted_until <= now:
        return document.model_copy(update={"muted_until": None})
    return document


def document_public(document: PreferenceDocument, version: int) -> dict[str, Any]:
    return {**document.public(), "version": version}


def _validators(version: int) -> dict[str, str]:
    """The headers a document answer and its 304 both carry."""
    return {"ETag": etag(version)}


def _respond(document: PreferenceDocument, version: int) -> Response:
    return JSONResponse(document_public(document, version), headers=_validators(version))


async def write_document(
    request: Request, subject: Subject, build: Callable[[dict[str, Any] | None], PreferenceDocument]
) -> Response:
    """Replace ``subject``'s document with ``build(stored)`` under If-Match; audit it in the same transaction.

    The caller has refused a bad path and body already. ``build`` may still raise (a merge patch that leaves the
    stored document invalid): the transaction rolls back and nothing is written.
    """
    header = request.headers.get("if-match")
    wanted = parse_if_match(header)
    runtime = runtime_of(request)
    changed_by = principal_of(request).label
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        now = utcnow()
        try:
            async with runtime.sessions() as session, session.begin():
                old, version = await preferences.load(session, subject=subject)
                _check_precondition(wanted, version, header)
                document = current_view(build(old), now)
                stored = document.public(fill_channels=False)
                await preferences.compare_and_swap(session, subject=subject, document=stored, expected=version, now=now)
                await preferences.add_change(
                    session, subject=subject, changed_by=changed_by, old=old, new=stored, version=version + 1, now=now
                )
            return _respond(document, version + 1)
        except LostRace as exc:
            if wanted is not None:
                raise PreconditionFailed(f"If-Match {header} lost to a concurrent write; reload and retry") from exc
            if attempt == WRITE_ATTEMPTS:
                raise Conflict("the preferences kept changing concurrently; retry the request") from exc
    raise AssertionError("unreachable")


async def read_document(request: Request, subject: Subject) -> Response:
    """The document with its ETag, or an empty 304 when ``If-None-Match`` names it."""
    runtime = runtime_of(request)
    async with runtime.sessions() as session:
        stored, version = await preferences.load(session, subject=subject)
    if if_none_match(request.headers.get("if-none-match"), version):
        return Response(status_code=304, headers=_validators(version))
    return _respond(current_view(load_stored(stored, runtime.catalog), utcnow()), version)


def _subject(request: Request, kind: Kind) -> Subject:
    """Whose document the path names; raise ``ValidationFailed`` when its id cannot be one."""
    return Subject(kind, path_id(request, "user_id" if kind == "user" else "organization_id"))


def _path_subject(request: Request, kind: Kind, errors: list[FieldError]) -> Subject:
    """``_subject``, a bad id collected into ``errors``: an empty id stands in, so that the body is still
    validated as ``kind``'s document (an organization's refuses personal fields) and one 422 names both."""
    return collect(errors, lambda: _subject(request, kind), Subject(kind, ""))


async def _put(request: Request, kind: Kind) -> Response:
    errors: list[FieldError] = []
    subject = _path_subject(request, kind, errors)
    catalog = runtime_of(request).catalog
    document = await collect_json(errors, request, lambda raw: validate(raw, subject, catalog), EMPTY_DOCUMENT)
    refuse_if(errors)
    return await write_document(request, subject, lambda _old: document)


def _patched(old: dict[str, Any] | None, patch: Any, subject: Subject, catalog: Catalog) -> PreferenceDocument:
    # Patch what the API shows (entries the catalog dropped are gone), then validate the result.
    base = load_stored(old, catalog).public(fill_channels=False)
    return validate(merge_patch(base, patch), subject, catalog)


async def _patch(request: Request, kind: Kind) -> Response:
    """Merge-patch the stored document (loaded in ``write_document``'s transaction) and validate the result.

    With a bad path id there is no stored document to load: the patch is validated as applied to none stored
    (the defaults), so that one 422 names the path and the patch's bad fields. Once the path is fixed, the patch
    is validated against what is stored, as always, which may find other fields wrong.
    """
    errors: list[FieldError] = []
    subject = _path_subject(request, kind, errors)
    catalog = runtime_of(request).catalog
    path_refused = bool(errors)

    def checked(patch: Any) -> Any:
        if path_refused:
            _patched(None, patch, subject, catalog)
        return patch

    patch = await collect_json(errors, request, checked, None, accept=(MERGE_PATCH,))
    refuse_if(errors)
    return await write_document(request, subject, lambda old: _patched(old, patch, subject, catalog))


def change_public(change: PreferenceChange) -> dict[str, Any]:
    return {
        "id": str(change.id),
        "version": change.version,
        "changed_by": change.changed_by,
        "changed_at": change.changed_at.isoformat(),
        "old": change.old_document,
        "new": change.new_document,
    }


async def _history(request: Request, kind: Kind) -> Response:
    errors: list[FieldError] = []
    subject = _path_subject(request, kind, errors)
    limit, cursor = query_page(request, errors)
    refuse_if(errors)
    async with runtime_of(request).sessions() as session:
        shown, following = await preferences.history(session, subject=subject, cursor=cursor, limit=limit)
    next_cursor = encode_cursor(*following) if following else None
    return JSONResponse({"data": [change_public(c) for c in shown], "next_cursor": next_cursor})


async def get_user_preferences(request: Request) -> Response:
    return await read_document(request, _subject(request, "user"))


async def put_user_preferences(request: Request) -> Response:
    return await _put(request, "user")


async def patch_user_preferences(request: Request) -> Response:
    return await _patch(request, "user")


async def user_history(request: Request) -> Response:
    return await _history(request, "user")


async def get_organization_preferences(request: Request) -> Response:
    return await read_document(request, _subject(request, "organization"))


async def put_organization_preferences(request: Request) -> Response:
    return await _put(request, "organization")


async def patch_organization_preferences(request: Request) -> Response:
    return await _patch(request, "organization")


async def organization_history(request: Request) -> Response:
    return await _history(request, "organization")


async def effective_preferences(request: Request) -> Response:
    """Every event type x channel: whether it is on, which level decided, and what it is without the user's say."""
    subject = _subject(request, "user")
    runtime = runtime_of(request)
    async with runtime.sessions() as session:
        stored, version = await preferences.load(session, subject=subject)
        user = await users.get(session, subject.id)
        organization_id = user.organization_id if user is not None else None
        organizations = await load_organization_preferences(
            session, organization_ids=[organization_id] if organization_id else [], catalog=runtime.catalog
        )
    document = load_stored(stored, runtime.catalog)
    organization = organizations.get(organization_id or "")
    types: dict[str, Any] = {}
    for name in sorted(runtime.catalog.types):
        event_type = runtime.catalog.types[name]
        cells: dict[str, Any] = {}
        for channel in ALL_CHANNELS:
            resolved = resolve_channel(event_type, channel, document, organization)
            baseline = resolve_channel(event_type, channel, EMPTY_DOCUMENT, organization)
            cells[str(channel)] = {
                "enabled": resolved.enabled,
                "source": resolved.source,
                "baseline": {"enabled": baseline.enabled, "source": baseline.source},
            }
        types[name] = {
            "category": event_type.category,
            "description": event_type.description,
            "critical": event_type.critical,
            "allowed_channels": sorted(map(str, event_type.allowed_channels)),
            "default_channels": sorted(map(str, event_type.default_channels)),
            "channels": cells,
        }
    body = {"user_id": subject.id, "organization_id": organization_id, "version": version, "event_types": types}
    return JSONResponse(body)


def _route(method: str, path: str, endpoint: Endpoint, auth: Auth, summary: str) -> ApiRoute:
    """Writes take a document (PATCH as a merge patch) and answer with it; history pages with a cursor."""
    writes = method in ("PUT", "PATCH")
    responses = {200: "The stored document, its version and ETag" if writes else summary}
    if method == "GET" and path in (_USER, _ORG):
        responses[304] = "Not modified: If-None-Match names the current ETag"
    return ApiRoute(
        method,
        path,
        endpoint,
        summary,
        auth,
        body=PreferenceDocument if writes else None,
        content_type=MERGE_PATCH if method == "PATCH" else "application/json",
        query=("cursor", "limit") if path.endswith("/history") else (),
        responses=responses,
        tag="preferences",
    )


_USER = "/v1/users/{user_id}/preferences"
_ORG = "/v1/organizations/{organization_id}/preferences"

ROUTES = [
    _route(
        "GET", _USER, get_user_preferences, "user_or_service", "A user's preferences (defaults and version 0 if none)"
    ),
    _route("PUT", _USER, put_user_preferences, "user_or_service", "Replace a user's preferences (optional If-Match)"),
    _route("PATCH", _USER, patch_user_preferences, "user_or_service", "Merge-patch a user's preferences (RFC 7396)"),
    _route("GET", f"{_USER}/history", user_history, "user_or_service", "Changes to a user's preferences, newest first"),
    _route(
        "GET", f"{_USER}/effective", effective_preferences, "user_or_service", "Every event type x channel, and why"
    ),
    _route("GET", _ORG, get_organization_preferences, "service", "An organization's default preferences"),
    _route("PUT", _ORG, put_organization_preferences, "service", "Replace an organization's default preferences"),
    _route("PATCH", _ORG, patch_organization_preferences, "service", "Merge-patch an organization's defaults"),
    _route("GET", f"{_ORG}/history", organization_history, "service", "Changes to an organization's defaults"),
]
