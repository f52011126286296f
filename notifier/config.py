"""Settings read from the environment (names fixed by the public contract).

One ``Settings`` class; every secret is a ``SecretStr`` so it never reaches a log or a repr.
Nothing is read at import time: ``Settings()`` is built by the CLI (or a test) and handed to
``create_app``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from notifier.errors import ConfigurationError

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./notifier.db"
MIN_API_KEY_LENGTH = 32
"""Characters per service API key: a key is all that stands between the internet and every route."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
PLACEHOLDER_SECRETS = frozenset({"changeme", "change-me", "secret", "password", "test", "example"})


def api_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a service API key (too short), or None; the message never shows the key."""
    if len(key) >= MIN_API_KEY_LENGTH:
        return None
    return (
        f"is {len(key)} characters; a service API key must be at least {MIN_API_KEY_LENGTH}: it is all that stands "
        "between the internet and every route (generate one with `openssl rand -hex 32`)"
    )


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username is not None else ":***@"
    return urlunsplit(parts._replace(netloc=user + parts.netloc.rpartition("@")[2]))


def _env(name: str) -> AliasChoices:
    # Accept the env name and the field name, so tests can say Settings(database_url=...).
    return AliasChoices(name, name.lower())


class Settings(BaseSettings):
    # hide_input_in_errors: a ValidationError's text would otherwise quote the refused value, secret or not, and it
    # is printed whole wherever the ConfigurationError it causes reaches a traceback (e.g. `uvicorn notifier.asgi:app`).
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True, hide_input_in_errors=True)

    database_url: str = Field(DEFAULT_DATABASE_URL, validation_alias=_env("DATABASE_URL"))
    public_url: str = Field("http://127.0.0.1:8000", validation_alias=_env("NOTIFIER_PUBLIC_URL"))
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field((), validation_alias=_env("NOTIFIER_API_KEYS"))
    user_jwt_secret: SecretStr | None = Field(None, validation_alias=_env("NOTIFIER_USER_JWT_SECRET"))
    dispatcher: Literal["qstash", "local"] | None = Field(None, validation_alias=_env("NOTIFIER_DISPATCHER"))
    max_retries: int = Field(5, ge=0, le=20, validation_alias=_env("NOTIFIER_MAX_RETRIES"))
    retention_days: int = Field(90, ge=1, validation_alias=_env("NOTIFIER_RETENTION_DAYS"))
    max_body_bytes: int = Field(262144, ge=1024, validation_alias=_env("NOTIFIER_MAX_BODY_BYTES"))
    chat_digest_seconds: int = Field(60, ge=0, validation_alias=_env("NOTIFIER_CHAT_DIGEST_SECONDS"))
    catalog_path: Path | None = Field(None, validation_alias=_env("NOTIFIER_CATALOG_PATH"))

    # Not in the contract's table; ours to add.
    # The product's own web address, against which relative action URLs in emails are made absolute (a mail client
    # has no page to resolve them against). Empty: emails carry the catalog's action URLs as they are.
    app_url: str = Field("", validation_alias=_env("NOTIFIER_APP_URL"))
    log_level: str = Field("INFO", validation_alias=_env("NOTIFIER_LOG_LEVEL"))
    workers: int = Field(4, ge=1, le=256, validation_alias=_env("NOTIFIER_WORKERS"))
    # PostgreSQL connections a process keeps open; a burst above it opens as many again, each closed when it is
    # returned. A connection opened anew costs ~5 ms of CPU (both ends) and prepares every statement again: size it
    # to the process's usual concurrency (requests in flight, plus the dispatcher's few), not its peak.
    db_pool_size: int = Field(20, ge=1, le=500, validation_alias=_env("NOTIFIER_DB_POOL_SIZE"))
    provider_timeout_seconds: float = Field(10.0, gt=0, validation_alias=_env("NOTIFIER_PROVIDER_TIMEOUT_SECONDS"))
    # Multiplies the retry backoff; tests compress the schedule with a small value.
    retry_backoff_scale: float = Field(1.0, gt=0, validation_alias=_env("NOTIFIER_RETRY_BACKOFF_SCALE"))
    # How long a claimed (``sending``) delivery is leased before another worker may take it over.
    claim_lease_seconds: float = Field(60.0, gt=0, validation_alias=_env("NOTIFIER_CLAIM_LEASE_SECONDS"))
    poll_interval_seconds: float = Field(1.0, gt=0, validation_alias=_env("NOTIFIER_POLL_INTERVAL_SECONDS"))
    shutdown_grace_seconds: float = Field(10.0, ge=0, validation_alias=_env("NOTIFIER_SHUTDOWN_GRACE_SECONDS"))
    api_key_file: Path | None = Field(None, validation_alias=_env("NOTIFIER_API_KEY_FILE"))
    # Whether `notifier serve` runs the local dispatcher's workers itself. False: separate `notifier worker`
    # processes attempt the deliveries, and the API only wakes them (PostgreSQL NOTIFY) after each commit.
    embedded_dispatcher: bool = Field(True, validation_alias=_env("NOTIFIER_EMBEDDED_DISPATCHER"))
    # Whether one event's deliveries with the same message on one channel go out as one provider call (a send
    # group) and, in QStash mode, as one QStash message. False: one call and one message per delivery.
    send_groups: bool = Field(True, validation_alias=_env("NOTIFIER_SEND_GROUPS"))

    qstash_url: str = Field("https://qstash.upstash.io", validation_alias=_env("QSTASH_URL"))
    qstash_token: SecretStr | None = Field(None, validation_alias=_env("QSTASH_TOKEN"))
    qstash_current_signing_key: SecretStr | None = Field(None, validation_alias=_env("QSTASH_CURRENT_SIGNING_KEY"))
    qstash_next_signing_key: SecretStr | None = Field(None, validation_alias=_env("QSTASH_NEXT_SIGNING_KEY"))

    onesignal_app_id: str | None = Field(None, validation_alias=_env("ONESIGNAL_APP_ID"))
    onesignal_rest_api_key: SecretStr | None = Field(None, validation_alias=_env("ONESIGNAL_REST_API_KEY"))
    onesignal_api_url: str = Field("https://api.onesignal.com", validation_alias=_env("ONESIGNAL_API_URL"))

    knock_api_key: SecretStr | None = Field(None, validation_alias=_env("KNOCK_API_KEY"))
    knock_base_url: str = Field("https://api.knock.app", validation_alias=_env("KNOCK_BASE_URL"))
    knock_workflow_prefix: str = Field("", validation_alias=_env("NOTIFIER_KNOCK_WORKFLOW_PREFIX"))

    smtp_host: str | None = Field(None, validation_alias=_env("SMTP_HOST"))
    smtp_port: int = Field(587, validation_alias=_env("SMTP_PORT"))
    smtp_username: str | None = Field(None, validation_alias=_env("SMTP_USERNAME"))
    smtp_password: SecretStr | None = Field(None, validation_alias=_env("SMTP_PASSWORD"))
    smtp_from: str | None = Field(None, validation_alias=_env("SMTP_FROM"))
    smtp_starttls: bool = Field(True, validation_alias=_env("SMTP_STARTTLS"))

    ably_api_key: SecretStr | None = Field(None, validation_alias=_env("ABLY_API_KEY"))
    ably_rest_url: str | None = Field(None, validation_alias=_env("ABLY_REST_URL"))
    # The inbox component: how long an Ably token issued to a browser lives (it renews before expiry), and the
    # origins (scheme://host[:port]) allowed to call the inbox routes from a browser; empty: same origin only.
    realtime_token_ttl_seconds: int = Field(
        900, ge=60, le=3600, validation_alias=_env("NOTIFIER_REALTIME_TOKEN_TTL_SECONDS")
    )
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field((), validation_alias=_env("NOTIFIER_CORS_ORIGINS"))
    # Failed authentications per minute from all addresses together (per process), past which an address not
    # vouched for by a recent valid credential gets 429 without its credential being checked (api.failure_caps).
    signin_failures_per_minute: int = Field(30, ge=1, validation_alias=_env("NOTIFIER_SIGNIN_FAILURES_PER_MINUTE"))
    bearer_failures_per_minute: int = Field(300, ge=1, validation_alias=_env("NOTIFIER_BEARER_FAILURES_PER_MINUTE"))

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("api_keys")
    @classmethod
    def _long_keys(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for number, key in enumerate(value, start=1):
            problem = api_key_problem(key.get_secret_value())
            if problem is not None:
                raise ValueError(f"key {number} of {len(value)} {problem}")
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip().rstrip("/") for part in value.split(",") if part.strip())
        return value

    @field_validator("cors_origins")
    @classmethod
    def _exact_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
                raise ValueError(f"NOTIFIER_CORS_ORIGINS: {origin!r} is not an origin like https://app.example.com")
        return value

    @field_validator("public_url", "onesignal_api_url", "knock_base_url", "qstash_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("app_url")
    @classmethod
    def _absolute_app_url(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return ""
        parts = urlsplit(value)
        # urlsplit drops tabs and line breaks silently; one would otherwise end up inside every email's links.
        absolute = parts.scheme in ("http", "https") and parts.hostname and not any(c.isspace() for c in value)
        if not absolute or parts.query or parts.fragment or parts.username is not None:
            raise ValueError(
                "must be the absolute http(s) address of your web app, like https://app.example.com (a path is "
                "allowed; no query, fragment or user name)"
            )
        return value.rstrip("/")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"{value!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("ably_api_key")
    @classmethod
    def _ably_key_shape(cls, value: SecretStr | None) -> SecretStr | None:
        # The Ably SDK's own error for a malformed key quotes the key, secret included, from inside start-up.
        key = value.get_secret_value() if value is not None else None
        if key is not None and (key.count(":") != 1 or not all(key.split(":"))):
            raise ValueError("must look like 'appId.keyId:keySecret' (the whole API key from Ably's dashboard)")
        return value

    @field_validator("ably_rest_url")
    @classmethod
    def _ably_rest_url(cls, value: str | None) -> str | None:
        # What channels.ably.client_options needs (a test keeps the two in step), refused here with the setting's
        # name rather than from inside start-up.
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme != "https":
            raise ValueError(f"must be https:// (Ably refuses API-key auth over plain HTTP), not {parts.scheme!r}")
        host = parts.hostname or ""
        if "." not in host and host != "localhost":
            raise ValueError(f"host {host!r} must contain a dot or be localhost (the Ably SDK rewrites others)")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError("must be a base URL (like https://rest.ably.io), without a path or query")
        return value

    @field_validator("database_url")
    @classmethod
    def _known_driver(cls, value: str) -> str:
        if not value.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
            raise ValueError("DATABASE_URL must start with postgresql+asyncpg:// or sqlite+aiosqlite://")
        return value

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> Settings:
        secrets = [*self.api_keys, self.user_jwt_secret]
        for secret in secrets:
            if secret is not None and secret.get_secret_value().lower() in PLACEHOLDER_SECRETS:
                raise ValueError("a credential is set to a placeholder value; set a real secret")
        if self.user_jwt_secret is not None and len(self.user_jwt_secret.get_secret_value()) < 32:
            raise ValueError("NOTIFIER_USER_JWT_SECRET must be at least 32 characters (HS256 wants 256 bits)")
        return self

    @model_validator(mode="after")
    def _separate_workers_need_postgres(self) -> Settings:
        if not self.embedded_dispatcher and self.is_sqlite:
            raise ValueError(
                "NOTIFIER_EMBEDDED_DISPATCHER=false needs PostgreSQL (separate `notifier worker` processes are woken "
                "by LISTEN/NOTIFY); the embedded SQLite default runs its dispatcher inside `notifier serve`"
            )
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # DATABASE_URL may carry a password; the repr shows the URL without it, like every other secret.
        for name, value in super().__repr_args__():
            yield name, _without_password(value) if name == "database_url" else value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def effective_dispatcher(self) -> Literal["qstash", "local"]:
        if self.dispatcher is not None:
            return self.dispatcher
        return "qstash" if self.qstash_token is not None else "local"

    @property
    def sqlite_path(self) -> Path | None:
        """The database file of an embedded (SQLite) deployment, or None."""
        if not self.is_sqlite:
            return None
        path = self.database_url.split("///", 1)[1] if "///" in self.database_url else ""
        return Path(path) if path and path != ":memory:" else None

    @property
    def default_api_key_file(self) -> Path | None:
        if self.api_key_file is not None:
            return self.api_key_file
        db = self.sqlite_path
        return db.with_name(db.name + ".api-key") if db is not None else None


def load_settings() -> Settings:
    """Return the settings from the environment; raise ``ConfigurationError`` naming every bad value."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"invalid configuration: {problems}") from exc


