"""send groups and dispatch generations

Deliveries of one event on one channel with the same rendered content and due time form a send group,
attempted with one provider call (``deliveries.send_group``; NULL: the delivery goes alone); each attempt
row records the group it went with. ``dispatch_generation`` numbers each deliberate re-dispatch of a
delivery (or of its group) to QStash, whose deduplication id carries it; ``gave_up_generation`` records
that QStash gave up on a generation's message, and ``gave_up_count`` how often it did since the last
operator retry.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 16:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("send_group", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("dispatch_generation", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("gave_up_generation", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("gave_up_count", sa.Integer(), server_default="0", nullable=False))
        batch.create_index("ix_deliveries_send_group", ["send_group"], unique=False)
    with op.batch_alter_table("delivery_attempts") as batch:
        batch.add_column(sa.Column("send_group", sa.Uuid(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("delivery_attempts") as batch:
        batch.drop_column("send_group")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_send_group")
        batch.drop_column("gave_up_count")
        batch.drop_column("gave_up_generation")
        batch.drop_column("dispatch_generation")
        batch.drop_column("send_group")
