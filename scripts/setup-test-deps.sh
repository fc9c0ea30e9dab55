#!/usr/bin/env bash
# Installs what kvgate's tests need besides the Rust toolchain, idempotently: Python packages used
# as independent peers (pyzmq publisher/subscriber, msgpack and cbor2 decoders, the openai SDK).
# Safe to run repeatedly; installs only what is missing.
set -euo pipefail

py=${PYTHON:-python3}
command -v "$py" >/dev/null || { echo "setup-test-deps: $py not found; install Python 3" >&2; exit 1; }

need=()
for spec in zmq:pyzmq msgpack:msgpack cbor2:cbor2 openai:openai; do
  mod=${spec%%:*} pkg=${spec##*:}
  "$py" -c "import $mod" 2>/dev/null || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup-test-deps: installing ${need[*]}"
  "$py" -m pip install --quiet --disable-pip-version-check "${need[@]}"
fi
