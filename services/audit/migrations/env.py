"""The Alembic environment of the audit service's own tables: the event tables (its outbox carries the security
records and alerts it raises) and the alert detector's marks. The hash-chained log itself is not here:
`bastion.audit.postgres.install` creates it as the database owner at set-up, so that this service's role can only
INSERT into it and SELECT from it."""

from bastion.events.storage import EVENTS_METADATA
from bastion.migrations import run_migrations
from services.audit.adapters.postgres import ALERTS_METADATA

run_migrations(EVENTS_METADATA, ALERTS_METADATA)
