"""The data layer: the engine and migrations (here), the tables (``models``) and every query (one module per
resource). Nothing outside this package runs SQL."""

from notifier.db.engine import (
    alembic_config,
    check_schema,
    create_engine,
    create_session_factory,
    current_revision,
    head_revision,
    is_migrated,
    migrate,
    readiness,
    refused_values,
    snapshot,
    transaction_time,
    unavailable,
    unavailable_as_not_ready,
)

__all__ = [
    "alembic_config",
    "check_schema",
    "create_engine",
    "create_session_factory",
    "current_revision",
    "head_revision",
    "is_migrated",
    "migrate",
    "readiness",
    "refused_values",
    "snapshot",
    "transaction_time",
    "unavailable",
    "unavailable_as_not_ready",
]
