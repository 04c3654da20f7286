"""Where each alert rule last raised an alert per key, so that a restarted detector does not count those refusals
again (services/audit/adapters/postgres.py, bastion/audit/alerts.py).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "alert_marks",
        sa.Column("rule", sa.String(63), primary_key=True),
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_table("alert_marks")
