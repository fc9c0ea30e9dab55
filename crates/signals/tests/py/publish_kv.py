#!/usr/bin/env python3
"""A KV-event publisher that behaves like vLLM's ZmqEventPublisher, for tests.

It publishes 3-frame messages [topic, seq (8 bytes big-endian), msgpack
EventBatch] on a PUB-compatible socket and serves replay on a ROUTER socket:
a request [identity, b"", start_seq] is answered with [identity, b"", seq,
payload] for every buffered batch with seq >= start_seq, then
[identity, b"", (-1 as 8 bytes), b""]. Built on pyzmq and msgpack, so the Rust
subscriber is tested against an independent implementation.

Test-harness differences from vLLM, on purpose:
* it binds an XPUB (wire-identical to PUB for subscribers) so it can wait until
  the subscriber's subscription arrived before publishing: this removes the ZMQ
  "slow joiner" race from the tests;
* `--drop SEQ` keeps a batch in the replay buffer but never publishes it, to
  force a gap; `--garbage SEQ` publishes undecodable bytes under that number;
* `--preroll N` publishes N batches before any subscriber is there (so a
  subscriber joins mid-stream and must replay from 0 to see everything);
* `--restart N` closes the socket after the batches, rebinds the same port and
  publishes N more batches numbered from 0, as a restarted engine would.

Protocol with the test: prints one JSON line {"pub": ..., "replay": ...} once
bound, then runs until stdin closes (or --linger-s passes).

Batch `seq` of incarnation `inc` holds one BlockStored with block hash
1000 * (inc + 1) + seq and 16 token ids equal to seq. Even seqs use the newer
map encoding, odd seqs the older array_like one, so both cross the wire.
"""

import argparse
import json
import select
import sys
import time

import msgpack
import zmq

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def payload(seq, inc):
    h = 1000 * (inc + 1) + seq
    tokens = [seq] * 16
    if seq % 2 == 0:
        event = {"type": "BlockStored", "block_hashes": [h], "parent_block_hash": None,
                 "token_ids": tokens, "block_size": 16, "lora_id": None,
                 "medium": "GPU", "lora_name": None}
        batch = {"ts": time.time(), "events": [event], "data_parallel_rank": 0}
    else:
        event = ["BlockStored", [h], None, tokens, 16, None, "GPU", None]
        batch = [time.time(), [event], 0]
    return msgpack.packb(batch, use_bin_type=True)


def wait_for_subscriber(xpub, timeout_s):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if xpub.poll(50):
            msg = xpub.recv()
            if msg[:1] == b"\x01":
                return
    sys.exit("no subscriber arrived")


def service_replay(router, buffer):
    while router is not None and router.poll(0):
        frames = router.recv_multipart()
        if len(frames) != 3:
            continue
        ident, _, start = frames
        start_seq = int.from_bytes(start, "big")
        for seq, buf in buffer:
            if seq >= start_seq:
                router.send_multipart([ident, b"", seq.to_bytes(8, "big"), buf])
        router.send_multipart([ident, b"", END_SEQ, b""])


def publish_run(xpub, router, topic, seqs, inc, drop, garbage, gap_s, buffer):
    for seq in seqs:
        buf = payload(seq, inc)
        buffer.append((seq, buf))
        if seq in garbage:
            xpub.send_multipart([topic, seq.to_bytes(8, "big"), b"\xc1not msgpack"])
        elif seq not in drop:
            xpub.send_multipart([topic, seq.to_bytes(8, "big"), buf])
        end = time.time() + gap_s
        while time.time() < end:
            service_replay(router, buffer)
            time.sleep(0.002)
    return buffer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--drop", type=int, action="append", default=[])
    ap.add_argument("--garbage", type=int, action="append", default=[])
    ap.add_argument("--no-replay", action="store_true")
    ap.add_argument("--restart", type=int, default=0)
    ap.add_argument("--preroll", type=int, default=0)
    ap.add_argument("--topic", default="kv@127.0.0.1:8000@test-model")
    ap.add_argument("--gap-s", type=float, default=0.02)
    ap.add_argument("--linger-s", type=float, default=30.0)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind; [::1] for IPv6")
    args = ap.parse_args()
    host = args.host

    ctx = zmq.Context.instance()
    xpub = ctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.LINGER, 0)
    xpub.setsockopt(zmq.IPV6, 1)
    port = xpub.bind_to_random_port(f"tcp://{host}")
    router = None
    replay = None
    if not args.no_replay:
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.IPV6, 1)
        rport = router.bind_to_random_port(f"tcp://{host}")
        replay = f"tcp://{host}:{rport}"
    topic = args.topic.encode()
    buffer = []
    # Batches published before anyone subscribed: lost on PUB, still in the replay buffer.
    # Done before the endpoints are printed, so no subscriber can be connected yet.
    publish_run(xpub, router, topic, range(args.preroll), 0, set(), set(), 0, buffer)
    print(json.dumps({"pub": f"tcp://{host}:{port}", "replay": replay}), flush=True)
    wait_for_subscriber(xpub, 15)
    publish_run(xpub, router, topic, range(args.preroll, args.preroll + args.count), 0,
                set(args.drop), set(args.garbage), args.gap_s, buffer)

    if args.restart:
        xpub.close(linger=0)
        time.sleep(0.2)
        xpub = ctx.socket(zmq.XPUB)
        xpub.setsockopt(zmq.LINGER, 0)
        xpub.setsockopt(zmq.IPV6, 1)
        for _ in range(50):
            try:
                xpub.bind(f"tcp://{host}:{port}")
                break
            except zmq.ZMQError:
                time.sleep(0.1)
        wait_for_subscriber(xpub, 15)
        buffer = []
        publish_run(xpub, router, topic, range(args.restart), 1, set(), set(), args.gap_s,
                    buffer)

    # Keep answering replays until the test closes our stdin or the linger time passes.
    deadline = time.time() + args.linger_s
    while time.time() < deadline:
        service_replay(router, buffer)
        ready, _, _ = select.select([sys.stdin], [], [], 0.01)
        if ready and not sys.stdin.read(1):
            break


if __name__ == "__main__":
    main()
