#!/usr/bin/env bash
# Install the node tools of package-lock.json (buf, for `make lint`) into DIR/node_modules.
# Usage: scripts/install_locked_node_tools.sh [DIR]   (default: the repository root)
#
# `npm ci` installs exactly what package-lock.json names and checks each registry package against the lock's
# integrity digest (SHA-512). --ignore-scripts: no package's install script runs on this machine (buf's own would
# fetch its binary when the platform's package is missing; the locked platform package is what runs instead).
set -euo pipefail
cd "${1:-$(dirname "$0")/..}"
npm ci --silent --no-audit --no-fund --ignore-scripts
