#!/usr/bin/env python3
"""Writes known-answer vectors for vLLM's sha256_cbor block-hash chain.

Independent of kvgate's Rust code: uses only hashlib and cbor2, following vLLM's
kv_cache_utils (NONE_HASH = sha256(cbor(seed)); h_i = sha256(cbor(canonical)((parent, tuple(tokens),
extra_keys or None)))); extra keys = [lora_name] on every block + [cache_salt] on block 0.
Regenerate with: pip install cbor2 && python3 scripts/gen_hash_fixtures.py > crates/tokens/tests/fixtures/sha256_cbor.json
"""
import hashlib
import json
import random

import cbor2


def sha256_cbor(obj):
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def chain(seed, block_size, tokens, lora=None, salt=None):
    parent = sha256_cbor(seed)
    out = []
    for b in range(len(tokens) // block_size):
        block = tuple(tokens[b * block_size:(b + 1) * block_size])
        keys = ([lora] if lora else []) + ([salt] if (b == 0 and salt) else [])
        parent = sha256_cbor((parent, block, tuple(keys) if keys else None))
        out.append(parent)
    return out


rng = random.Random(1234)
cases = []
specs = [
    ("0", 16, None, None, 40),
    ("0", 16, None, None, 16),
    ("1234", 16, None, None, 100),
    ("0", 4, "sql-lora", None, 13),
    ("0", 16, None, "tenant-a", 48),
    ("seed with spaces", 8, "adapter", "salt", 33),
    ("0", 16, None, None, 5),
]
for seed, bs, lora, salt, n in specs:
    # Mix small ids with ids across the CBOR integer-width boundaries (23/24, 255/256, 65535/65536).
    tokens = [rng.choice([0, 1, 23, 24, 255, 256, 65535, 65536, rng.randrange(128256)]) for _ in range(n)]
    hs = chain(seed, bs, tokens, lora, salt)
    cases.append({
        "seed": seed, "block_size": bs, "lora_name": lora, "cache_salt": salt, "tokens": tokens,
        "none_hash": sha256_cbor(seed).hex(),
        "hashes": [h.hex() for h in hs],
        "keys": [int.from_bytes(h[-8:], "big") for h in hs],
    })
print(json.dumps({"generator": "scripts/gen_hash_fixtures.py (hashlib + cbor2)", "cases": cases}, indent=1))
