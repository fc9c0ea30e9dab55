#!/usr/bin/env python3
"""Independent checker of the simulator's KV events, written against vLLM 0.32's wire format.

Receives KV events with a pyzmq SUB socket, either connecting to an engine that binds its PUB
socket or, with --bind, binding a concrete address that the engine's PUB socket connects to
(vLLM's rule: a PUB endpoint without `*` or `::` connects). Fills any batches it missed before
its subscription took effect through the replay ROUTER socket (DEALER: [b"", start_seq]),
checking the replay frames: vLLM 0.32 answers [b"", topic, seq, payload] per batch and ends with
[b"", b"", 0xFF*8, b""]; older engines ([--replay-format legacy]) answer [b"", seq, payload] and
end with [b"", 0xFF*8, b""]. Decodes every batch with msgpack in either event encoding (0.32
maps with msgspec's field order and omitted defaults, or older arrays) and recomputes each
BlockStored block hash from the event's token_ids with vLLM 0.32's sha256_cbor chain:

    NONE = sha256(cbor2.dumps(seed))
    h_i  = sha256(cbor2.dumps((h_{i-1} as 32 bytes, tuple(tokens), extra_keys or None),
                              canonical=True))
    key  = int.from_bytes(h_i[-8:], "big")

where extra_keys are tagged (vllm/v1/core/kv_cache_utils.py, generate_block_hash_extra_keys):
("lora", lora_name, lora_path) on every block of an adapter's request, then
("cache_salt", salt) on the request's first block. The event carries only the untagged values
(extra_keys per block: null or [lora_name, salt]), so the checker takes the salt from there and
each adapter's path from --lora-path (default: the name); --tagging untagged checks older engines.

Prints "READY" once subscribed, then one JSON summary line; exits 0 only if every hash matched
and at least --min-blocks blocks were checked.
"""

import argparse
import hashlib
import json
import sys
import time

import cbor2
import msgpack
import zmq

END_SEQ = (-1).to_bytes(8, "big", signed=True)

# vLLM 0.32's msgspec structs, in declaration order (vllm/distributed/kv_events.py); fields with
# a default of None are omitted when None, the others are always written.
MAP_FIELDS = {
    "BlockStored": ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                    "medium", "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind",
                    "kv_cache_spec_sliding_window", "locality", "ownership", "session_id"],
    "BlockRemoved": ["block_hashes", "medium", "group_idx", "locality", "ownership"],
    "AllBlocksCleared": [],
}
MAP_REQUIRED = {
    "BlockStored": ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                    "medium", "lora_name"],
    "BlockRemoved": ["block_hashes", "medium"],
    "AllBlocksCleared": [],
}
ARRAY_FIELDS = {
    "BlockStored": ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                    "medium", "lora_name"],
    "BlockRemoved": ["block_hashes", "medium"],
    "AllBlocksCleared": [],
}


def fail(msg):
    print(json.dumps({"ok": False, "error": msg}), flush=True)
    sys.exit(1)


def sha(obj):
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def key(h):
    return int.from_bytes(h[-8:], "big")


def fields(event):
    """Returns (type, dict of fields, encoding) for either event encoding."""
    if isinstance(event, dict):
        keys = list(event)
        if not keys or keys[0] != "type":
            fail(f"map event does not start with 'type': {keys}")
        tag = event["type"]
        order = MAP_FIELDS.get(tag)
        if order is None:
            fail(f"unknown event type {tag!r}")
        rest = keys[1:]
        if rest != [k for k in order if k in rest]:
            fail(f"{tag} fields out of declaration order: {rest}")
        missing = [k for k in MAP_REQUIRED[tag] if k not in event]
        if missing:
            fail(f"{tag} lacks fields without a default: {missing}")
        nulls = [k for k in rest if k not in MAP_REQUIRED[tag] and event[k] is None]
        if nulls:
            fail(f"{tag} writes default-valued fields (omit_defaults): {nulls}")
        return tag, event, "map"
    tag = event[0]
    names = ARRAY_FIELDS.get(tag)
    if names is None:
        fail(f"unknown event tag {tag!r}")
    return tag, dict(zip(names, event[1:])), "array"


