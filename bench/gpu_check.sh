#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) in two device calls of at most 8 minutes each: every
# method, precision and engine once on the tiny model, then a ~1B-parameter random-weight model
# measured. README "The GPU check" says how to run them with the device tool.
#
#   Prepare here (with PyPI), once per change of dependencies:  python bench/gpu_wheels.py
#   Call 1 there (carrying bench/wheels):   bash bench/gpu_check.sh --call 1   (install, tiny steps)
#   Call 2 there (carrying bench/wheels):   bash bench/gpu_check.sh --call 2   (install, 1B measured)
#   Rehearse here with the image's versions, on the CPU:        bash bench/gpu_rehearse.sh
#   The same sequence, tiny, in this environment:               bash bench/gpu_check.sh --cpu-dry-run
#
# The device machine has torch, transformers, peft and accelerate and no network: what else
# dtune needs comes from bench/wheels, installed once per machine (a machine goes back 30 s
# after a call, so call 2 usually installs again: about 10 s). Results go to $OUT (the device
# tool's folder that comes back) or a fresh temporary folder, appended step by step; the call
# stops starting steps GPU_CHECK_BUDGET_S after it began (450 s on a GPU, none on a dry run)
# and exits non-zero if any step failed or was not reached.
set -euo pipefail
STARTED=$(date +%s)
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-bench/wheels}
OUT=${OUT:-$(mktemp -d -t dtune-gpu-check.XXXXXX)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
export DTUNE_CACHE_DIR=${DTUNE_CACHE_DIR:-$(mktemp -d -t dtune-cache.XXXXXX)}
PY=${PYTHON:-python3}  # on the device image, the python that holds its CUDA torch
DRY_RUN=""
for arg in "$@"; do [[ "$arg" == --cpu-dry-run ]] && DRY_RUN=1; done

install() {
  [[ -f "$WHEELS/requirements.txt" ]] || {
    echo "gpu_check: $WHEELS is missing: run python bench/gpu_wheels.py here and carry it" >&2
    return 2; }
  # Installed into the python's own environment, so a fresh machine (or a fresh rehearsal
  # venv) has no stamp and a warm one skips the install.
  local stamp want
  stamp="$($PY -c 'import sys; print(sys.prefix)')/.dtune-gpu-check-installed"
  want=$( (pwd; cat pyproject.toml "$WHEELS/requirements.txt"; ls -l "$WHEELS") | sha256sum)
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "== installed earlier on this machine"
  else
    echo "== the image's packages, before installing: $OUT/image-pip-list.txt"
    $PY -m pip list --format=freeze >"$OUT/image-pip-list.txt" 2>/dev/null
    echo "== installing what this machine lacks from $WHEELS"
    # What the machine has and satisfies dtune stays (its torch and transformers above all);
    # the rest comes from the wheels. No resolution here: bench/gpu_wheels.py checked the set
    # against bench/gpu_image.txt, and pip check below reads the machine itself.
    $PY -m pip install -q --no-index --no-deps --find-links "$WHEELS" -r "$WHEELS/requirements.txt"
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e .
    echo "$want" >"$stamp"
  fi
  $PY -m pip check || echo "gpu_check: pip check found the clashes above (not fatal here)"
  $PY -c "import dtune.launchers, deepspeed, bitsandbytes, datasets, hydra, peft, torch
import transformers, huggingface_hub, accelerate
print('imports ok; torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(),
      '; transformers', transformers.__version__, 'hub', huggingface_hub.__version__,
      'accelerate', accelerate.__version__, 'peft', peft.__version__,
      'deepspeed', deepspeed.__version__, 'bitsandbytes', bitsandbytes.__version__)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
}

# GPU_CHECK_INSTALL=1 installs in a dry run too: the rehearsal of the device's install
if [[ -z "$DRY_RUN" || -n "${GPU_CHECK_INSTALL:-}" ]]; then
  started=$(date +%s)
  install 2>&1 | tee -a "$OUT/install.log"
  echo "== install: $(( $(date +%s) - started )) s" | tee -a "$OUT/install.log"
fi
BUDGET=${GPU_CHECK_BUDGET_S:-$([[ -n "$DRY_RUN" ]] && echo 0 || echo 450)}
DEADLINE=()
if (( BUDGET > 0 )); then DEADLINE=(--deadline "$((STARTED + BUDGET))"); fi
$PY bench/gpu_check.py --out "$OUT" "${DEADLINE[@]}" "$@"
echo "gpu_check: results in $OUT"