Role = Literal["serve", "worker", "serverless", "schedules"]


def check_startup(settings: Settings, role: Role) -> None:
    """Raise ``ConfigurationError`` when ``settings`` cannot work for ``role``; the one place start-up refuses.

    ``serve``: an HTTP service (credentials; QStash mode needs a token and both signing keys). ``worker``: a
    separate ``notifier worker`` (PostgreSQL, the local dispatcher). ``serverless``: the ``notifier.asgi`` entry
    point (QStash mode required). ``schedules``: ``notifier schedules sync`` (a QStash token, and a
    ``NOTIFIER_PUBLIC_URL`` QStash can call). Database checks are ``notifier.db.check_schema``'s;
    ``startup_warnings`` names what may be meant but will not work.
    """
    qstash = settings.effective_dispatcher == "qstash"
    if role in ("serve", "serverless") and not settings.api_keys and not settings.is_sqlite:
        raise ConfigurationError(
            "NOTIFIER_API_KEYS is not set and the database is not the embedded SQLite default; the service never "
            "runs open: set NOTIFIER_API_KEYS (comma-separated keys)"
        )
    if role == "worker" and settings.is_sqlite:
        raise ConfigurationError(
            "`notifier worker` needs PostgreSQL (DATABASE_URL=postgresql+asyncpg://...); the embedded SQLite "
            "default is one process: `notifier serve` runs its dispatcher"
        )
    if role == "worker" and qstash:
        raise ConfigurationError(
            "`notifier worker` runs the local dispatcher, but the dispatcher is qstash (NOTIFIER_DISPATCHER or "
            "QSTASH_TOKEN): QStash calls /v1/qstash/deliveries/{id} and no worker process is needed"
        )
    if role == "serverless" and not qstash:
        raise ConfigurationError(
            "the serverless entry point needs QStash mode: set QSTASH_TOKEN (and NOTIFIER_DISPATCHER=qstash "
            "or leave it unset); the local dispatcher's workers cannot run between requests"
        )
    unset_keys = [
        name
        for name, key in (
            ("QSTASH_CURRENT_SIGNING_KEY", settings.qstash_current_signing_key),
            ("QSTASH_NEXT_SIGNING_KEY", settings.qstash_next_signing_key),
        )
        if key is None
    ]
    if role in ("serve", "serverless") and qstash and unset_keys:
        # Without them every call QStash makes would be refused with 401: events accepted, nothing ever sent.
        raise ConfigurationError(
            "QStash mode needs QSTASH_CURRENT_SIGNING_KEY and QSTASH_NEXT_SIGNING_KEY (from the QStash console) to "
            f"verify QStash's calls, or every delivery call is refused with 401; not set: {', '.join(unset_keys)}"
        )
    if (role == "schedules" or (role in ("serve", "serverless") and qstash)) and settings.qstash_token is None:
        raise ConfigurationError(
            "QSTASH_TOKEN is not set: NOTIFIER_DISPATCHER=qstash publishes with it, and the schedules live in QStash"
        )
    # Only a warning for a serving process (see startup_warnings), but a schedule with a URL QStash cannot call
    # is never meant: every run of it would fail, every minute.
    if role == "schedules" and (problem := unreachable_public_url(settings)) is not None:
        raise ConfigurationError(problem)


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unreachable_public_url(settings: Settings) -> str | None:
    """Why QStash cannot call ``NOTIFIER_PUBLIC_URL``, or None: a loopback URL when QStash is not on this machine
    too. (A QStash emulator on loopback can call a loopback URL, so that is no problem.)"""
    if not _is_loopback(settings.public_url) or _is_loopback(settings.qstash_url):
        return None
    return (
        f"NOTIFIER_PUBLIC_URL is {settings.public_url}, a loopback address: QStash at {settings.qstash_url} cannot "
        "call it, so no message it is given will ever arrive; set it to the URL QStash reaches this service at"
    )


def startup_warnings(settings: Settings) -> list[str]:
    """What will not work although start-up goes on (it may be meant: a test, a tunnel set up later)."""
    if settings.effective_dispatcher == "qstash" and (problem := unreachable_public_url(settings)) is not None:
        return [problem]
    return []
