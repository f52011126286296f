"""The event catalog: which event types exist, what data they need, who hears them and how.

The built-in catalog lives in ``catalog.toml`` beside this module; ``NOTIFIER_CATALOG_PATH`` names
an optional file in the same format whose types are added (or replace built-ins by name).
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from notifier.catalog import links, templates
from notifier.errors import ConfigurationError, FieldError, TemplateError
from notifier.types import ChannelName, line_break_in

BUILTIN_CATALOG = Path(__file__).with_name("catalog.toml")
DEFAULT_LOCALE = "en"


@dataclass(frozen=True)
class MessageTemplate:
    title: str
    body: str
    html: str | None = None


@dataclass(frozen=True)
class Rendered:
    """A message rendered for one channel and locale."""

    title: str
    body: str
    html: str | None
    action_url: str | None


@dataclass(frozen=True)
class DigestRule:
    """Fold several events of one type into one message on ``channel`` per (user, key)."""

    channel: ChannelName
    key: str  # template over the event data, e.g. "{{ conversation_id }}"


@dataclass(frozen=True)
class EventType:
    name: str
    category: str
    description: str
    default_channels: frozenset[ChannelName]
    allowed_channels: frozenset[ChannelName]
    required: tuple[str, ...]
    templates: Mapping[str, Mapping[str, MessageTemplate]]
    critical: bool = False
    audience_roles: tuple[str, ...] = ()
    recipient_field: str | None = None
    presence_channel: str | None = None
    presence_suppresses: frozenset[ChannelName] = frozenset()
    digest: DigestRule | None = None
    fallback: Mapping[ChannelName, ChannelName] = field(default_factory=dict)
    action_url: str | None = None

    def template_for(self, kind: str, locale: str | None) -> MessageTemplate:
        """Return the best template: channel (or "digest") in the locale, its language, English, then "default"."""
        group, variant = self.template_choice(kind, locale)
        return self.templates[group][variant]

    def template_choice(self, kind: str, locale: str | None) -> tuple[str, str]:
        """Which template ``template_for`` picks, as (template group, locale variant); raise ``TemplateError``.

        Recipients with the same choice get the same message from one event: they can share a send group.
        """
        candidates = [locale, locale.split("-")[0].split("_")[0] if locale else None, DEFAULT_LOCALE]
        for group in (kind, "default"):
            variants = self.templates.get(group, {})
            for candidate in candidates:
                if candidate and candidate in variants:
                    return group, candidate
        raise TemplateError(f"event type '{self.name}' has no template for {kind}")

    def render(
        self,
        channel: ChannelName,
        locale: str | None,
        data: Mapping[str, Any],
        *,
        digest_count: int = 0,
        app_url: str = "",
    ) -> Rendered:
        """Render the message for ``channel``; a digest of ``digest_count`` > 1 uses the "digest" template.

        On email the action URL, in the templates and in ``Rendered``, is made absolute against ``app_url`` (the
        product's web address; empty: left as the catalog renders it), see ``links``.
        """
        kind = "digest" if digest_count > 1 and "digest" in self.templates else str(channel)
        template = self.template_for(kind, locale)
        action_url = links.action_url_on(channel, self.action_url_for(data), app_url)
        context = _context(data, action_url, digest_count)
        return Rendered(
            title=templates.render(template.title, context),
            body=templates.render(template.body, context),
            html=templates.render(template.html, context, html=True) if template.html and channel == "email" else None,
            action_url=action_url,
        )

    def check_templates(self, data: Mapping[str, Any], locales: Collection[str | None]) -> None:
        """Render everything an event with ``data`` may need, so a missing variable fails now, not at send time.

        That is every allowed channel and, for a digest type, the digest message (with a count > 1) in
        each of ``locales``, plus the digest key and the presence channel. What ``render`` would render
        several times (push and in-app often share the default template; the action URL is part of
        every message) is rendered once here. Raises ``TemplateError`` naming the first failing kind.
        """
        kind = "action_url"
        try:
            action_url = self.action_url_for(data)
            kinds = [(str(channel), 0) for channel in sorted(self.allowed_channels)]
            if self.digest is not None and "digest" in self.templates:
                kinds.append(("digest", 2))
            rendered: set[tuple[str, bool, int]] = set()
            for kind, digest_count in kinds:
                context = _context(data, action_url, digest_count)
                for locale in locales:
                    template = self.template_for(kind, locale)
                    parts = [(template.title, False), (template.body, False)]
                    if template.html and kind == "email":  # as in ``render``: only email carries HTML
                        parts.append((template.html, True))
                    for source, html in parts:
                        if (source, html, digest_count) not in rendered:
                            rendered.add((source, html, digest_count))
                            templates.render(source, context, html=html)
            kind = "digest key"
            if self.digest is not None:
                templates.render(self.digest.key, data)
            kind = "presence channel"
            if self.presence_channel:
                templates.render(self.presence_channel, data)
        except TemplateError as exc:
            raise TemplateError(f"{kind} template: {exc.detail}") from exc

    def action_url_for(self, data: Mapping[str, Any]) -> str | None:
        """The action URL an event with ``data`` links to (None: the type has none); raises ``TemplateError``."""
        return templates.render(self.action_url, data) if self.action_url else None

    def subject_line_breaks(self, data: Mapping[str, Any], locales: Collection[str | None]) -> list[str]:
        """The fields of ``data`` that put a line break into an email subject (``LINE_BREAKS``), which no mail
        header can carry; ``[""]`` when the break comes from elsewhere. Empty for types that send no email.

        Call after ``check_templates``: raises ``TemplateError`` as it would.
        """
        if ChannelName.email not in self.allowed_channels:
            return []
        context = _context(data, self.action_url_for(data), 0)
        found: set[str] = set()
        for locale in locales:
            title = self.template_for(str(ChannelName.email), locale).title
            if line_break_in(templates.render(title, context)) is not None:
                fields = [name for name in templates.variables(title) if name in data and _has_line_break(data[name])]
                found.update(fields or [""])
        return sorted(found)

    def digest_key(self, user_id: str, data: Mapping[str, Any]) -> str | None:
        """The key under which this type's digest channel folds events for ``user_id`` (None: no digest).

        The user id goes in with its length (three digits: ids have at most 200 characters), because ids and the
        rendered key may both contain ``:``: joined plainly, user ``a:1`` in conversation ``x`` and user ``a`` in
        conversation ``1:x`` would share a key, and one user's messages would fold into the other's digest.
        """
        if self.digest is None:
            return None
        return f"{self.name}:{len(user_id):03d}:{user_id}:{templates.render(self.digest.key, data)}"

    def presence_channel_name(self, data: Mapping[str, Any]) -> str | None:
        """The realtime channel whose members are present for an event with ``data`` (None: presence not used)."""
        return templates.render(self.presence_channel, data) if self.presence_channel else None

    def validate_data(self, data: Mapping[str, Any]) -> list[FieldError]:
        """Return one error per missing required field."""
        return [FieldError(("data", name), "field required") for name in self.required if data.get(name) in (None, "")]

    def public(self) -> dict[str, Any]:
        return {
            "type": self.name,
            "category": self.category,
            "description": self.description,
            "default_channels": sorted(self.default_channels),
            "allowed_channels": sorted(self.allowed_channels),
            "required_data": list(self.required),
            "critical": self.critical,
            "audience_roles": list(self.audience_roles),
            "fallback": {str(k): str(v) for k, v in self.fallback.items()},
            "digest": {"channel": str(self.digest.channel)} if self.digest else None,
            "locales": sorted({loc for variants in self.templates.values() for loc in variants}),
        }


def _has_line_break(value: Any) -> bool:
    if isinstance(value, str):
        return line_break_in(value) is not None
    if isinstance(value, Mapping):
        return any(_has_line_break(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_line_break(v) for v in value)
    return False


def _context(data: Mapping[str, Any], action_url: str | None, digest_count: int) -> dict[str, Any]:
    return {**data, "action_url": action_url or "", "count": digest_count or 1}


@dataclass(frozen=True)
class Catalog:
    types: Mapping[str, EventType]

    def get(self, name: str) -> EventType | None:
        return self.types.get(name)

    @property
    def categories(self) -> frozenset[str]:
        return frozenset(t.category for t in self.types.values())

    def relative_email_links(self) -> list[str]:
        """The types (sorted) whose emails link to a relative action URL unless ``NOTIFIER_APP_URL`` is set."""
        return sorted(
            name
            for name, t in self.types.items()
            if ChannelName.email in t.allowed_channels and t.action_url is not None and links.is_relative(t.action_url)
        )


def _channels(values: Any, where: str) -> frozenset[ChannelName]:
    try:
        return frozenset(ChannelName(v) for v in values)
    except ValueError as exc:
        raise ConfigurationError(f"{where}: {exc}") from exc


def _parse_type(name: str, raw: Mapping[str, Any]) -> EventType:
    where = f"catalog type '{name}'"
    default = _channels(raw.get("default_channels", []), where)
    allowed = default | _channels(raw.get("also_allowed", []), where)
    parsed_templates: dict[str, dict[str, MessageTemplate]] = {}
    for group, variants in raw.get("templates", {}).items():
        parsed_templates[group] = {}
        for locale, spec in variants.items():
            template = MessageTemplate(title=spec["title"], body=spec["body"], html=spec.get("html"))
            for source, html in ((template.title, False), (template.body, False), (template.html, True)):
                if source is not None:
                    templates.compile_template(source, html=html)
            parsed_templates[group][locale] = template
    if not any(DEFAULT_LOCALE in parsed_templates.get(group, {}) for group in ("default", *map(str, allowed))):
        raise ConfigurationError(f"{where}: needs an English ('en') template")
    digest_raw = raw.get("digest")
    digest = DigestRule(channel=ChannelName(digest_raw["channel"]), key=digest_raw["key"]) if digest_raw else None
    fallback = {ChannelName(k): ChannelName(v) for k, v in raw.get("fallback", {}).items()}
    for target in fallback.values():
        if target not in allowed:
            raise ConfigurationError(f"{where}: fallback channel '{target}' is not allowed for the type")
    return EventType(
        name=name,
        category=raw["category"],
        description=raw.get("description", ""),
        default_channels=default,
        allowed_channels=allowed,
        required=tuple(raw.get("required", [])),
        templates=parsed_templates,
        critical=bool(raw.get("critical", False)),
        audience_roles=tuple(raw.get("audience_roles", [])),
        recipient_field=raw.get("recipient_field"),
        presence_channel=raw.get("presence_channel"),
        presence_suppresses=_channels(raw.get("presence_suppresses", []), where),
        digest=digest,
        fallback=fallback,
        action_url=raw.get("action_url"),
    )


def load_catalog(extra: Path | None = None) -> Catalog:
    """Return the built-in catalog, extended by ``extra`` when given; raise ``ConfigurationError`` if invalid."""
    raw_types: dict[str, Any] = {}
    for path in (BUILTIN_CATALOG, extra):
        if path is None:
            continue
        try:
            raw_types.update(tomllib.loads(path.read_text(encoding="utf-8")).get("types", {}))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"cannot read catalog {path}: {exc}") from exc
    try:
        return Catalog(types={name: _parse_type(name, raw) for name, raw in raw_types.items()})
    except (KeyError, TypeError, ValueError, TemplateError) as exc:
        raise ConfigurationError(f"invalid catalog: {exc}") from exc
