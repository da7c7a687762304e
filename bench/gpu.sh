#!/usr/bin/env bash
# GPU device check: flexo's DeepSpeed ZeRO-2 bf16 owner training of a ~1.5B-parameter 2-expert FlexOlmo
# (bench/gpu_train.py): tokens/s, MFU vs the H200's 790 TFLOP/s dense bf16 peak, peak memory, and that
# the public parts stay bit-identical; then the same at the OLMo-2 1B preset's shape with `flexo plan`'s
# memory estimate beside the measured peak; then vLLM + lm-eval's vLLM backend (bench/gpu_serve.py, skipped
# with its reason where they are not installed). Figures: $OUT/gpu_train*.json, $OUT/gpu_serve.json, log:
# $OUT/gpu_train.log.
#
#   bash bench/gpu.sh [gpu_train.py options]      e.g. --steps 200 --max-seconds 240
#   PYTHON=.venv/bin/python bash bench/gpu.sh --dry-run     (CPU check of the scripts)
#
# The GPU machine has no network and no venv: it runs the image's python3 (torch, tokenizers,
# safetensors, pyyaml, huggingface_hub are there; deepspeed, its pure-Python needs and pydantic are
# not). Nothing is installed from the internet: wheels carried in $WHEELS (default .cache/gpu-wheels,
# git-ignored) are unpacked into a private folder first. Prepare them once on a machine with network,
# from the repo root (python 3.12, x86-64 wheels for the GPU image):
#   mkdir -p .cache/gpu-wheels && cd .cache/gpu-wheels
#   DS_BUILD_OPS=0 ../../.venv/bin/pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .
#   ../../.venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d . \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0 \
#     transformers==5.24.0
# and name the folder in the device run's carry: run(command="bash bench/gpu.sh", carry=[".cache/gpu-wheels"]).
# Without the wheels, gpu_train.py falls back to a plain PyTorch GPU loop and reports backend "torch".
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.cache/gpu-wheels}
OUT=${OUT:-$PWD/.cache/bench-out}
mkdir -p "$OUT"
LOG="$OUT/gpu_train.log"
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=${SITE:-/tmp/flexo-gpu-site}
  say "unpacking $(ls "$WHEELS"/*.whl | wc -l) carried wheels from $WHEELS into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl 2>&1 | tee -a "$LOG" || { say "wheel install failed"; exit 3; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  say "no wheels in $WHEELS: using whatever $PY has (no deepspeed -> plain PyTorch fallback)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 DO_NOT_TRACK=1 TRANSFORMERS_VERBOSITY=error
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
export OUT

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
  --format=csv 2>&1 | tee -a "$LOG"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "deepspeed", "pydantic", "safetensors", "tokenizers"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as e:  # report and go on: gpu_train.py decides what it can run
        print(f"{name} NOT importable: {type(e).__name__}: {e}")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
EOF

DRY=""; [[ " $* " == *" --dry-run "* ]] && DRY="--dry-run"   # the CPU check of the scripts runs each of them dry
start=$(date +%s)
"$PY" bench/gpu_train.py "$@" 2>&1 | grep -v --line-buffered 'step/s' | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "gpu_train.py exit $rc after $(( $(date +%s) - start )) s; figures in $OUT"

# The OLMo-2 1B preset's expert training on one GPU (its shapes, its per-GPU micro-batch, random weights):
# tokens/s, MFU and peak memory beside `flexo plan`'s estimate for the same run (planned_memory).
if [ -z "${SKIP_PRESET:-}" ]; then
  "$PY" bench/gpu_train.py $DRY --preset configs/olmo2-1b.yaml --steps 60 --max-seconds "${PRESET_SECONDS:-120}" 2>&1 \
    | grep -v --line-buffered 'step/s' | tee -a "$LOG"
  prc=${PIPESTATUS[0]}; [ "$rc" = 0 ] && rc=$prc
  say "gpu_train.py --preset configs/olmo2-1b.yaml exit $prc"
fi

# A merged model through vLLM and lm-eval's vLLM backend (bench/gpu_serve.py): recorded as skipped, with the
# reason, where vllm or lm-eval is not importable (this project's lent GPU image has neither).
"$PY" bench/gpu_serve.py $DRY 2>&1 | tee -a "$LOG"
src=${PIPESTATUS[0]}; [ "$rc" = 0 ] && rc=$src
say "gpu_serve.py exit $src; all figures in $OUT after $(( $(date +%s) - start )) s"
exit "$rc"
