#!/usr/bin/env bash
# Installs what the deployment tests (tests/monitoring.rs, tests/manifests.rs) need, idempotently:
# - Prometheus and promtool (Debian package `prometheus`), to scrape real kvgate processes,
#   evaluate the shipped dashboard and alert rules, and check the rules and example config. The
#   package's service is not started (the tests run their own Prometheus on loopback).
# - kubernetes-validate (PyPI; it bundles the Kubernetes OpenAPI schemas, and jsonschema for the
#   InferencePool CRD check) in a venv under ~/.cache/kvgate, outside the clone, like
#   scripts/setup-vllm.sh. The tests find it there (or at $KVGATE_MANIFESTS_VENV).
# Prints the venv directory on its last line. Needs root or sudo for apt-get only when Prometheus
# is missing.
set -euo pipefail

cache=${KVGATE_CACHE:-$HOME/.cache/kvgate}
venv=${KVGATE_MANIFESTS_VENV:-$cache/manifests-venv}
validate_version=${KUBERNETES_VALIDATE_VERSION:-1.37.0}
py=${PYTHON:-python3}
log() { echo "setup-monitoring-deps: $*" >&2; }

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null; then
    as_root=(sudo)
  else
    log "prometheus/promtool missing and neither root nor sudo: install the Debian package 'prometheus'"
    exit 1
  fi
  log "installing the Debian package prometheus (prometheus, promtool)"
  # policy-rc.d and containers without systemd keep the packaged service from starting, and it
  # is not wanted anyway; --no-install-recommends skips node-exporter.
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >&2 ||
    { "${as_root[@]}" apt-get update -q >&2 &&
      "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >&2; }
fi
promtool --version 2>&1 | head -1 >&2

mkdir -p "$cache"
exec 9>"$cache/.setup-monitoring.lock"
flock 9
if [ ! -f "$venv/.complete-$validate_version" ]; then
  command -v "$py" >/dev/null || { log "$py not found; install Python 3"; exit 1; }
  log "installing kubernetes-validate==$validate_version into $venv"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==$validate_version"
  "$venv/bin/python" -c "import kubernetes_validate, jsonschema, yaml" >&2
  touch "$venv/.complete-$validate_version"
fi
echo "$venv"
