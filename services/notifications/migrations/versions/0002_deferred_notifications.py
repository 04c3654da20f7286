"""Drafts waiting for the AccountOpened of their account (it may arrive after a transfer, from another partition).

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
        "deferred_notifications",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), primary_key=True),
        sa.Column("account_id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("text", sa.String(1000), nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        if_not_exists=True,  # like 0001: a dev database that create_all set up is adopted
    )
    op.create_index("ix_deferred_notifications_account_id", "deferred_notifications", ["account_id"],
                    if_not_exists=True)


def downgrade() -> None:
    op.drop_index("ix_deferred_notifications_account_id", table_name="deferred_notifications")
    op.drop_table("deferred_notifications")