def batch_parts(batch):
    if not isinstance(batch, list) or len(batch) not in (2, 3):
        fail(f"batch is not [ts, events, data_parallel_rank]: {type(batch)}")
    return batch[0], batch[1], batch[2] if len(batch) > 2 else None


def replay(ctx, endpoint, start, timeout_s, topic, fmt):
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    dealer.send_multipart([b"", start.to_bytes(8, "big")])
    got = {}
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not dealer.poll(100):
            continue
        frames = dealer.recv_multipart()
        if fmt == "v0_32":
            if len(frames) != 4 or frames[0] != b"":
                fail(f"replay frames are not [b'', topic, seq, payload]: {len(frames)} frames")
            _, t, seq, payload = frames
            if seq == END_SEQ:
                if t != b"" or payload != b"":
                    fail("replay end marker is not [b'', b'', 0xFF*8, b'']")
                dealer.close()
                return got
            if t.decode() != topic:
                fail(f"replay topic {t!r} != {topic!r}")
        else:
            if len(frames) != 3 or frames[0] != b"":
                fail(f"replay frames are not [b'', seq, payload]: {len(frames)} frames")
            _, seq, payload = frames
            if seq == END_SEQ:
                if payload != b"":
                    fail("replay terminator carries a payload")
                dealer.close()
                return got
        got[int.from_bytes(seq, "big")] = payload
    fail("replay did not end with the -1 terminator")


