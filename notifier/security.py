"""Credentials: service API keys, end-user JWTs, QStash signatures.

Every check fails closed: a credential kind whose secret is not configured is refused, never
waved through. Reasons for a refusal are logged (never the credential) and the caller gets a
plain 401.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import logging
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jwt

from notifier.config import Settings
from notifier.errors import ConfigurationError, Forbidden, Unauthenticated
from notifier.types import id_problem, text_problem

log = logging.getLogger("notifier.security")

USER_TOKEN_LEEWAY_SECONDS = 30
"""Clock skew allowed on a user token's ``exp``, ``iat`` and ``nbf``: its issuer's clock is not ours, and a token
minted a few seconds "in the future" must not fail. An expired token is therefore accepted for up to 30 s more."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: a service (API key), an end user (JWT ``sub``), QStash (signature), or anyone (public routes)."""

    kind: Literal["service", "user", "qstash", "anonymous"]
    user_id: str | None = None

    @property
    def label(self) -> str:
        return f"user:{self.user_id}" if self.kind == "user" else self.kind

    def require_service(self) -> None:
        if self.kind != "service":
            raise Forbidden("this route needs a service API key")

    def require_user_or_service(self, user_id: str) -> None:
        """Allow a service, or the user named in the path; anyone else is forbidden."""
        if self.kind == "service" or (self.kind == "user" and self.user_id == user_id):
            return
        raise Forbidden("a user token may only reach its own user's resources")


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def derive_secret(key: bytes, label: bytes) -> bytes:
    """Return HMAC-SHA256(key, label): a secret for one purpose (``label``) that reveals nothing about ``key``."""
    return hmac.new(key, label, hashlib.sha256).digest()


class Authenticator:
    """Checks credentials against the configured secrets; the secrets themselves never leave it."""

    def __init__(self, *, api_keys: tuple[str, ...], user_jwt_secret: str | None) -> None:
        self._api_keys = tuple(key.encode() for key in api_keys)
        self._user_jwt_secret = user_jwt_secret

    @classmethod
    def from_settings(cls, settings: Settings, extra_api_keys: tuple[str, ...] = ()) -> Authenticator:
        keys = tuple(k.get_secret_value() for k in settings.api_keys) + extra_api_keys
        secret = settings.user_jwt_secret.get_secret_value() if settings.user_jwt_secret else None
        return cls(api_keys=keys, user_jwt_secret=secret)

    def is_service_key(self, token: str) -> bool:
        candidate = token.encode()
        # Compare against every key so timing does not reveal which (or whether any) matched early.
        matches = [hmac.compare_digest(candidate, key) for key in self._api_keys]
        return any(matches)

    def derived_secrets(self, label: bytes) -> tuple[bytes, ...]:
        """Return ``derive_secret(key, label)`` for every configured service key, in configuration order.

        For things signed on behalf of a service key (dashboard sessions): a signature made with the secret
        derived from a key that is no longer configured stops verifying, so rotating a key revokes them.
        """
        return tuple(derive_secret(key, label) for key in self._api_keys)

    def authenticate(self, authorization: str | None, *, allow_user: bool) -> Principal:
        """Return the principal for an ``Authorization`` header; raise ``Unauthenticated`` otherwise."""
        token = bearer_token(authorization)
        if token is None:
            raise Unauthenticated("missing bearer credential")
        if self.is_service_key(token):
            return Principal("service")
        if token.count(".") == 2:
            user_id = self.verify_user_token(token)
            if not allow_user:
                raise Forbidden("a user token cannot call this route")
            return Principal("user", user_id=user_id)
        log.info("refused credential: not a known API key")
        raise Unauthenticated("invalid credential")

    def verify_user_token(self, token: str) -> str:
        """Return the user id (``sub``) of a valid HS256 user token; raise ``Unauthenticated`` otherwise."""
        if self._user_jwt_secret is None:
            log.info("refused user token: NOTIFIER_USER_JWT_SECRET is not configured")
            raise Unauthenticated("user tokens are not accepted by this deployment")
        try:
            claims = jwt.decode(
                token,
                self._user_jwt_secret,
                algorithms=["HS256"],
                options={"require": ["exp", "sub"]},
                leeway=USER_TOKEN_LEEWAY_SECONDS,
            )
        except jwt.PyJWTError as exc:
            log.info("refused user token: %s", exc)
            raise Unauthenticated("invalid or expired user token") from exc
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise Unauthenticated("user token has no subject")
        # A subject no user id can be (NUL, a lone surrogate, '/') names no one: no credential, rather than a
        # principal whose id reaches the database or a log line before anything compares it with a path.
        if id_problem(sub) is not None:
            log.info("refused user token: its subject is not a user id")
            raise Unauthenticated("user token's subject is not a user id")
        return sub


