"""The event tables (outbox, inbox, sequences) of the audit service's own schema.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "event_outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), primary_key=True),
        sa.Column("event_id", sa.String(36), nullable=False, unique=True),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("partition_key", sa.String(200), nullable=False),
        sa.Column("envelope", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("sent_at", sa.DateTime(timezone=True)),
        if_not_exists=True,
    )
    op.create_index("event_outbox_unsent", "event_outbox", ["id"], postgresql_where=sa.text("sent_at IS NULL"),
                    if_not_exists=True)
    op.create_table(
        "event_producer_sequence",
        sa.Column("aggregate_id", sa.String(200), primary_key=True),
        sa.Column("last_sequence", sa.BigInteger(), nullable=False),
        if_not_exists=True,
    )
    op.create_table(
        "event_inbox",
        sa.Column("event_id", sa.String(36), primary_key=True),
        sa.Column("producer", sa.String(100), nullable=False),
        sa.Column("aggregate_id", sa.String(200), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        if_not_exists=True,
    )
    op.create_table(
        "event_consumer_sequence",
        sa.Column("producer", sa.String(100), primary_key=True),
        sa.Column("aggregate_id", sa.String(200), primary_key=True),
        sa.Column("last_sequence", sa.BigInteger(), nullable=False),
        if_not_exists=True,
    )
    op.create_table(
        "event_held",
        sa.Column("producer", sa.String(100), primary_key=True),
        sa.Column("aggregate_id", sa.String(200), primary_key=True),
        sa.Column("sequence", sa.BigInteger(), primary_key=True),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("envelope", sa.LargeBinary(), nullable=False),
        sa.Column("held_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_table("event_held")
    op.drop_table("event_consumer_sequence")
    op.drop_table("event_inbox")
    op.drop_table("event_producer_sequence")
    op.drop_table("event_outbox")
