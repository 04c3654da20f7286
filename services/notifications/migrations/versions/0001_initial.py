"""The notifications, account owners and recipients tables, and the event tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Every table is created `if_not_exists`: a database that `create_all` set up before migrations existed (a dev
stack) is adopted as it is, and `bastion.migrations.check` shows whether it matches the tables declared in code.
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
        "notifications",
        sa.Column("notification_id", sa.String(36), primary_key=True),
        sa.Column("recipient", sa.String(100), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("text", sa.String(1000), nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("recipient", "sequence", name="one_notification_per_sequence"),
        if_not_exists=True,
    )
    op.create_table(
        "account_owners",
        sa.Column("account_id", sa.String(36), primary_key=True),
        sa.Column("owner", sa.String(100), nullable=False),
        if_not_exists=True,
    )
    op.create_table(
        "recipients",
        sa.Column("recipient", sa.String(100), primary_key=True),
        sa.Column("last_sequence", sa.BigInteger(), nullable=False),
        sa.Column("email_key_id", sa.String(100)),
        sa.Column("email_sealed", sa.LargeBinary()),
        sa.CheckConstraint("(email_key_id IS NULL) = (email_sealed IS NULL)", name="sealed_email_names_its_key"),
        if_not_exists=True,
    )
    # The event tables of bastion.events.storage, as every service keeps them.
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
    op.drop_table("recipients")
    op.drop_table("account_owners")
    op.drop_table("notifications")
