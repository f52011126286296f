"""revoked credentials

Credentials refused until they would have expired anyway, shared by every replica: a QStash signature's ``jti``
once it has been used (a captured signed request cannot be replayed, with another ``Upstash-Message-Id`` or
none, before its ``exp``), and a dashboard session's nonce once the operator signed out. The index on
``expires_at`` serves the purge of dead rows that each insert makes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "revoked_credentials",
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("credential_id", sa.String(length=200), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("kind", "credential_id", name=op.f("pk_revoked_credentials")),
    )
    op.create_index(op.f("ix_revoked_credentials_expires_at"), "revoked_credentials", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_revoked_credentials_expires_at"), table_name="revoked_credentials")
    op.drop_table("revoked_credentials")
