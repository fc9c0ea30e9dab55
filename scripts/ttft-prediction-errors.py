#!/usr/bin/env python3
"""Where kvgate's TTFT predictions miss, from its decision logs (`--decision-log`).

    python3 scripts/ttft-prediction-errors.py [--skip N] [--burst-ms MS] LOG...

Each LOG is one gateway run's decision log (one JSON receipt per request). The first N
requests of each run by decision time (default 40: learning from the hardware prior) are left
out. Requests that reached one endpoint within MS ms of the previous one (default 40) form a
burst; a request's position is its place in its burst. Prints, over all requests and by group
(cold prompts or prefix hits, an empty or a non-empty queue ahead at the decision, position in
the burst, burst size): the count, the mean of |predicted - measured| / measured (MAPE), the
mean signed error (bias: negative means predicted too short) and the mean measured and
predicted TTFT. `scripts/real-vllm-ab.sh` keeps these logs with KVGATE_DECISION_LOG_DIR set.
"""
import argparse
import json
import statistics


def load(path, skip):
    with open(path) as f:
        receipts = sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r["ts_ms"])
    rows = []
    for i, r in enumerate(receipts):
        outcome = r.get("outcome") or {}
        if i < skip or outcome.get("ttft_ms") is None or r.get("predicted_ttft_ms") is None:
            continue
        chosen = next((c for c in r["candidates"] if c["endpoint"] == r["chosen"]), {})
        rows.append({
            "ts": r["ts_ms"], "endpoint": r["chosen"], "predicted": r["predicted_ttft_ms"],
            "measured": outcome["ttft_ms"], "cached": outcome.get("cached_tokens") or 0,
            "queued": chosen.get("queued_prefill_tokens", 0),
        })
    return rows


def mark_bursts(rows, gap_ms):
    for endpoint in {r["endpoint"] for r in rows}:
        burst = []
        for r in sorted((r for r in rows if r["endpoint"] == endpoint), key=lambda r: r["ts"]):
            if burst and r["ts"] - burst[-1]["ts"] > gap_ms:
                close(burst)
                burst = []
            burst.append(r)
        close(burst)


def close(burst):
    for k, r in enumerate(burst):
        r["position"], r["size"] = k, len(burst)


def report(name, rows):
    rows = [r for r in rows if r["measured"] > 0]
    if not rows:
        return
    errors = [(r["predicted"] - r["measured"]) / r["measured"] for r in rows]
    print(f"{name:24} {len(rows):5d} {100 * statistics.mean(abs(e) for e in errors):7.1f}% "
          f"{100 * statistics.mean(errors):+7.1f}% {statistics.mean(r['measured'] for r in rows):9.0f} "
          f"{statistics.mean(r['predicted'] for r in rows):9.0f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip", type=int, default=40)
    p.add_argument("--burst-ms", type=float, default=40.0)
    p.add_argument("logs", nargs="+")
    a = p.parse_args()
    rows = []
    for path in a.logs:
        run = load(path, a.skip)
        mark_bursts(run, a.burst_ms)
        rows += run
    print(f"{'group':24} {'n':>5} {'MAPE':>8} {'bias':>8} {'meas ms':>9} {'pred ms':>9}")
    report("all", rows)
    report("cold prompt", [r for r in rows if r["cached"] == 0])
    report("prefix hit", [r for r in rows if r["cached"] > 0])
    report("nothing queued ahead", [r for r in rows if r["queued"] == 0])
    report("queue ahead", [r for r in rows if r["queued"] > 0])
    for k in range(max((r["position"] for r in rows), default=-1) + 1):
        report(f"position {k} in burst", [r for r in rows if r["position"] == k])
    for n in sorted({r["size"] for r in rows}):
        report(f"bursts of {n}", [r for r in rows if r["size"] == n])


if __name__ == "__main__":
    main()
