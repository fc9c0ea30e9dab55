#!/usr/bin/env bash
# What `kvgate serve` adds over a direct connection to an engine, in one command, so a change to
# the request path can be compared before/after (issue 15.3):
#
#   scripts/proxy-overhead.sh [-r ROUNDS] [-d SECONDS] [-n CALLGRIND_REQUESTS] [-e] [BIN ...]
#
# One simulated engine (`kvgate sim`, time scale 1000: a 1-token answer takes microseconds of
# simulated time) is started from the first BIN. Then, for each round and each BIN in turn
# (interleaved, so baseline and candidate see the same machine noise), a gateway from that BIN
# is started in front of it and wrk measures, directly and through the gateway:
#   - latency: 1 connection, small non-streaming chat request (max_tokens 1), p50/p99;
#   - throughput: 64 connections, same request, req/s, with the CPU seconds each process (wrk,
#     engine, gateway) spent per request, read from /proc (2 shared cores: the three compete);
# and, once per BIN, callgrind counts the gateway's instructions (deterministic, unlike time on
# this machine) per small request and per relayed SSE frame (streams of 1 and 33 tokens at time
# scale 1, so each token arrives as its own frame: the slope is the per-frame cost).
# With -e, each round also measures the same two figures through a plain Envoy HTTP proxy in
# front of the engine (no ext_proc, no routing; one worker thread, as the gateways get with
# GW_WORKERS=1; Envoy from scripts/setup-envoy.sh): what any proxy hop costs on this machine.
# Medians over the rounds are printed per BIN. Defaults: 5 rounds of 5 s, 200 callgrind requests,
# BIN = target/release/kvgate; -r 0 runs callgrind only, -n 0 skips it; GW_WORKERS=N runs the
# gateways with N tokio worker threads (TOKIO_WORKER_THREADS; default: one per core). Each window's profile is kept
# (callgrind_annotate WORK/cg.I.PID.N; parts: 2 idle, 4 small requests, 6 and 8 streams). Needs wrk, valgrind, curl (apt-get install wrk valgrind curl).
set -euo pipefail

ROUNDS=5
DURATION=5
CG_REQUESTS=200
WITH_ENVOY=0
while getopts "r:d:n:e" opt; do
  case $opt in
    r) ROUNDS=$OPTARG ;;
    d) DURATION=$OPTARG ;;
    n) CG_REQUESTS=$OPTARG ;;
    e) WITH_ENVOY=1 ;;
    *) echo "usage: $0 [-r ROUNDS] [-d SECONDS] [-n CALLGRIND_REQUESTS] [-e] [BIN ...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
