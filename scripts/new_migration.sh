#!/usr/bin/env bash
# Create a service's next migration, numbered after its last one: services/SERVICE/migrations/versions/NNNN_slug.py.
# Usage: scripts/new_migration.sh SERVICE "what it changes"
# Then write upgrade() and downgrade() by hand, change the service's tables in adapters/postgres.py to match, and
# run tests/integration/test_migrations.py: it compares the migrated database with those tables.
set -euo pipefail
usage='usage: scripts/new_migration.sh SERVICE "what it changes"'
root="$(cd "$(dirname "$0")/.." && pwd)"
service="${1:?$usage}"
message="${2:?$usage}"
migrations="$root/services/$service/migrations"
[ -f "$migrations/env.py" ] || { echo "service '$service' has no migrations: $migrations/env.py is missing" >&2; exit 1; }
last="$(find "$migrations/versions" -maxdepth 1 -name '[0-9][0-9][0-9][0-9]_*.py' -printf '%f\n' | sort | tail -n 1)"
last_number="${last:0:4}"
next="$(printf '%04d' $((10#${last_number:-0} + 1)))"
# The services run their migrations from code (bastion.migrations); this throwaway file only tells the alembic
# command line where this service's scripts are and how to name the new one.
config="$(mktemp)"
trap 'rm -f "$config"' EXIT
printf '[alembic]\nscript_location = %s\npath_separator = os\nfile_template = %%%%(rev)s_%%%%(slug)s\n' \
  "$migrations" > "$config"
"$root/.venv/bin/alembic" -c "$config" revision --rev-id "$next" -m "$message"
