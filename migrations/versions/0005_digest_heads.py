"""digest heads

A message folded into a digest (``suppressed``/``digested``) records the head delivery it was folded into
(``deliveries.digest_head``), and a head's digest counts exactly the rows naming it. Before, a head counted
every folded row of its key created since the head, so one message folded while two heads of its key were open
(one retried after a failed attempt, one started while it was sending) was counted by both.

No index: the count reads the folded rows of the heads' keys through the index on (digest_key, status).
The upgrade attributes the folded rows of the digests still pending as the count did before, to the latest
pending head of their key created at or before them; a sent digest's rows are left as they are (NULL).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ATTRIBUTE_PENDING_DIGESTS = """
UPDATE deliveries SET digest_head = (
    SELECT head.id FROM deliveries AS head
    WHERE head.digest_key = deliveries.digest_key
      AND head.status IN ('queued', 'deferred', 'sending')
      AND head.created_at <= deliveries.created_at
    ORDER BY head.created_at DESC
    LIMIT 1
)
WHERE reason = 'digested'
  AND digest_key IN (SELECT digest_key FROM deliveries WHERE status IN ('queued', 'deferred', 'sending'))
"""


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("digest_head", sa.Uuid(), nullable=True))
    op.execute(_ATTRIBUTE_PENDING_DIGESTS)


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("digest_head")
