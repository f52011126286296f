"""Credentials the service mints from a service key for a browser, which cannot send a bearer header when
it navigates. The key never leaves the request that presents it, and the secrets derived from it never leave
the server; rotating a key voids everything it minted.

- Dashboard sessions: ``/dashboard/login`` trades the key for a cookie ``<expiry>.<nonce>.<mac>`` whose MAC
  is keyed by HMAC(key, "dashboard-session"). Forms that change state carry a CSRF token bound to it. Signing
  out revokes the nonce in the database until the expiry (``db.revocations``), so a copy of the cookie dies
  with it on every replica; ``auth.guard`` checks that on every dashboard request.
- Demo tickets: ``/inbox-demo`` gives its page ``<expiry>.<user id, base64url>.<mac>`` (MAC keyed by
  HMAC(key, "inbox-demo")), which lets the page send that one user test notifications for ``DEMO_SECONDS``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from notifier.security import Authenticator, derive_secret

COOKIE = "notifier_dashboard"
COOKIE_PATH = "/dashboard"
SESSION_LABEL = b"dashboard-session"
SESSION_SECONDS = 8 * 3600
DEMO_LABEL = b"inbox-demo"
DEMO_SECONDS = 30 * 60


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _ascii_time(text: str) -> bool:
    """Whether ``text`` is a Unix time as this module writes it: ASCII digits, at most 12 of them.

    ``str.isdigit`` also takes "²" (which ``int`` refuses) and any number of digits (``int`` refuses more than
    4300); ``hmac.compare_digest`` refuses non-ASCII text, hence the same check on a signature.
    """
    return text.isascii() and text.isdigit() and len(text) <= 12


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
    """Who is looking at the dashboard: a cookie session, or a bearer service key (``session`` None)."""

    session: Session | None

    @property
    def csrf(self) -> str | None:
        """The token the session's forms carry; None for a bearer key (no cookie, so no cross-site risk)."""
        return self.session.csrf if self.session is not None else None


def issue_session(key: str, *, now: float) -> str:
    """Return a session token for a verified service key."""
    expires, nonce = int(now) + SESSION_SECONDS, secrets.token_urlsafe(16)
    return f"{expires}.{nonce}.{_b64(_mac(session_secret(key.encode()), f'{expires}.{nonce}'))}"


def read_session(authenticator: Authenticator, token: str | None, *, now: float) -> Session | None:
    """Return the session ``token`` proves, or None if it is missing, malformed, expired or signed by no current key."""
    parts = (token or "").split(".")
    if len(parts) != 3 or not _ascii_time(parts[0]) or int(parts[0]) <= now or not parts[2].isascii():
        return None
    expires, nonce, signature = parts
    found: Session | None = None
    for secret in authenticator.derived_secrets(SESSION_LABEL):  # every one: no early exit to time
        if hmac.compare_digest(_b64(_mac(secret, f"{expires}.{nonce}")), signature):
            found = Session(nonce, int(expires), secret)
    return found


def issue_ticket(key: str, user_id: str, *, now: float) -> str:
    """Return a demo ticket for a verified service key: it lets its holder send ``user_id`` test notifications."""
    body = f"{int(now) + DEMO_SECONDS}.{_b64(user_id.encode())}"
    return f"{body}.{_b64(_mac(derive_secret(key.encode(), DEMO_LABEL), body))}"


def read_ticket(authenticator: Authenticator, ticket: str, *, now: float) -> str | None:
    """Return the user id a demo ticket names, or None if it is malformed, expired or signed by no current key."""
    parts = ticket.split(".")
    if len(parts) != 3 or not _ascii_time(parts[0]) or int(parts[0]) <= now or not parts[2].isascii():
        return None
    body = f"{parts[0]}.{parts[1]}"
    valid = False
    for secret in authenticator.derived_secrets(DEMO_LABEL):  # every one: no early exit to time
        valid = hmac.compare_digest(_b64(_mac(secret, body)), parts[2]) or valid
    try:
        return _unb64(parts[1]).decode() if valid else None
    except (binascii.Error, UnicodeDecodeError):
        return None
