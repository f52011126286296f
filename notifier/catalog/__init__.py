"""The event catalog: which event types exist, what data they need, who hears them and how, and the one
renderer of their message templates (sandboxed Jinja2)."""

from notifier.catalog.event_types import (
    BUILTIN_CATALOG,
    Catalog,
    DigestRule,
    EventType,
    MessageTemplate,
    Rendered,
    load_catalog,
)

__all__ = ["BUILTIN_CATALOG", "Catalog", "DigestRule", "EventType", "MessageTemplate", "Rendered", "load_catalog"]
