#!/usr/bin/env python3
"""Concurrent multi-turn conversations through one router in front of real vLLM engines, for
scripts/real-vllm-ab.sh: `conversations` conversations over `systems` shared system prompts of
~420 words, `turns` turns each (every turn's requests sent at once, each history continued with
a fixed reply, so two routers given the same seed send byte-identical prompts), `rounds` rounds
on fresh prompts with every engine's prefix cache reset before each (vLLM's dev-mode
/reset_prefix_cache, then one request so that the engine runs the step that clears it).

    python real_vllm_conversations.py ROUTER_URL ENGINE_URL[,ENGINE_URL...] ROUNDS SEED

Prints one line: requests per engine (vllm:request_success_total, reset requests included), mean
and median TTFT (request sent to first streamed byte), wall time.
"""
import asyncio
import random
import statistics
import sys
import time

import aiohttp

MODEL = "smollm2"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def system_prompt(seed):
    r = random.Random(seed)
    return " ".join(r.choice(WORDS) for _ in range(420))


async def ttft_of(session, router, messages):
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True}
    started = time.perf_counter()
    async with session.post(router + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            sys.exit(f"router answered {r.status}: {await r.text()}")
        ttft = None
        async for _ in r.content.iter_any():
            if ttft is None:
                ttft = time.perf_counter() - started
    return ttft


async def served(session, engines):
    counts = []
    for e in engines:
        async with session.get(e + "/metrics") as r:
            text = await r.text()
        counts.append(sum(float(l.split()[-1]) for l in text.splitlines()
                          if l.startswith("vllm:request_success_total")))
    return counts


async def reset(session, engines):
    for e in engines:
        async with session.post(e + "/reset_prefix_cache") as r:
            if r.status != 200:
                sys.exit(f"{e}/reset_prefix_cache answered {r.status} (start vLLM with VLLM_SERVER_DEV_MODE=1)")
        body = {"model": MODEL, "messages": [{"role": "user", "content": "flush"}], "max_tokens": 1}
        async with session.post(e + "/v1/chat/completions", json=body) as r:
            await r.read()


async def main(router, engines, rounds, seed, conversations=8, systems=3, turns=4):
    async with aiohttp.ClientSession() as s:
        ttfts = []
        t0, before = time.time(), await served(s, engines)
        for rnd in range(rounds):
            await reset(s, engines)
            histories = [[{"role": "system", "content": system_prompt(seed * 100_000 + 1_000 * rnd + c % systems)}]
                         for c in range(conversations)]
            for t in range(turns):
                for c, h in enumerate(histories):
                    h.append({"role": "user", "content": f"conv {c} turn {t}: name a colour."})
                ttfts += await asyncio.gather(*[ttft_of(s, router, h) for h in histories])
                for h in histories:
                    h.append({"role": "assistant", "content": f"Colour {t}: blue."})
        wall, after = time.time() - t0, await served(s, engines)
        split = "/".join(str(int(b - a)) for a, b in zip(before, after))
        print(f"split {split} mean TTFT {1e3 * statistics.mean(ttfts):.1f} ms "
              f"median {1e3 * statistics.median(ttfts):.1f} over {len(ttfts)} in {wall:.0f} s")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])))