QSTASH_LEEWAY_SECONDS = 5
"""Clock skew allowed on a QStash signature's ``exp`` and ``nbf``."""
MAX_JTI_LENGTH = 200
"""The longest ``jti`` remembered (QStash's are about 30 characters); a longer one is refused."""


@dataclass(frozen=True)
class QStashSignature:
    """A verified ``Upstash-Signature``: its id (``jti``) and the last instant at which it is accepted."""

    jti: str
    expires_at: dt.datetime  # exp + the leeway: until then a replay would verify, so it must be remembered


class QStashVerifier:
    """Verifies ``Upstash-Signature``: HS256 with the current or next signing key, iss, sub, exp, nbf, jti, body
    hash. That a signature is used only once is the caller's to enforce (``db.revocations``): it needs the
    database."""

    def __init__(self, *, current_key: str | None, next_key: str | None, public_url: str) -> None:
        self._keys = tuple(k for k in (current_key, next_key) if k)
        self._public_url = public_url.rstrip("/")

    @classmethod
    def from_settings(cls, settings: Settings) -> QStashVerifier:
        current = settings.qstash_current_signing_key
        nxt = settings.qstash_next_signing_key
        return cls(
            current_key=current.get_secret_value() if current else None,
            next_key=nxt.get_secret_value() if nxt else None,
            public_url=settings.public_url,
        )

    @property
    def configured(self) -> bool:
        return bool(self._keys)

    def url_for(self, path: str, query: str = "") -> str:
        return f"{self._public_url}{path}" + (f"?{query}" if query else "")

    def verify(self, signature: str | None, body: bytes, *, path: str, query: str = "") -> QStashSignature:
        """Return the signature if it is valid for this body and URL; raise ``Unauthenticated`` otherwise."""
        if not self._keys:
            log.info("refused QStash request: no signing keys configured")
            raise Unauthenticated("QStash signatures are not accepted by this deployment")
        if not signature:
            raise Unauthenticated("missing Upstash-Signature")
        url = self.url_for(path, query)
        reasons = []
        for key in self._keys:
            try:
                return self._verify_with_key(signature, body, url, key)
            except (jwt.PyJWTError, ValueError) as exc:
                reasons.append(str(exc))
        log.warning("refused QStash signature for %s: %s", url, "; ".join(reasons))
        raise Unauthenticated("invalid Upstash-Signature")

    @staticmethod
    def _verify_with_key(signature: str, body: bytes, url: str, key: str) -> QStashSignature:
        claims = jwt.decode(
            signature,
            key,
            algorithms=["HS256"],
            issuer="Upstash",
            options={"require": ["iss", "sub", "exp", "nbf", "jti", "body"], "verify_iat": False},
            leeway=QSTASH_LEEWAY_SECONDS,
        )
        if claims.get("sub") != url:
            raise ValueError(f"subject {claims.get('sub')!r} is not this URL")
        expected = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).decode().rstrip("=")
        if not hmac.compare_digest(str(claims.get("body", "")).rstrip("="), expected):
            raise ValueError("body hash does not match")
        jti = claims["jti"]
        # The jti is stored (revoked_credentials) before anything else happens: one the column cannot hold (NUL on
        # PostgreSQL, a lone surrogate anywhere) would fail there as a 500. QStash's are short ASCII names, so
        # anything else is no signature of theirs. The reason names the rule, never the value.
        if not isinstance(jti, str) or (problem := text_problem(jti, longest=MAX_JTI_LENGTH)) is not None:
            raise ValueError(f"jti {problem or 'must be a string'}")
        expires_at = dt.datetime.fromtimestamp(int(claims["exp"]) + QSTASH_LEEWAY_SECONDS, dt.UTC)
        return QStashSignature(jti=jti, expires_at=expires_at)


def ensure_embedded_api_key(path: Path) -> tuple[str, bool]:
    """Return the embedded deployment's API key from ``path``, creating it (mode 0600) if absent.

    Returns (key, created). Raises ``ConfigurationError`` for an existing file that other users may read or write,
    as OpenSSH refuses such a private key file: the key opens every route, a warning would scroll past in the logs,
    and quietly fixing the mode would hide that others could have read it.
    """
    if path.exists():
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                where = path.resolve()
                raise ConfigurationError(
                    f"the API key file {where} is open to other users (mode {mode:04o}) and its key opens every "
                    f"route: run `chmod 600 {where}`, or delete the file to have a new key generated if anyone else "
                    "may have read it"
                )
            return path.read_text(encoding="utf-8").strip(), False
        except OSError as exc:
            reason = f"{type(exc).__name__}: {exc.strerror}" if exc.strerror else type(exc).__name__
            raise ConfigurationError(f"cannot read the API key file {path.resolve()}: {reason}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "nk_" + secrets.token_urlsafe(32)
    fd = path.open("x", encoding="utf-8")
    with fd:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)
        fd.write(key + "\n")
    return key, True
