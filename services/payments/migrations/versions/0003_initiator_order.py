"""ListPayments reads one initiator's payments a page at a time, newest first: an index in creation order (read
backwards).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("payments_initiator_order", "payments", ["initiated_by", "created_at", "payment_id"],
                    if_not_exists=True)


def downgrade() -> None:
    op.drop_index("payments_initiator_order", "payments", if_exists=True)
