"""The one exception tree of notifier.

::

    NotifierError                   anything notifier raises on purpose
    ├── RequestError                the caller sent something we refuse (HTTP 4xx)
    │   ├── MalformedBody           body is not parseable JSON / not valid UTF-8
    │   ├── Unauthenticated         no credential, a bad one, or a kind not configured
    │   ├── Forbidden               a valid credential outside its scope
    │   ├── NotFound                the named resource does not exist
    │   ├── Conflict                the request contradicts stored state
    │   │   └── IdempotencyConflict same idempotency key, different body
    │   ├── PreconditionFailed      If-Match names a stale version
    │   ├── PayloadTooLarge         body over NOTIFIER_MAX_BODY_BYTES
    │   ├── UnsupportedMediaType    body is not JSON
    │   ├── ValidationFailed        the body parsed but fields are wrong (lists every field)
    │   └── RateLimited             too many failed authentications: wait, the credential was not checked
    ├── NotReady                    the database cannot serve now (down, out of connections) or is not migrated
    ├── ConfigurationError          settings that cannot work; raised at start, never per request
    └── TemplateError               a catalog template failed to render

HTTP statuses are decided in one place, ``notifier.api.problems``; raise sites only say *what*
went wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class FieldError:
    """One bad field: where it is (``("data", "guest_name")``) and what is wrong with it."""

    loc: Loc
    msg: str

    def as_dict(self) -> dict[str, object]:
        return {"loc": list(self.loc), "msg": self.msg}


class NotifierError(Exception):
    """Root of every error notifier raises on purpose."""

    title = "Internal error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail


class RequestError(NotifierError):
    """The request cannot be served as sent; retrying it unchanged will fail again."""

    title = "Bad request"


class MalformedBody(RequestError):
    """Raised when the body is not parseable JSON."""

    title = "Malformed body"


class Unauthenticated(RequestError):
    """Raised when the credential is missing, invalid, expired, or of a kind not configured."""

    title = "Unauthenticated"


class Forbidden(RequestError):
    """Raised when a valid credential asks for something outside its scope."""

    title = "Forbidden"


class NotFound(RequestError):
    """Raised when the resource named in the path does not exist."""

    title = "Not found"


class Conflict(RequestError):
    """Raised when the request contradicts stored state (e.g. retrying a delivery that did not fail)."""

    title = "Conflict"


class IdempotencyConflict(Conflict):
    """Raised when an idempotency key is reused with a different body."""

    title = "Idempotency key reused with a different body"


class PreconditionFailed(RequestError):
    """Raised when ``If-Match`` does not name the stored version."""

    title = "Precondition failed"


class PayloadTooLarge(RequestError):
    """Raised when the body exceeds ``NOTIFIER_MAX_BODY_BYTES``."""

    title = "Payload too large"


class UnsupportedMediaType(RequestError):
    """Raised when the body is not declared as JSON."""

    title = "Unsupported media type"


class ValidationFailed(RequestError):
    """Raised when the body parsed but one or more fields are invalid; carries every bad field."""

    title = "Validation failed"

    def __init__(self, errors: Sequence[FieldError], detail: str = "") -> None:
        self.errors = list(errors)
        super().__init__(detail or "; ".join(f"{'.'.join(map(str, e.loc)) or 'body'}: {e.msg}" for e in self.errors))


class RateLimited(RequestError):
    """Raised when too many authentications failed recently, before the credential is checked; says how long
    to wait (``retry_after``, whole seconds)."""

    title = "Too many failed authentications"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class NotReady(NotifierError):
    """Raised when the service cannot serve now: the database is unreachable, restarting, out of connections or
    locked, or its schema is not migrated. Retrying later will succeed; ``retry_after`` says when to."""

    title = "Service not ready"

    def __init__(self, detail: str = "", *, retry_after: int = 5) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class ConfigurationError(NotifierError):
    """Raised at start-up when the settings cannot work; never raised while serving a request."""

    title = "Configuration error"


class TemplateError(NotifierError):
    """Raised when a template fails to render (missing variable, sandbox violation, syntax)."""

    title = "Template error"
