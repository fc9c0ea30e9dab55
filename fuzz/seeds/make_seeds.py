#!/usr/bin/env python3
"""Writes the committed seed corpus of every fuzz target (fuzz/seeds/<target>/).

Seeds are real inputs: the signals crate's fixtures (KV-event payloads captured from or
encoded like vLLM and SGLang, every engine's /metrics text), OpenAI request bodies, and
ext_proc ProcessingRequest messages encoded by hand with protobuf's wire rules (field numbers
from envoy/service/ext_proc/v3/external_processor.proto). Run from fuzz/: python3 seeds/make_seeds.py
"""
import json, os, struct

FIX = os.path.join("..", "crates", "signals", "tests", "fixtures")
OUT = "seeds"

def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

# kv_event_batch: the payloads alone (first byte is then the frame cut), and framed messages.
for name in sorted(os.listdir(FIX)):
    if name.endswith(".msgpack"):
        payload = open(os.path.join(FIX, name), "rb").read()
        topic = b"kv@a:1@m"
        cut = bytes([(8 << 4) | len(topic)])
        put("kv_event_batch", name, payload)
        put("kv_event_batch", name + ".framed", cut + topic + struct.pack(">Q", 3) + payload)

# metrics_text: every engine's body.
for name in sorted(os.listdir(FIX)):
    if name.endswith(".txt"):
        put("metrics_text", name, open(os.path.join(FIX, name), "rb").read())

# zmtp_peer: after the handshake, short frames of a real message; an oversized header; a raw
# greeting (odd first byte: nothing is sent for us).
def frame(body, more):
    flags = 0x01 if more else 0x00
    if len(body) > 255:
        return bytes([flags | 0x02]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body
small = open(os.path.join(FIX, "vllm_map.msgpack"), "rb").read()
msg = frame(b"kv@a:1@m", True) + frame(struct.pack(">Q", 0), True) + frame(small, False)
put("zmtp_peer", "message", b"\x00" + msg)
put("zmtp_peer", "two_messages", b"\x00" + msg + msg)
put("zmtp_peer", "huge_header", b"\x00" + b"\x02" + struct.pack(">Q", 1 << 40))
greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL" + b"\x00" * 16 + b"\x00" + b"\x00" * 31
put("zmtp_peer", "raw_greeting", b"\x01" + greeting)

# openai_request
bodies = {
    "chat.json": {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                  {"role": "user", "content": "hello"}], "stream": True,
                  "stream_options": {"include_usage": True}, "max_tokens": 16},
    "chat_parts.json": {"model": "m", "messages": [{"role": "user", "content": [
                  {"type": "text", "text": "what is this"}]}], "cache_salt": "s"},
    "completion.json": {"model": "m", "prompt": "Once upon a time", "max_tokens": 8},
    "completion_ids.json": {"model": "m", "prompt": [1, 2, 3, 4]},
    "embeddings.json": {"model": "m", "input": ["a", "b"]},
    "responses.json": {"model": "m", "input": "hi", "stream": False},
}
for name, body in bodies.items():
    put("openai_request", name, json.dumps(body).encode())

# extproc_messages: [u16 length][ProcessingRequest] ...
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out
def field(num, wire, payload):
    key = varint((num << 3) | wire)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + payload
def header(k, v):
    return field(1, 2, field(1, 2, k.encode()) + field(3, 2, v.encode()))
def headers_msg(pairs, eos):
    hm = b"".join(header(k, v) for k, v in pairs)
    hh = field(1, 2, hm) + (field(3, 0, b"\x01") if eos else b"")
    return field(2, 2, hh)
def body_msg(data, eos):
    hb = field(1, 2, data) + (field(2, 0, b"\x01") if eos else b"")
    return field(4, 2, hb)
def seq(*msgs):
    return b"".join(struct.pack(">H", len(m)) + m for m in msgs)
req_headers = [(":method", "POST"), (":path", "/v1/chat/completions"), (":authority", "gw"),
               ("content-type", "application/json")]
chat = json.dumps(bodies["chat.json"]).encode()
put("extproc_messages", "chat", seq(headers_msg(req_headers, False), body_msg(chat, True)))
put("extproc_messages", "chat_split", seq(headers_msg(req_headers, False),
    body_msg(chat[:20], False), body_msg(chat[20:], True)))
put("extproc_messages", "get_models", seq(headers_msg([(":method", "GET"), (":path", "/v1/models")], True)))
put("extproc_messages", "empty_body", seq(headers_msg(req_headers, False), body_msg(b"", True)))
