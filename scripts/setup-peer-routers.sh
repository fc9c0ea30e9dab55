#!/usr/bin/env bash
# Installs the peer routers kvgate is compared with on real engines (PyPI sglang-router, SGLang's
# gateway "SMG"), idempotently, into a venv in the cache outside the clone, so later runs on the
# same machine reuse it. Prints the venv's python on its last line.
#
# Pinned so the comparison figures stay comparable between runs; bump deliberately.
set -euo pipefail

cache=${KVGATE_CACHE:-$HOME/.cache/kvgate}
venv=$cache/routers-venv
py=${PYTHON:-python3}
sglang_router=0.3.2
mkdir -p "$cache"
exec 9>"$cache/.setup-peer-routers.lock"
flock 9

if [ ! -f "$venv/.complete-$sglang_router" ]; then
  echo "setup-peer-routers: installing sglang-router $sglang_router into $venv" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "sglang-router==$sglang_router"
  "$venv/bin/python" -m sglang_router.launch_router --help >/dev/null
  touch "$venv/.complete-$sglang_router"
fi
echo "$venv/bin/python"
