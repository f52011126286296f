"""Settings: contract env names, safe defaults, refusal of unsafe values, secrets kept out of reprs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from notifier.config import Settings, load_settings, startup_warnings
from notifier.errors import ConfigurationError
from tests.conftest import make_settings, running_service


def test_env_names_of_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://db/notifier")
    monkeypatch.setenv("NOTIFIER_API_KEYS", "key-one-0123456789-abcdefghijklmnop, key-two-0123456789-abcdefghijklmnop")
    monkeypatch.setenv("NOTIFIER_MAX_RETRIES", "2")
    monkeypatch.setenv("QSTASH_TOKEN", "qstash-token-value")
    monkeypatch.setenv("NOTIFIER_PUBLIC_URL", "https://notify.example.com/")
    settings = Settings()
    assert settings.database_url == "postgresql+asyncpg://db/notifier"
    assert [k.get_secret_value() for k in settings.api_keys] == [
        "key-one-0123456789-abcdefghijklmnop",
        "key-two-0123456789-abcdefghijklmnop",
    ]
    assert settings.max_retries == 2
    assert settings.public_url == "https://notify.example.com"
    assert settings.effective_dispatcher == "qstash"  # QSTASH_TOKEN set and no explicit choice


def test_defaults_are_the_embedded_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "NOTIFIER_API_KEYS", "QSTASH_TOKEN", "NOTIFIER_DISPATCHER"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.is_sqlite
    assert settings.effective_dispatcher == "local"
    assert (settings.max_retries, settings.retention_days, settings.max_body_bytes, settings.chat_digest_seconds) == (
        5,
        90,
        262144,
        60,
    )
    assert str(settings.default_api_key_file) == "notifier.db.api-key"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"database_url": "mysql://x/y"}, "DATABASE_URL"),
        ({"api_keys": "changeme"}, "at least 32"),
        ({"user_jwt_secret": "short"}, "32 characters"),
        ({"max_retries": -1}, "greater than or equal"),
        ({"dispatcher": "sqs"}, "qstash"),
        ({"log_level": "LOUD"}, "'LOUD' is not a log level; use one of DEBUG, INFO"),
        ({"ably_api_key": "no-colon-here"}, "appId.keyId:keySecret"),
        ({"ably_rest_url": "http://rest.example.com"}, "must be https://"),
    ],
)
def test_unsafe_or_impossible_values_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("keys", "which"),
    [
        ("k" * 31, "key 1 of 1 is 31 characters"),
        (f"{'a' * 40},{'b' * 12}", "key 2 of 2 is 12 characters"),
        (f"{'c' * 31} , {'d' * 40}", "key 1 of 2 is 31 characters"),
    ],
)
def test_a_service_key_under_32_characters_is_refused_saying_why_and_never_showing_it(
    monkeypatch: pytest.MonkeyPatch, keys: str, which: str
) -> None:
    monkeypatch.setenv("NOTIFIER_API_KEYS", keys)
    with pytest.raises(ConfigurationError) as refused:
        load_settings()
    message = refused.value.detail
    assert f"NOTIFIER_API_KEYS: Value error, {which}" in message
    assert "at least 32" in message
    assert "every route" in message  # why: the key is the only thing in front of the routes
    for key in keys.split(","):
        assert key.strip() not in message


def test_keys_of_32_characters_or_more_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_API_KEYS", f"{'a' * 32},{'b' * 64}")
    assert [len(k.get_secret_value()) for k in load_settings().api_keys] == [32, 64]


def test_secrets_never_appear_in_repr() -> None:
    settings = Settings(
        api_keys="super-secret-service-key-0123456789",
        knock_api_key="sk_test_knock_secret_value",
        user_jwt_secret="x" * 40,
    )
    text = repr(settings) + str(settings.model_dump())
    assert "super-secret-service-key-0123456789" not in text
    assert "sk_test_knock_secret_value" not in text
    assert "x" * 40 not in text


async def test_a_hand_edited_short_key_file_is_refused_like_a_short_setting(tmp_path: Path) -> None:
    key_file = tmp_path / "notifier.db.api-key"
    key_file.write_text("short-key-in-the-file\n")
    key_file.chmod(0o600)
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'notifier.db'}", api_keys=(), api_key_file=key_file)
    with pytest.raises(ConfigurationError, match="is 21 characters; a service API key must be at least 32") as refused:
        async with running_service(settings):
            pass
    assert "short-key-in-the-file" not in refused.value.detail


@pytest.mark.parametrize(
    ("overrides", "warned"),
    [
        ({"qstash_token": "t"}, True),  # the default public URL, 127.0.0.1
        ({"qstash_token": "t", "public_url": "http://localhost:8000"}, True),
        ({"qstash_token": "t", "public_url": "http://[::1]:8000"}, True),
        ({"qstash_token": "t", "public_url": "https://notify.example.com"}, False),
        ({"qstash_token": "t", "qstash_url": "http://127.0.0.1:8080"}, False),  # a QStash emulator on this machine
        ({}, False),  # the local dispatcher calls nobody
    ],
)
def test_a_loopback_public_url_is_a_warning_when_qstash_cannot_call_it(overrides: dict[str, str], warned: bool) -> None:
    warnings = startup_warnings(Settings(**overrides))  # type: ignore[arg-type]
    assert bool(warnings) is warned
    assert all("NOTIFIER_PUBLIC_URL" in warning for warning in warnings)


@pytest.mark.parametrize(
    "value",
    [
        "app.example.com",
        "/approvals",
        "ftp://app.example.com",
        "https://",
        "https://app.example.com?x=1",
        "https://user:pw@app.example.com",
        "https://app.exa mple.com",
        "https://app.example.com/\napp",
    ],
)
def test_an_app_url_that_is_not_an_absolute_http_url_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """Joined to every email's relative links, it would make each of them as broken as before, or worse."""
    monkeypatch.setenv("NOTIFIER_APP_URL", value)
    with pytest.raises(ConfigurationError) as refused:
        load_settings()
    message = refused.value.detail
    assert message.startswith("invalid configuration: NOTIFIER_APP_URL: Value error, must be the absolute http(s) ")
    assert "\n" not in message
    assert "pw" not in message


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("", ""),
        ("https://app.example.com/", "https://app.example.com"),
        (" http://localhost:3000/shop/ ", "http://localhost:3000/shop"),
    ],
)
def test_an_app_url_is_kept_without_its_trailing_slash(value: str, kept: str) -> None:
    assert Settings(app_url=value).app_url == kept


