"""The event catalog: the built-in types, locale fallback, strict rendering, and catalog files."""

from __future__ import annotations

from pathlib import Path

import pytest

from notifier.catalog import load_catalog
from notifier.errors import ConfigurationError, TemplateError
from notifier.types import ChannelName

CATALOG = load_catalog()
CONTRACT_TYPES = {
    "approval.requested": ("approvals", {"push", "email", "in_app"}, set()),
    "approval.responded": ("approvals", {"push", "in_app"}, {"email"}),
    "chat.message.offline": ("chat", {"push", "in_app"}, {"email"}),
    "booking.confirmed": ("bookings", {"email", "in_app"}, {"push"}),
    "payment.received": ("payments", {"email", "push", "in_app"}, set()),
    "payment.failed": ("payments", {"email", "push", "in_app"}, set()),
    "reservation.checkin_reminder": ("reminders", {"push", "email"}, {"in_app"}),
    "reservation.checkout_reminder": ("reminders", {"push", "email"}, {"in_app"}),
}


@pytest.mark.parametrize(("name", "expected"), CONTRACT_TYPES.items())
def test_builtin_types_match_the_contract(name: str, expected: tuple[str, set[str], set[str]]) -> None:
    event_type = CATALOG.get(name)
    assert event_type is not None
    category, default, also = expected
    assert event_type.category == category
    assert set(event_type.default_channels) == default
    assert set(event_type.allowed_channels) == default | also
    assert event_type.critical == (name == "payment.failed")


def test_every_type_renders_every_allowed_channel_in_english_and_german() -> None:
    for event_type in CATALOG.types.values():
        data = {field: f"<{field}>" for field in event_type.required}
        for channel in event_type.allowed_channels:
            for locale in ("en", "de", "de-AT", "fr"):
                rendered = event_type.render(channel, locale, data)
                assert rendered.title
                assert rendered.body
                assert "{{" not in rendered.body
                assert (rendered.html is not None) == (channel == ChannelName.email and "email" in event_type.templates)


def test_locale_falls_back_from_region_to_language_to_english() -> None:
    booking = CATALOG.get("booking.confirmed")
    assert booking is not None
    data = {"booking_id": "b", "guest_name": "Ann", "property": "Sea", "check_in": "today"}
    assert booking.render(ChannelName.in_app, "de-AT", data).title == "Buchung bestätigt: Sea"
    assert booking.render(ChannelName.in_app, "fr", data).title == "Booking confirmed: Sea"


def test_a_missing_variable_is_an_error_not_a_blank() -> None:
    booking = CATALOG.get("booking.confirmed")
    assert booking is not None
    with pytest.raises(TemplateError, match="property"):
        booking.render(ChannelName.in_app, "en", {"guest_name": "Ann", "check_in": "today", "booking_id": "b"})


def test_html_is_escaped_and_data_is_never_rendered_twice() -> None:
    booking = CATALOG.get("booking.confirmed")
    assert booking is not None
    data = {"booking_id": "b", "guest_name": "<script>x</script>", "property": "{{ 7*7 }}", "check_in": "{% if %}"}
    rendered = booking.render(ChannelName.email, "en", data)
    assert rendered.html is not None
    assert "<script>" not in rendered.html
    assert "&lt;script&gt;" in rendered.html
    assert "{{ 7*7 }}" in rendered.title
    assert "49" not in rendered.title


def test_only_email_renders_the_action_url_absolute_against_the_app_url() -> None:
    approval = CATALOG.get("approval.requested")
    assert approval is not None
    data = {"approval_id": "a3", "title": "Boiler", "requested_by_name": "Ann"}
    email = approval.render(ChannelName.email, "en", data, app_url="https://app.example.com")
    assert email.action_url == "https://app.example.com/approvals/a3"
    assert email.body.endswith("Review it: https://app.example.com/approvals/a3")
    assert email.html is not None
    assert 'href="https://app.example.com/approvals/a3"' in email.html
    for channel in (ChannelName.push, ChannelName.in_app):  # read inside the product, which resolves the path
        assert approval.render(channel, "en", data, app_url="https://app.example.com").action_url == "/approvals/a3"
    assert approval.render(ChannelName.email, "en", data).action_url == "/approvals/a3"  # no app URL: as it was


@pytest.mark.parametrize(
    ("url", "app_url", "joined"),
    [
        ("/approvals/a3", "https://app.example.com", "https://app.example.com/approvals/a3"),
        ("approvals/a3", "https://app.example.com", "https://app.example.com/approvals/a3"),
        ("/approvals/a3?tab=1#top", "https://example.com/app", "https://example.com/app/approvals/a3?tab=1#top"),
        ("//cdn.example.com/f.pdf", "https://app.example.com", "https://cdn.example.com/f.pdf"),
        ("http://other.example.com/x", "https://app.example.com", "http://other.example.com/x"),
        ("mailto:desk@example.com", "https://app.example.com", "mailto:desk@example.com"),
        ("acme://approvals/a3", "https://app.example.com", "acme://approvals/a3"),
    ],
)
def test_an_email_action_url_is_joined_to_the_app_url_unless_it_is_absolute(
    url: str, app_url: str, joined: str
) -> None:
    from notifier.catalog.links import absolute

    assert absolute(url, app_url) == joined


def test_a_catalog_file_adds_and_replaces_types(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(
        """
[types."maintenance.scheduled"]
category = "maintenance"
default_channels = ["email"]
also_allowed = ["in_app"]
required = ["unit"]

[types."maintenance.scheduled".templates.default.en]
title = "Maintenance in {{ unit }}"
body = "Someone will visit {{ unit }}."

[types."booking.confirmed"]
category = "bookings"
default_channels = ["in_app"]

[types."booking.confirmed".templates.default.en]
title = "Booked"
body = "Booked."
""",
        encoding="utf-8",
    )
    catalog = load_catalog(path)
    assert len(catalog.types) == 9
    maintenance = catalog.get("maintenance.scheduled")
    assert maintenance is not None
    assert maintenance.render(ChannelName.email, None, {"unit": "4B"}).title == "Maintenance in 4B"
    booking = catalog.get("booking.confirmed")
    assert booking is not None
    assert set(booking.default_channels) == {"in_app"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[types."x"]\ncategory = "c"\ndefault_channels = ["sms"]', "sms"),
        ('[types."x"]\ncategory = "c"\ndefault_channels = ["email"]', "English"),
        ('[types."x"]\ncategory = "c"\n[types."x".templates.default.en]\ntitle = "{{ a"\nbody = "b"', "syntax"),
        ('[types."x"', "cannot read catalog"),
    ],
)
def test_a_broken_catalog_file_fails_at_start_with_a_clear_message(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigurationError, match=message):
        load_catalog(path)
