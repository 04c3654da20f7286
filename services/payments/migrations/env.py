"""The Alembic environment of the payments migrations, run by `bastion.migrations`: the service's own tables
and the event tables (outbox, inbox, sequences) every service keeps."""

from bastion.events.storage import EVENTS_METADATA
from bastion.migrations import run_migrations
from services.payments.adapters.postgres import METADATA

run_migrations(METADATA, EVENTS_METADATA)
