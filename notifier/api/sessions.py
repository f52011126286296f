"""Dashboard sessions: a browser cannot send a bearer header when it navigates, so ``/dashboard/login``
trades the service key for a cookie ``<expiry>.<nonce>.<mac>`` whose MAC is keyed by HMAC(key,
"dashboard-session"). The key never leaves the sign-in request and the derived secret never leaves the
server; rotating a key ends its sessions. Forms that change state carry a CSRF token bound to the session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from notifier.security import Authenticator, derive_secret

COOKIE = "notifier_dashboard"
COOKIE_PATH = "/dashboard"
SESSION_LABEL = b"dashboard-session"
SESSION_SECONDS = 8 * 3600


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _mac(secret: bytes, message: str) -> bytes:
    return hmac.new(secret, message.encode(), hashlib.sha256).digest()


def session_secret(key: bytes) -> bytes:
    """The per-key secret sessions are signed with: HMAC(key, "dashboard-session")."""
    return derive_secret(key, SESSION_LABEL)


@dataclass(frozen=True)
class Session:
    nonce: str
    expires: int
    secret: bytes = field(repr=False)  # derived from the key that signed in; stays on the server

    @property
    def csrf(self) -> str:
        return _b64(_mac(self.secret, f"csrf.{self.nonce}"))


@dataclass(frozen=True)
class Viewer:
    """Who is looking at the dashboard: a cookie session (with its CSRF token) or a bearer service key (csrf None)."""

    csrf: str | None


def issue_session(key: str, *, now: float) -> str:
    """Return a session token for a verified service key."""
    expires, nonce = int(now) + SESSION_SECONDS, secrets.token_urlsafe(16)
    return f"{expires}.{nonce}.{_b64(_mac(session_secret(key.encode()), f'{expires}.{nonce}'))}"


def read_session(authenticator: Authenticator, token: str | None, *, now: float) -> Session | None:
    """Return the session ``token`` proves, or None if it is missing, malformed, expired or signed by no current key."""
    parts = (token or "").split(".")
    if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) <= now:
        return None
    expires, nonce, signature = parts
    found: Session | None = None
    for secret in authenticator.derived_secrets(SESSION_LABEL):  # every one: no early exit to time
        if hmac.compare_digest(_b64(_mac(secret, f"{expires}.{nonce}")), signature):
            found = Session(nonce, int(expires), secret)
    return found
