"""Settings: contract env names, safe defaults, refusal of unsafe values, secrets kept out of reprs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from notifier.config import Settings


def test_env_names_of_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://db/notifier")
    monkeypatch.setenv("NOTIFIER_API_KEYS", "key-one-0123456789, key-two-0123456789")
    monkeypatch.setenv("NOTIFIER_MAX_RETRIES", "2")
    monkeypatch.setenv("QSTASH_TOKEN", "qstash-token-value")
    monkeypatch.setenv("NOTIFIER_PUBLIC_URL", "https://notify.example.com/")
    settings = Settings()
    assert settings.database_url == "postgresql+asyncpg://db/notifier"
    assert [k.get_secret_value() for k in settings.api_keys] == ["key-one-0123456789", "key-two-0123456789"]
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
        ({"api_keys": "changeme"}, "placeholder"),
        ({"user_jwt_secret": "short"}, "32 characters"),
        ({"max_retries": -1}, "greater than or equal"),
        ({"dispatcher": "sqs"}, "qstash"),
    ],
)
def test_unsafe_or_impossible_values_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)  # type: ignore[arg-type]


def test_secrets_never_appear_in_repr() -> None:
    settings = Settings(
        api_keys="super-secret-service-key", knock_api_key="sk_test_knock_secret_value", user_jwt_secret="x" * 40
    )
    text = repr(settings) + str(settings.model_dump())
    assert "super-secret-service-key" not in text
    assert "sk_test_knock_secret_value" not in text
    assert "x" * 40 not in text
