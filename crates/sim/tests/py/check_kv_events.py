#!/usr/bin/env python3
"""Independent checker of the simulator's KV events, written against vLLM's wire format.

Subscribes to a KV-event PUB socket with pyzmq, fills any batches it missed before its
subscription took effect through the replay ROUTER socket (DEALER: [b"", start_seq]), decodes
every batch with msgpack in either encoding (array or map), and recomputes each BlockStored
block hash from the event's token_ids with vLLM's sha256_cbor chain:

    NONE = sha256(cbor2.dumps(seed))
    h_i  = sha256(cbor2.dumps((h_{i-1} as 32 bytes, tuple(tokens), extra_keys or None),
                              canonical=True))
    key  = int.from_bytes(h_i[-8:], "big")

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


def fail(msg):
    print(json.dumps({"ok": False, "error": msg}), flush=True)
    sys.exit(1)


def sha(obj, canonical=True):
    return hashlib.sha256(cbor2.dumps(obj, canonical=canonical)).digest()


def key(h):
    return int.from_bytes(h[-8:], "big")


def fields(event):
    """Returns (type, dict of fields) for either encoding."""
    if isinstance(event, dict):
        return event["type"], event
    tag = event[0]
    names = {
        "BlockStored": ["block_hashes", "parent_block_hash", "token_ids", "block_size",
                        "lora_id", "medium", "lora_name"],
        "BlockRemoved": ["block_hashes", "medium"],
        "AllBlocksCleared": [],
    }.get(tag)
    if names is None:
        fail(f"unknown event tag {tag!r}")
    return tag, dict(zip(names, event[1:]))


def batch_parts(batch):
    if isinstance(batch, dict):
        return "map", batch["ts"], batch["events"], batch.get("data_parallel_rank")
    if isinstance(batch, list):
        return "array", batch[0], batch[1], batch[2] if len(batch) > 2 else None
    fail(f"batch is neither array nor map: {type(batch)}")


def replay(ctx, endpoint, start, timeout_s):
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
        if len(frames) != 3 or frames[0] != b"":
            fail(f"bad replay frames: {len(frames)}")
        if frames[1] == END_SEQ:
            if frames[2] != b"":
                fail("replay terminator carries a payload")
            dealer.close()
            return got
        got[int.from_bytes(frames[1], "big")] = frames[2]
    fail("replay did not end with the -1 terminator")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--replay", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--seed", default="0")
    ap.add_argument("--min-blocks", type=int, default=1)
    ap.add_argument("--expect-encoding", choices=["array", "map"])
    ap.add_argument("--timeout", type=float, default=20.0)
    args = ap.parse_args()

    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(args.endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, args.topic.encode())
    print("READY", flush=True)

    batches = {}
    replayed = False
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
        # Batches published before the subscription took effect (ZMQ's slow joiner) or lost
        # are fetched by replay: at once when a gap shows, else after a quiet half second.
        seqs = sorted(batches)
        gap = bool(seqs) and seqs != list(range(seqs[-1] + 1))
        if gap or time.time() - last_replay > 0.5:
            for s, p in replay(ctx, args.replay, 0, 5.0).items():
                batches.setdefault(s, p)
            replayed = True
            last_replay = time.time()
        stored_blocks = 0
        for p in batches.values():
            _, _, events, _ = batch_parts(msgpack.unpackb(p, raw=False))
            for e in events:
                tag, f = fields(e)
                if tag == "BlockStored":
                    stored_blocks += len(f["block_hashes"])
        if stored_blocks >= args.min_blocks:
            break
    if stored_blocks < args.min_blocks:
        fail(f"only {stored_blocks} blocks seen before the timeout")
    seqs = sorted(batches)
    if seqs != list(range(seqs[-1] + 1)):
        fail(f"sequence numbers are not contiguous from 0: {seqs[:20]}")

    root = sha(args.seed)
    full = {}  # 64-bit key -> full 32-byte hash
    checked = 0
    encodings = set()
    for s in seqs:
        enc, ts, events, rank = batch_parts(msgpack.unpackb(batches[s], raw=False))
        encodings.add(enc)
        if not isinstance(ts, float):
            fail(f"ts is not a float: {ts!r}")
        if rank != 0:
            fail(f"data_parallel_rank {rank!r} != 0")
        for e in events:
            tag, f = fields(e)
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
            if len(toks) != bs * len(f["block_hashes"]):
                fail(f"batch {s}: {len(toks)} tokens for {len(f['block_hashes'])} blocks of {bs}")
            lora = f.get("lora_name")
            extra = (lora,) if lora else None
            for i, want in enumerate(f["block_hashes"]):
                h = sha((parent, tuple(toks[i * bs:(i + 1) * bs]), extra))
                if key(h) != want:
                    fail(f"batch {s} block {i}: recomputed {key(h)} != published {want}")
                full[want] = h
                parent = h
                checked += 1
    if args.expect_encoding and encodings != {args.expect_encoding}:
        fail(f"encodings {sorted(encodings)} != {args.expect_encoding}")
    print(json.dumps({"ok": True, "batches": len(seqs), "blocks_checked": checked,
                      "encodings": sorted(encodings), "replayed": replayed}), flush=True)


if __name__ == "__main__":
    main()
