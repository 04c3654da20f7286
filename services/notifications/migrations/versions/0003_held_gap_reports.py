"""Held events keep where they were read, and when the gap they wait behind was reported
(bastion/events/migration_steps.py).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from collections.abc import Sequence

from bastion.events.migration_steps import add_gap_reports, drop_gap_reports

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    add_gap_reports()


def downgrade() -> None:
    drop_gap_reports()
