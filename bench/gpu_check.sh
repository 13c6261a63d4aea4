#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): every method, precision and engine once on a CUDA GPU,
# then a ~1B-parameter random-weight model measured. Fits in 10 minutes on one H200.
#
#   Prepare here (with PyPI), once per change of dependencies:  python bench/gpu_wheels.py (27 MiB)
#   Run there (the device tool, carrying bench/wheels):         bash bench/gpu_check.sh
#   Rehearse here on the CPU, tiny sizes, same sequence:       bash bench/gpu_check.sh --cpu-dry-run
#
# The device machine has torch, transformers, peft and accelerate and no network: what else
# dtune needs comes from bench/wheels. Results go to $OUT (the device tool's folder that comes
# back) or a fresh temporary folder; the exit status is non-zero if any step failed.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-bench/wheels}
OUT=${OUT:-$(mktemp -d -t dtune-gpu-check.XXXXXX)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
export DTUNE_CACHE_DIR=${DTUNE_CACHE_DIR:-$(mktemp -d -t dtune-cache.XXXXXX)}

PY=${PYTHON:-python3}  # on the device image, the python that holds its CUDA torch

# GPU_CHECK_INSTALL=1 installs in a dry run too: the rehearsal of the device's install (README)
if [[ "${1:-}" != "--cpu-dry-run" || -n "${GPU_CHECK_INSTALL:-}" ]]; then
  echo "== installing what this machine lacks from $WHEELS"
  [[ -f "$WHEELS/requirements.txt" ]] || {
    echo "gpu_check: $WHEELS is missing: run python bench/gpu_wheels.py here and carry it" >&2
    exit 2; }
  # What the machine has and satisfies dtune stays (its torch above all); the rest comes from
  # the wheels. No dependency resolution: the list is complete (bench/gpu_wheels.py).
  $PY -m pip install -q --no-index --no-deps --find-links "$WHEELS" -r "$WHEELS/requirements.txt"
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e .
  $PY -c "import dtune.launchers, deepspeed, bitsandbytes, datasets, hydra, torch
print('imports ok; torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
$PY bench/gpu_check.py --out "$OUT" "$@"
echo "gpu_check: results in $OUT"
