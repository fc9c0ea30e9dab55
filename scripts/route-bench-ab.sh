#!/usr/bin/env bash
# The routing core's decision time, before and after a change, in one command (issue 15.1):
#
#   scripts/route-bench-ab.sh [-r ROUNDS] [-f FILTER] [-n] BASE_REV
#
# Builds `crates/core`'s route benchmark and `pick_profile` example at BASE_REV (a git worktree
# and target directory under $AB_WORK, default /tmp/kvgate-route-ab, kept between runs) and in
# the working tree, then runs the two benchmarks interleaved, ROUNDS times each (default 2), so
# both see the same machine noise, and prints each benchmark's median time per round and the
# ratio of the means. FILTER is criterion's (default: kvgate's pick, the pick-and-book cycle
# and KV-event ingestion). Unless -n is given, callgrind also counts `Router::pick`'s
# instructions per pick on the benchmark fleet for both (repeatable where time is not: this
# machine is shared and noisy), for 10, 100 and 1,000 endpoints with 1k- and 32k-token prompts
# and the served fleet. Needs valgrind (apt-get install valgrind).
set -euo pipefail

ROUNDS=2
FILTER='pick_kvgate|kv_event_ingest|pick_and_book'
CALLGRIND=1
while getopts "r:f:n" opt; do
  case $opt in
    r) ROUNDS=$OPTARG ;;
    f) FILTER=$OPTARG ;;
    n) CALLGRIND=0 ;;
    *) echo "usage: $0 [-r ROUNDS] [-f FILTER] [-n] BASE_REV" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [ $# -ne 1 ]; then
  echo "usage: $0 [-r ROUNDS] [-f FILTER] [-n] BASE_REV" >&2
  exit 2
fi
ROOT=$(git rev-parse --show-toplevel)
BASE_REV=$(git -C "$ROOT" rev-parse --verify "$1^{commit}")
WORK=${AB_WORK:-/tmp/kvgate-route-ab}
mkdir -p "$WORK"
BASE_TREE="$WORK/tree"
BASE_TARGET="$WORK/target"
if [ -d "$BASE_TREE" ]; then
  git -C "$BASE_TREE" checkout -q --detach "$BASE_REV"
else
  git -C "$ROOT" worktree add -q --detach "$BASE_TREE" "$BASE_REV"
fi
# The benchmark binary is the newest `route-*` executable a build leaves in deps/.
build() { # tree target → path of the bench binary
  (cd "$1" && CARGO_TARGET_DIR="$2" cargo bench -q -p kvgate-core --bench route --no-run >&2 \
    && CARGO_TARGET_DIR="$2" cargo build -q --release -p kvgate-core --example pick_profile >&2)
  ls -t "$2"/release/deps/route-* | grep -v '\.d$' | head -1
}
echo "building $BASE_REV in $BASE_TREE ..." >&2
BASE_BIN=$(build "$BASE_TREE" "$BASE_TARGET")
NEW_TARGET=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
echo "building the working tree ..." >&2
NEW_BIN=$(build "$ROOT" "$NEW_TARGET")

for r in $(seq 1 "$ROUNDS"); do
  for v in base new; do
    if [ $v = base ]; then bin=$BASE_BIN dir=$BASE_TREE; else bin=$NEW_BIN dir=$ROOT; fi
    echo "round $r: $v" >&2
    (cd "$dir/crates/core" && "$bin" --bench "$FILTER" --warm-up-time 1 --measurement-time 3 \
      --noplot 2>&1) > "$WORK/bench_${v}_$r.log"
  done
done

python3 - "$WORK" "$ROUNDS" <<'PYEOF'
import re, sys, collections
work, rounds = sys.argv[1], int(sys.argv[2])
unit = {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3, "s": 1e6}
times = collections.defaultdict(lambda: collections.defaultdict(list))
order = []
for v in ("base", "new"):
    for r in range(1, rounds + 1):
        name = None
        for line in open(f"{work}/bench_{v}_{r}.log", encoding="utf-8"):
            m = re.match(r"^([A-Za-z_]\S*/\S+)", line)
            if m:
                name, taken = m.group(1), False
                if name not in order:
                    order.append(name)
            t = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+) ", line)
            if t and name and not taken and t.group(2) in unit:
                times[name][v].append(float(t.group(1)) * unit[t.group(2)])
                taken = True
print(f"{'benchmark (µs, median per round)':44} {'base':>20} {'new':>20} {'new/base':>9}")
for name in order:
    b, n = times[name]["base"], times[name]["new"]
    if not b or not n:
        continue
    fmt = lambda xs: " ".join(f"{x:9.3f}" for x in xs)
    print(f"{name:44} {fmt(b):>20} {fmt(n):>20} {sum(n) / len(n) / (sum(b) / len(b)):9.2f}")
PYEOF

if [ "$CALLGRIND" = 1 ]; then
  echo
  printf '%-28s %14s %14s %9s\n' "instructions per pick" base new new/base
  for args in "10 1024 2000" "10 32768 500" "100 1024 1000" "100 32768 200" "1000 1024 100" \
    "1000 32768 50" "100 1024 500 served" "1000 1024 50 served"; do
    picks=$(echo "$args" | awk '{print $3}')
    count() { # pick_profile binary → instructions per pick
      # shellcheck disable=SC2086 # $args is the example's argument list
      valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" --collect-atstart=no \
        --toggle-collect='*pick_loop*' "$1" $args 2>&1 \
        | awk -v picks="$picks" '/refs:/ {gsub(",", "", $NF); printf "%.0f", $NF / picks}'
    }
    b=$(count "$BASE_TARGET/release/examples/pick_profile")
    n=$(count "$NEW_TARGET/release/examples/pick_profile")
    printf '%-28s %14s %14s %9s\n' "$args" "$b" "$n" "$(awk -v b="$b" -v n="$n" 'BEGIN {printf "%.2f", n / b}')"
  done
fi
