#!/usr/bin/env bash
# The GPU check rehearsed on this CPU machine the way the device will run it, before a lease
# is spent on it:
#   1. bench/wheels built if missing (with this environment's pip and versions, the ones CI
#      tests) and checked against the image's recorded packages (bench/gpu_wheels.py --check);
#   2. a Python 3.12 venv holding the image's packages at their recorded versions
#      (bench/gpu_image.txt; torch 2.11.0 from PyPI, the same CUDA 13 build the image has,
#      which runs on a CPU), as the image's python3 first on PATH;
#   3. a copy of the working tree as the device tool sends it (tracked and untracked files
#      that git does not ignore, plus the carried bench/wheels), held to the 64 MiB limit;
#   4. call 1 and call 2 of bench/gpu_check.sh in that copy, each on a fresh copy of the image
#      venv (a device machine goes back 30 s after a call, so call 2 installs again), with the
#      install lines the device runs and the CPU dry run's sizes.
# The log and timings go to bench/results/gpu_rehearsal.md and gpu_rehearsal.log.
#
#   bash bench/gpu_rehearse.sh        # 9 to 15 minutes on 2 cores; downloads about 4 GB once
#
# PY312 names the Python 3.12 (default: python3.12 on PATH, else pyenv's); REHEARSAL_DIR the
# scratch folder (default .rehearsal, git-ignored; about 11 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
R=${REHEARSAL_DIR:-$REPO/.rehearsal}
python312() {  # the first that runs: a pyenv shim on PATH may name a version it cannot start
  local candidate
  for candidate in "${PY312:-}" python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python; do
    if [[ -n "$candidate" ]] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' \
        2>/dev/null; then echo "$candidate"; return; fi
  done
  echo "gpu_rehearse: no Python 3.12 found (set PY312)" >&2
  return 1
}
PY312=$(python312)
WHEELS_PY=${WHEELS_PYTHON:-$REPO/.venv/bin/python}
mkdir -p "$R"
TIMES=$R/times.txt
: >"$TIMES"
took() { echo "$1 $2" >>"$TIMES"; echo "== $1: $2 s"; }

echo "== 1. the carried wheels"
[[ -f bench/wheels/requirements.txt ]] || "$WHEELS_PY" bench/gpu_wheels.py
"$WHEELS_PY" bench/gpu_wheels.py --check

echo "== 2. the image's packages in a Python 3.12 venv ($PY312)"
started=$(date +%s)
rm -rf "$R/image" "$R/image.pristine"
"$PY312" -m venv "$R/image"
"$R/image/bin/python" -m pip install -q -r bench/gpu_image.txt
cp -a "$R/image" "$R/image.pristine"
took image_venv_s $(( $(date +%s) - started ))

echo "== 3. the working tree as the device tool sends it"
rm -rf "$R/tree"
mkdir -p "$R/tree"
git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
  [[ -e "$f" ]] && printf '%s\0' "$f"; done | xargs -0 cp --parents -t "$R/tree"
cp -r bench/wheels "$R/tree/bench/"
size=$(du -sb "$R/tree" | cut -f1)
took tree_mib $(( size / 2**20 ))
(( size <= 64 * 2**20 )) || { echo "gpu_rehearse: the tree is over 64 MiB" >&2; exit 1; }

device_call() {  # $1: the call; a fresh image venv, python3 from it first on PATH
  rm -rf "$R/image" "$R/out$1"
  cp -a "$R/image.pristine" "$R/image"
  local started rc=0
  started=$(date +%s)
  (cd "$R/tree" && env -u PYTHONPATH -u VIRTUAL_ENV -u DTUNE_CACHE_DIR PATH="$R/image/bin:$PATH" \
     OUT="$R/out$1" GPU_CHECK_INSTALL=1 bash bench/gpu_check.sh --cpu-dry-run --call "$1") || rc=$?
  took "call$1_s" $(( $(date +%s) - started ))
  took "call$1_exit" "$rc"
}
echo "== 4. call 1"
device_call 1
echo "== 4. call 2"
device_call 2
"$PY312" bench/gpu_rehearsal_report.py "$R"
