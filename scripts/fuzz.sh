#!/usr/bin/env bash
# Runs kvgate's cargo-fuzz targets (fuzz/, not part of the main workspace or CI).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 60 s for each of every target
#
# FUZZ_RUNS=N stops a target after N executions if that comes before SECONDS (for a campaign
# that must reach a count, e.g. FUZZ_RUNS=10000000, without guessing the time it needs).
#
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz). Each target starts
# from its committed seeds (fuzz/seeds/<target>) and grows a working corpus in
# fuzz/corpus/<target> (not committed); crashes land in fuzz/artifacts/<target>.
#
# Sanitizer: none by default. Every target's code is safe Rust (the workspace forbids unsafe),
# where AddressSanitizer finds nothing that the Rust checks (bounds, overflow: fuzz builds keep
# debug assertions) do not; without it a target runs 2-3x faster. Set FUZZ_SANITIZER=address
# to use it anyway. One process per target (libFuzzer's default; -jobs=N would fork N and log
# to files): the machine is shared. Full logs: fuzz/corpus/<target>.log.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(kv_event_batch metrics_text zmtp_peer openai_request extproc_messages)
fi
sanitizer="${FUZZ_SANITIZER:-none}"
runs=()
if [ -n "${FUZZ_RUNS:-}" ]; then
    runs=(-runs="$FUZZ_RUNS")
fi

# The OpenAI and ext_proc targets need the data-plane crates (see fuzz/Cargo.toml).
features=()
for t in "${targets[@]}"; do
    case "$t" in openai_request | extproc_messages) features=(--features data-plane) ;; esac
done
cargo +nightly fuzz build -s "$sanitizer" "${features[@]}"
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "== $t (${seconds}s)"
    status=0
    cargo +nightly fuzz run -s "$sanitizer" "${features[@]}" "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=4096 "${runs[@]}" \
        > "corpus/$t.log" 2>&1 || status=$?
    grep -E "stat::number_of_executed_units|stat::average_exec_per_sec|SUMMARY|Test unit written|panicked" \
        "corpus/$t.log" || true
    if [ "$status" -ne 0 ]; then
        echo "!! $t failed (exit $status); see fuzz/corpus/$t.log and fuzz/artifacts/$t"
        failed=1
    fi
done
exit "$failed"
