"""delivery query indexes

Indexes for ``GET /v1/deliveries`` and the dashboard: by status (and channel) and by event type,
each ordered the way the listing pages (created_at desc, id desc). By user and by event are
served by indexes from 0001.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_deliveries_status_channel_created", "deliveries", ["status", "channel", "created_at", "id"], unique=False
    )
    op.create_index("ix_deliveries_type_created", "deliveries", ["event_type", "created_at", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_deliveries_type_created", table_name="deliveries")
    op.drop_index("ix_deliveries_status_channel_created", table_name="deliveries")
