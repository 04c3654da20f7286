#!/usr/bin/env bash
# Generate Python code and typed stubs from protos/ into the bastion package (`make protos`).
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: the repository root; `make lint` uses a scratch folder
# to check that the committed code is what the protos generate).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$root}" && cd "${1:-$root}" && pwd)"
bin="$root/.venv/bin"
cd "$root/protos"
mapfile -t files < <(find bastion -name '*.proto' | sort)
"$bin/python" -m grpc_tools.protoc -I . --plugin=protoc-gen-mypy="$bin/protoc-gen-mypy" \
  --python_out="$out" --grpc_python_out="$out" --mypy_out=quiet:"$out" "${files[@]}"
# Every generated folder is a package, so imports such as bastion.events.v1.envelope_pb2 resolve.
for file in "${files[@]}"; do
  dir="$out/$(dirname "$file")"
  while [ "$dir" != "$out" ]; do
    [ -f "$dir/__init__.py" ] || : > "$dir/__init__.py"
    dir="$(dirname "$dir")"
  done
done
