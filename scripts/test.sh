#!/usr/bin/env bash
# The project's test command (README, "Tests"): installs test peers, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-test-deps.sh
scripts/setup-envoy.sh >/dev/null
cargo test --workspace --all-targets "$@"