BINS=("$@")
[ ${#BINS[@]} -gt 0 ] || BINS=(target/release/kvgate)
for tool in wrk valgrind callgrind_control curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y wrk valgrind curl" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/proxy-overhead.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

MODEL=meta-llama/Llama-3.1-8B-Instruct
SIM_PORT=18000
GW_PORT=18080
ADMIN_PORT=19090
small_body() {
  printf '{"model":"%s","messages":[{"role":"user","content":"hi"}],"max_tokens":1}' "$MODEL"
}
stream_body() {
  printf '{"model":"%s","messages":[{"role":"user","content":"hi"}],"max_tokens":%d,"stream":true}' "$MODEL" "$1"
}
cat >"$WORK/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '$(small_body)'
wrk.headers["Content-Type"] = "application/json"
EOF

wait_http() { # url
  for _ in $(seq 1 300); do
    curl -sf -o /dev/null "$1" && return 0
    sleep 0.1
  done
  echo "not up: $1" >&2
  return 1
}

TIMEFORMAT='%U %S'
# CPU seconds (user + system) of process $1 and its threads.
cpu_s() { awk '{ printf "%.2f", ($14 + $15) / 100 }' "/proc/$1/stat"; }
# Of those, system (kernel) seconds.
sys_s() { awk '{ printf "%.2f", $15 / 100 }' "/proc/$1/stat"; }

start_sim() { # bin time_scale
  "$1" sim --port $SIM_PORT --zmq-port 0 --time-scale "$2" >"$WORK/sim.log" 2>&1 &
  SIM_PID=$!
  PIDS+=("$SIM_PID")
  wait_http "http://127.0.0.1:$SIM_PORT/health"
}
stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

start_gw() { # bin [extra runner...]
  local bin=$1
  shift
  env ${GW_WORKERS:+TOKIO_WORKER_THREADS=$GW_WORKERS} "$@" "$bin" serve --host 127.0.0.1 --port $GW_PORT --admin-port $ADMIN_PORT \
    --endpoint 127.0.0.1:$SIM_PORT --scrape-interval-ms "${SCRAPE_MS:-100}" \
    >"$WORK/gw.log" 2>&1 &
  GW_PID=$!
  PIDS+=("$GW_PID")
  for _ in $(seq 1 600); do
    curl -sf -o /dev/null "http://127.0.0.1:$ADMIN_PORT/ready" && return 0
    sleep 0.1
  done
  echo "gateway not ready" >&2
  cat "$WORK/gw.log" >&2
  return 1
}

# wrk -c $1 against $2; prints "p50_us p99_us req_per_s".
run_wrk() {
  wrk -t1 -c"$1" -d"${DURATION}s" --latency -s "$WORK/post.lua" "$2" >"$WORK/wrk.out"
  awk '
    function us(v) { if (v ~ /us$/) return v + 0; if (v ~ /ms$/) return v * 1000; if (v ~ /s$/) return v * 1e6; return v }
    $1 == "50%" { p50 = us($2) } $1 == "99%" { p99 = us($2) } $1 == "Requests/sec:" { rps = $2 }
    END { printf "%.0f %.0f %.0f\n", p50, p99, rps }' "$WORK/wrk.out"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

DIRECT=http://127.0.0.1:$SIM_PORT/v1/chat/completions
VIA=http://127.0.0.1:$GW_PORT/v1/chat/completions
ENVOY_PORT=18090
ENVOY_URL=http://127.0.0.1:$ENVOY_PORT/v1/chat/completions

if [ "$WITH_ENVOY" = 1 ]; then
  ENVOY_BIN=$("$(dirname "$0")/setup-envoy.sh" | tail -1)
  cat >"$WORK/envoy.yaml" <<EOF
static_resources:
  listeners:
  - address: {socket_address: {address: 127.0.0.1, port_value: $ENVOY_PORT}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: plain
          route_config:
            virtual_hosts:
            - {name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: engine}}]}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: engine
    type: STATIC
    load_assignment:
      cluster_name: engine
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $SIM_PORT}}}}]}]
EOF
fi

