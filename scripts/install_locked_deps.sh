#!/usr/bin/env bash
# Install the Python packages of a hash lock into a virtualenv, then the project itself (`make setup` runs it
# with requirements.lock). Usage: scripts/install_locked_deps.sh VENV LOCK [PROJECT]   (PROJECT: the folder to
# install editable; default the repository root; "-" installs the lock only)
#
# Every file pip downloads must match a SHA-256 of the lock: a package altered on the index, or swapped on the
# way, is refused before anything is installed. Only wheels are accepted, so no package runs build code of its
# own on this machine, and nothing is resolved afresh (--no-deps): the lock's pins are all that is installed.
# The project is installed with no index and no build isolation: its build backend is the lock's setuptools,
# never one fetched unchecked into a build environment.
set -euo pipefail
venv="${1:?usage: $0 VENV LOCK [PROJECT]}"
lock="${2:?usage: $0 VENV LOCK [PROJECT]}"
project="${3:-$(cd "$(dirname "$0")/.." && pwd)}"
"$venv/bin/pip" install --quiet --require-hashes --no-deps --only-binary :all: -r "$lock"
if [ "$project" != "-" ]; then
  "$venv/bin/pip" install --quiet --no-index --no-deps --no-build-isolation -e "$project"
fi
