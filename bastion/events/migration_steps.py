"""Changes to the event tables every service keeps (`storage.EVENTS_METADATA`), written once and called from each
service's own Alembic revision. Each step can run on a schema that `create_all` already made in its new shape."""

import sqlalchemy as sa
from alembic import op


def add_gap_reports() -> None:
    """`event_held` keeps where each held event was read and the gap it was reported behind (`inbox.open_gaps`).
    Events held before this revision have neither: their gaps are reported at the consumer's first look."""
    op.add_column("event_held", sa.Column("source", sa.String(300)), if_not_exists=True)
    op.add_column("event_held", sa.Column("reported_gap", sa.BigInteger()), if_not_exists=True)


def drop_gap_reports() -> None:
    op.drop_column("event_held", "reported_gap")
    op.drop_column("event_held", "source")