echo "# proxy overhead: ${ROUNDS} rounds x ${DURATION}s, bins: ${BINS[*]} (files in $WORK)"
start_sim "${BINS[0]}" 1000
wrk -t1 -c8 -d2s -s "$WORK/post.lua" "$DIRECT" >/dev/null # warm the engine
for round in $(seq 1 "$ROUNDS"); do
  for i in "${!BINS[@]}"; do
    start_gw "${BINS[$i]}"
    wrk -t1 -c8 -d1s -s "$WORK/post.lua" "$VIA" >/dev/null
    read -r d50 d99 _ < <(run_wrk 1 "$DIRECT")
    read -r v50 v99 _ < <(run_wrk 1 "$VIA")
    read -r _ _ drps < <(run_wrk 64 "$DIRECT")
    s0=$(cpu_s "$SIM_PID"); g0=$(cpu_s "$GW_PID"); k0=$(sys_s "$GW_PID")
    { time run_wrk 64 "$VIA" >"$WORK/via64"; } 2>"$WORK/wrk.time"
    read -r _ _ vrps <"$WORK/via64"
    s1=$(cpu_s "$SIM_PID"); g1=$(cpu_s "$GW_PID"); k1=$(sys_s "$GW_PID")
    per_req() { awk -v a="$1" -v b="$2" -v r="$vrps" -v d="$DURATION" 'BEGIN { printf "%.1f", (b - a) * 1e6 / (r * d) }'; }
    cpu_engine=$(per_req "$s0" "$s1"); cpu_gw=$(per_req "$g0" "$g1")
    cpu_wrk=$(per_req 0 "$(awk '{ print $1 + $2 }' "$WORK/wrk.time")")
    sys_gw=$(per_req "$k0" "$k1")
    echo "$round $i $d50 $d99 $v50 $v99 $drps $vrps $cpu_engine $cpu_gw $cpu_wrk $sys_gw" >>"$WORK/rounds"
    printf 'round %d bin %d: 1 conn direct p50 %sus p99 %sus, via p50 %sus p99 %sus | 64 conns direct %s req/s, via %s req/s (%.2fx) | CPU per request at 64 via: engine %sus gateway %sus (kernel %sus) wrk %sus\n' \
      "$round" "$i" "$d50" "$d99" "$v50" "$v99" "$drps" "$vrps" "$(awk -v a="$vrps" -v b="$drps" 'BEGIN { print a / b }')" \
      "$cpu_engine" "$cpu_gw" "$sys_gw" "$cpu_wrk"
    stop_pid "$GW_PID"
  done
  if [ "$WITH_ENVOY" = 1 ]; then
    "$ENVOY_BIN" -c "$WORK/envoy.yaml" --concurrency 1 -l error --base-id $((RANDOM + 1000)) >"$WORK/envoy.log" 2>&1 &
    ENVOY_PID=$!
    PIDS+=("$ENVOY_PID")
    wait_http "http://127.0.0.1:$ENVOY_PORT/health"
    wrk -t1 -c8 -d1s -s "$WORK/post.lua" "$ENVOY_URL" >/dev/null
    read -r d50 d99 _ < <(run_wrk 1 "$DIRECT")
    read -r v50 v99 _ < <(run_wrk 1 "$ENVOY_URL")
    read -r _ _ drps < <(run_wrk 64 "$DIRECT")
    read -r _ _ vrps < <(run_wrk 64 "$ENVOY_URL")
    echo "$round envoy $d50 $d99 $v50 $v99 $drps $vrps" >>"$WORK/rounds"
    printf 'round %d envoy: 1 conn direct p50 %sus p99 %sus, via p50 %sus p99 %sus | 64 conns direct %s req/s, via %s req/s (%.2fx)\n' \
      "$round" "$d50" "$d99" "$v50" "$v99" "$drps" "$vrps" "$(awk -v a="$vrps" -v b="$drps" 'BEGIN { print a / b }')"
    stop_pid "$ENVOY_PID"
  fi
done

echo
[ "$ROUNDS" -gt 0 ] && echo "# medians over $ROUNDS rounds"
for i in "${!BINS[@]}"; do
  [ "$ROUNDS" -gt 0 ] || break
  col() { awk -v i="$i" -v c="$1" '$2 == i { print $c }' "$WORK/rounds" | median; }
  d50=$(col 3); d99=$(col 4); v50=$(col 5); v99=$(col 6); drps=$(col 7); vrps=$(col 8)
  added50=$(awk -v i="$i" '$2 == i { print $5 - $3 }' "$WORK/rounds" | median)
  added99=$(awk -v i="$i" '$2 == i { print $6 - $4 }' "$WORK/rounds" | median)
  ratio=$(awk -v i="$i" '$2 == i { print $8 / $7 }' "$WORK/rounds" | median)
  printf '%s: 1 conn p50 direct %s via %s (added %s us), p99 direct %s via %s (added %s us) | 64 conns direct %s via %s req/s, ratio %.2f | CPU/request at 64 via: engine %s us, gateway %s us (kernel %s us), wrk %s us\n' \
    "${BINS[$i]}" "$d50" "$v50" "$added50" "$d99" "$v99" "$added99" "$drps" "$vrps" "$ratio" "$(col 9)" "$(col 10)" "$(col 12)" "$(col 11)"
