#!/usr/bin/env python3
"""Measures an engine's prefill cost and prints a kvgate hardware prior for it.

    python3 scripts/measure-step-cost.py --url http://127.0.0.1:8000 --model smollm2 \
        --kv-capacity-blocks 5000 --max-batched-tokens 2048 \
        [--reps 3] [--max-context 2048] [--class-name my-gpu]

Sends streaming `/v1/completions` with token-id prompts and `max_tokens: 1` to ONE idle engine
with prefix caching on (vLLM, SGLang, llama.cpp's server accept token-id prompts) and times the
first token: cold prompts of growing length, and new tokens after cached prefixes of growing
length (each prefix sent once first so the engine caches it). Then it fits kvgate's prefill step
model, `t = β0 + β1·n + β3·(n·c + n²/2)` for `n` new tokens after `c` cached ones (see
crates/core/src/cost.rs, "Attention over the context"), by least squares on relative errors,
and prints the measurements, the fit's and a linear fit's errors, and a `tuning.hardware` entry.

β2 (per running sequence in a step) is not measured here (it needs concurrent decodes); the
printed entry keeps the H100 prior's ratio of β2 to β1. Pure standard library: it runs with any
Python 3.8+, outside the engine's environment. The client's own time is in every figure, so run
it from a machine or core not shared with the engine.
"""
import argparse
import http.client
import json
import random
import statistics
import sys
import time
import urllib.parse


def first_token_ms(url, model, tokens):
    u = urllib.parse.urlparse(url)
    body = json.dumps({"model": model, "prompt": tokens, "max_tokens": 1, "stream": True,
                       "temperature": 0}).encode()
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        sys.exit(f"measure-step-cost: {resp.status} {resp.read()[:300]!r}")
    first = None
    for line in resp:
        if first is None and line.startswith(b"data:") and b"[DONE]" not in line:
            first = time.perf_counter() - t0
    conn.close()
    if first is None:
        sys.exit("measure-step-cost: the stream carried no token")
    return first * 1000.0


def solve3(m, v):
    """Solves the 3x3 system m·x = v (Cramer's rule)."""
    def det(a):
        return (a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
                - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
                + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]))
    d = det(m)
    out = []
    for k in range(3):
        a = [row[:] for row in m]
        for i in range(3):
            a[i][k] = v[i]
        out.append(det(a) / d)
    return out


def fit(rows, terms):
    """Least squares on relative errors of t ≈ Σ b_k·x_k over `terms` features."""
    k = len(terms)
    m = [[0.0] * 3 for _ in range(3)]
    v = [0.0] * 3
    for x, t in rows:
        x = [x[i] for i in terms] + [0.0] * (3 - k)
        w = 1.0 / (t * t)
        for i in range(3):
            for j in range(3):
                m[i][j] += w * x[i] * x[j]
            v[i] += w * x[i] * t
    for i in range(k, 3):
        m[i][i] = 1.0
    b = solve3(m, v)[:k]
    full = [0.0] * 3
    for i, c in zip(terms, b):
        full[i] = c
    mape = statistics.mean(abs(sum(c * xi for c, xi in zip(full, x)) - t) / t for x, t in rows)
    return full, mape


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="engine base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-context", type=int, default=2048,
                   help="longest cold prompt and cached prefix, tokens (under max_model_len)")
    p.add_argument("--vocab-low", type=int, default=1000)
    p.add_argument("--vocab-high", type=int, default=30000,
                   help="token ids are drawn from [low, high): inside the model's vocabulary")
    p.add_argument("--class-name", default="measured")
    p.add_argument("--kv-capacity-blocks", type=int, required=True,
                   help="the engine's KV blocks (vLLM logs 'GPU KV cache size'; for the entry)")
    p.add_argument("--max-batched-tokens", type=int, required=True,
                   help="the engine's max_num_batched_tokens (for the entry)")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    rnd = random.Random(a.seed)

    def tokens(n):
        return [rnd.randrange(a.vocab_low, a.vocab_high) for _ in range(n)]

    lengths = [n for n in (32, 128, 256, 512, 1024, 2048, 4096, 8192) if n <= a.max_context]
    contexts = [c for c in (256, 1024, 2048, 4096, 8192) if c <= a.max_context]
    news = [n for n in (32, 128, 512) if n <= a.max_context]
    for _ in range(3):
        first_token_ms(a.url, a.model, tokens(50))  # warm-up
    samples = {}
    for _ in range(a.reps):
        for n in lengths:
            samples.setdefault((0, n), []).append(first_token_ms(a.url, a.model, tokens(n)))
        for c in contexts:
            prefix = tokens(c)
            first_token_ms(a.url, a.model, prefix + tokens(16))  # cache the prefix
            for n in news:
                t = first_token_ms(a.url, a.model, prefix + tokens(n))
                samples.setdefault((c, n), []).append(t)
    def steps(n):
        """Engine steps of a prefill of n tokens: β0 is paid once per step."""
        return -(-n // a.max_batched_tokens)

    rows = []
    for (c, n), ts in samples.items():
        for t in ts:
            rows.append(([float(steps(n)), float(n), n * (c + n / 2.0)], t))
    (b0, b1, b3), with_attention = fit(rows, [0, 1, 2])
    (l0, l1, _), linear = fit(rows, [0, 1])
    if b3 < 0:
        # No attention cost measurable: the linear fit, not a clipped joint one.
        (b0, b1, b3), with_attention = (l0, l1, 0.0), linear
    print("cached  new  median first token ms  (attention fit, linear fit)")
    for (c, n), ts in sorted(samples.items()):
        print(f"{c:6d} {n:5d} {statistics.median(ts):10.1f}   "
              f"({b0 * steps(n) + b1 * n + b3 * n * (c + n / 2):.1f}, "
              f"{l0 * steps(n) + l1 * n:.1f})")
    print(f"fit: step base {b0:.3f} ms, {b1 * 1000:.2f} us per prefill token, "
          f"{b3 * 1e6:.3f} ns per attention pair; mean abs error {100 * with_attention:.1f}% "
          f"(linear, no attention term: {100 * linear:.1f}%)")
    h100 = {"step_base_us": 5752.7, "prefill_us_per_token": 17.25, "decode_us_per_token": 6.00}
    decode = b1 * 1000 * h100["decode_us_per_token"] / h100["prefill_us_per_token"]
    print("\nrouter:\n  tuning:\n    hardware:")
    print(f"      {a.class_name}: {{step_base_us: {b0 * 1000:.1f}, "
          f"prefill_us_per_token: {b1 * 1000:.3f}, decode_us_per_token: {decode:.3f}, "
          f"attention_us_per_pair: {max(b3, 0.0) * 1000:.6f},\n"
          f"        kv_capacity_blocks: {a.kv_capacity_blocks}, "
          f"max_batched_tokens: {a.max_batched_tokens}}}")


if __name__ == "__main__":
    main()