def test_the_log_level_is_any_standard_level_in_any_case() -> None:
    assert Settings(log_level="warning").log_level == "WARNING"


@pytest.mark.parametrize(
    "url",
    [
        "https://rest.example.com",
        "https://rest.example.com/",
        "https://localhost:8443",
        "https://127.0.0.1:8443",
        "http://rest.example.com",
        "https://ably-fake:8443",
        "https://rest.example.com/v1",
        "https://rest.example.com?x=1",
    ],
)
def test_settings_accept_exactly_the_ably_rest_urls_the_ably_client_can_use(url: str) -> None:
    """Settings refuse ABLY_REST_URL with the setting's name before start-up; the client's own check (which would
    refuse it later, from inside start-up) must agree on every URL."""
    from notifier.channels.ably import client_options

    try:
        client_options(rest_url=url, timeout=1.0)
        usable = True
    except ValueError:
        usable = False
    try:
        Settings(ably_rest_url=url)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted is usable


@pytest.mark.parametrize("key", ["app.key:secret", "nocolon", "a:b:c", ":secret", "app.key:"])
def test_settings_accept_exactly_the_ably_keys_the_ably_client_takes(key: str) -> None:
    from notifier.channels.ably import AblyRealtime

    try:
        AblyRealtime(api_key=key, rest_url=None, timeout=1.0)
        usable = True
    except ValueError:
        usable = False
    try:
        Settings(ably_api_key=key)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted is usable


@pytest.mark.parametrize(
    "overrides",
    [{"api_keys": "a-short-service-key-0123"}, {"ably_api_key": "ably-secret-without-a-colon"}],
)
def test_a_refused_secret_is_not_quoted_by_the_validation_error(overrides: dict[str, str]) -> None:
    # What load_settings raises carries the ValidationError as its cause; a traceback prints both.
    [secret] = overrides.values()
    with pytest.raises(ValidationError) as refused:
        Settings(**overrides)  # type: ignore[arg-type]
    assert secret not in str(refused.value)