done
if [ "$ROUNDS" -gt 0 ] && [ "$WITH_ENVOY" = 1 ]; then
  col() { awk -v c="$1" '$2 == "envoy" { print $c }' "$WORK/rounds" | median; }
  printf 'envoy (plain proxy, no routing): 1 conn p50 direct %s via %s (added %s us), p99 direct %s via %s (added %s us) | 64 conns direct %s via %s req/s, ratio %.2f\n' \
    "$(col 3)" "$(col 5)" "$(awk '$2 == "envoy" { print $5 - $3 }' "$WORK/rounds" | median)" \
    "$(col 4)" "$(col 6)" "$(awk '$2 == "envoy" { print $6 - $4 }' "$WORK/rounds" | median)" \
    "$(col 7)" "$(col 8)" "$(awk '$2 == "envoy" { print $8 / $7 }' "$WORK/rounds" | median)"
fi

# Callgrind: instructions per small request and per relayed SSE frame, in the gateway only.
[ "$CG_REQUESTS" -gt 0 ] || exit 0
stop_pid "$SIM_PID"
start_sim "${BINS[0]}" 1
cg_total() { # callgrind output file: total instructions
  awk '/^(summary|totals):/ { print $2; exit }' "$1"
}
echo
echo "# callgrind (gateway instructions; scrapes every 10 min so none lands in a window; an idle window is subtracted per second)"
for i in "${!BINS[@]}"; do
  out="$WORK/cg.$i"
  SCRAPE_MS=600000 start_gw "${BINS[$i]}" valgrind --tool=callgrind --callgrind-out-file="$out.%p" --dump-instr=no --compress-strings=no --compress-pos=no
  seq_req() { # n body: n requests one after another on one keep-alive connection, as wrk sends
    local args=()
    for _ in $(seq 1 "$1"); do args+=(-o /dev/null "$VIA"); done
    curl -sf -H 'content-type: application/json' -d "$2" "${args[@]}"
  }
  seq_req 20 "$(small_body)"
  seq_req 5 "$(stream_body 33)"
  dump() { callgrind_control -d "$1" "$GW_PID" >/dev/null 2>&1; sleep 0.5; }
  window() { # label command...: prints "instructions seconds"
    local label=$1
    shift
    dump "pre-$label"
    local t0 t1
    t0=$(date +%s%N)
    "$@"
    t1=$(date +%s%N)
    dump "$label"
    local f
    f=$(ls -t "$out".* | head -1)
    echo "$(cg_total "$f") $(awk -v a="$t0" -v b="$t1" 'BEGIN { print (b - a) / 1e9 }')"
  }
  read -r idle_ir idle_s < <(window idle sleep 3)
  rate=$(awk -v a="$idle_ir" -v s="$idle_s" 'BEGIN { print a / s }')
  read -r small_ir small_s < <(window small seq_req "$CG_REQUESTS" "$(small_body)")
  n_streams=$((CG_REQUESTS / 10))
  read -r s1_ir s1_s < <(window stream1 seq_req "$n_streams" "$(stream_body 1)")
  read -r s33_ir s33_s < <(window stream33 seq_req "$n_streams" "$(stream_body 33)")
  awk -v bin="${BINS[$i]}" -v rate="$rate" -v n="$CG_REQUESTS" -v m="$n_streams" \
    -v a="$small_ir" -v as="$small_s" -v b="$s1_ir" -v bs="$s1_s" -v c="$s33_ir" -v cs="$s33_s" 'BEGIN {
      small = (a - rate * as) / n
      s1 = (b - rate * bs) / m; s33 = (c - rate * cs) / m
      printf "%s: %.0f instructions per small request; stream of 1 token %.0f, of 33 tokens %.0f: %.0f instructions per relayed SSE frame (idle %.0f/s)\n", bin, small, s1, s33, (s33 - s1) / 32, rate
    }'
  stop_pid "$GW_PID"
done
