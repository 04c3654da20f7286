#!/usr/bin/env bash
# Install the Python packages of a hash lock into a virtualenv (`make setup` runs it with requirements.lock).
# Usage: scripts/install_locked_deps.sh VENV LOCK
#
# Every file pip downloads must match a SHA-256 of the lock: a package altered on the index, or swapped on the
# way, is refused before anything is installed. Only wheels are accepted, so no package runs build code of its
# own on this machine, and nothing is resolved afresh (--no-deps): the lock's pins are all that is installed.
set -euo pipefail
venv="${1:?usage: $0 VENV LOCK}"
lock="${2:?usage: $0 VENV LOCK}"
"$venv/bin/pip" install --quiet --require-hashes --no-deps --only-binary :all: -r "$lock"