def extra_keys_for(f, i, block0, tagging, lora_paths):
    """The hash's extra keys of block i of a BlockStored, rebuilt as vLLM 0.32 builds them."""
    lora = f.get("lora_name")
    published = f.get("extra_keys")
    entry = published[i] if published is not None else None
    salt = None
    if entry is not None:
        entry = list(entry)
        if lora is not None:
            if not entry or entry[0] != lora:
                fail(f"extra_keys entry {entry} does not start with lora_name {lora!r}")
            entry = entry[1:]
        if entry:
            if not block0 or len(entry) != 1:
                fail(f"unexpected extra_keys entry {published[i]} for block {i}")
            salt = entry[0]
    elif lora is not None and published is not None:
        fail("a LoRA block publishes null extra_keys")
    if tagging == "tagged":
        keys = ([("lora", lora, lora_paths.get(lora, lora))] if lora else []) + (
            [("cache_salt", salt)] if salt else [])
    else:
        keys = ([lora] if lora else []) + ([salt] if salt else [])
    return (tuple(keys) if keys else None), salt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--bind", action="store_true",
                    help="bind --endpoint (the engine connects) instead of connecting to it")
    ap.add_argument("--replay", required=True)
    ap.add_argument("--replay-format", choices=["v0_32", "legacy"], default="v0_32")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--seed", default="vllm-none-hash")
    ap.add_argument("--tagging", choices=["tagged", "untagged"], default="tagged")
    ap.add_argument("--lora-path", action="append", default=[], help="name=path")
    ap.add_argument("--expect-salt", help="fail unless a block salted with this was verified")
    ap.add_argument("--min-blocks", type=int, default=1)
    ap.add_argument("--expect-encoding", choices=["array", "map"])
    ap.add_argument("--timeout", type=float, default=20.0)
    args = ap.parse_args()
    lora_paths = dict(p.split("=", 1) for p in args.lora_path)

    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    if args.bind:
        sub.bind(args.endpoint)
    else:
        sub.connect(args.endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, args.topic.encode())
    print("READY", flush=True)

    batches = {}
    replayed = False
    live = 0
    deadline = time.time() + args.timeout
    last_replay = time.time()
    stored_blocks = 0
    while time.time() < deadline:
        if sub.poll(100):
            frames = sub.recv_multipart()
            if len(frames) != 3:
                fail(f"expected 3 frames, got {len(frames)}")
            topic, seq_b, payload = frames
            if topic.decode() != args.topic:
                fail(f"topic {topic!r} != {args.topic!r}")
            if len(seq_b) != 8:
                fail("sequence frame is not 8 bytes")
            batches[int.from_bytes(seq_b, "big")] = payload
            live += 1
        # Batches published before the subscription took effect (ZMQ's slow joiner) or lost
        # are fetched by replay: at once when a gap shows, else after a quiet half second.
        seqs = sorted(batches)
        gap = bool(seqs) and seqs != list(range(seqs[-1] + 1))
        if gap or time.time() - last_replay > 0.5:
            for s, p in replay(ctx, args.replay, 0, 5.0, args.topic, args.replay_format).items():
                batches.setdefault(s, p)
            replayed = True
            last_replay = time.time()
        stored_blocks = 0
        for p in batches.values():
            _, events, _ = batch_parts(msgpack.unpackb(p, raw=False))
            for e in events:
                tag, f, _ = fields(e)
                if tag == "BlockStored":
                    stored_blocks += len(f["block_hashes"])
        if stored_blocks >= args.min_blocks:
            break
    if stored_blocks < args.min_blocks:
        fail(f"only {stored_blocks} blocks seen before the timeout ({live} live batches)")
    seqs = sorted(batches)
    if seqs != list(range(seqs[-1] + 1)):
        fail(f"sequence numbers are not contiguous from 0: {seqs[:20]}")

    root = sha(args.seed)
    full = {}  # 64-bit key -> full 32-byte hash
    checked = 0
    salts = set()
    encodings = set()
    for s in seqs:
        ts, events, rank = batch_parts(msgpack.unpackb(batches[s], raw=False))
        if not isinstance(ts, float):
            fail(f"ts is not a float: {ts!r}")
        if rank != 0:
            fail(f"data_parallel_rank {rank!r} != 0")
        for e in events:
            tag, f, enc = fields(e)
            encodings.add(enc)
            if tag == "BlockRemoved" and enc == "map" and len(f["block_hashes"]) != 1:
                fail("vLLM publishes one BlockRemoved per block hash")
            if tag != "BlockStored":
                continue
            if f["medium"] != "GPU":
                fail(f"medium {f['medium']!r}")
            parent_key = f["parent_block_hash"]
            if parent_key is None:
                parent = root
            elif parent_key in full:
                parent = full[parent_key]
            else:
                fail(f"batch {s}: parent {parent_key} was never stored")
            bs = f["block_size"]
            toks = f["token_ids"]
            n = len(f["block_hashes"])
            if len(toks) != bs * n:
                fail(f"batch {s}: {len(toks)} tokens for {n} blocks of {bs}")
            if enc == "map":
                ek = f.get("extra_keys")
                if not isinstance(ek, list) or len(ek) != n:
                    fail(f"batch {s}: extra_keys {ek!r} is not one entry per block")
                if f.get("group_idx") != 0 or f.get("kv_cache_spec_kind") != "full_attention":
                    fail(f"batch {s}: group_idx/kv_cache_spec_kind {f.get('group_idx')!r}/"
                         f"{f.get('kv_cache_spec_kind')!r}")
            for i, want in enumerate(f["block_hashes"]):
                extra, salt = extra_keys_for(f, i, parent_key is None and i == 0, args.tagging,
                                             lora_paths)
                if salt:
                    salts.add(salt)
                h = sha((parent, tuple(toks[i * bs:(i + 1) * bs]), extra))
                if key(h) != want:
                    fail(f"batch {s} block {i}: recomputed {key(h)} != published {want}")
                full[want] = h
                parent = h
                checked += 1
    if args.expect_encoding and encodings != {args.expect_encoding}:
        fail(f"encodings {sorted(encodings)} != {args.expect_encoding}")
    if args.expect_salt is not None and args.expect_salt not in salts:
        fail(f"no verified block carried salt {args.expect_salt!r}: {sorted(salts)}")
    print(json.dumps({"ok": True, "batches": len(seqs), "live_batches": live,
                      "blocks_checked": checked, "encodings": sorted(encodings),
                      "salts": sorted(salts), "replayed": replayed}), flush=True)


if __name__ == "__main__":
    main()
