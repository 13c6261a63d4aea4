#!/usr/bin/env bash
# GPU check for a lent H200 (or any CUDA GPU): full bf16 fine-tuning under ZeRO-2, LoRA and
# QLoRA on a ~0.5B-parameter Llama built from a config with random weights (no hub there),
# with tokens/s, MFU against a measured bf16 matmul peak, and peak memory. Fits in 10 minutes.
#
#   Prepare here (with PyPI access), once:   bench/gpu_check.sh --download
#   Run there (device tool, carry bench/wheels):   bash bench/gpu_check.sh
#
# Results: $OUT/gpu_check.json and $OUT/gpu_check.md (or bench/results/ without $OUT).
# Never part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-bench/wheels}
PKGS="deepspeed bitsandbytes hydra-core omegaconf submitit wandb"
if [[ "${1:-}" == "--download" ]]; then
  mkdir -p "$WHEELS"
  # Linux x86-64 wheels for the device machine, without their dependencies' dependencies
  pip download -d "$WHEELS" --only-binary=:all: --platform manylinux2014_x86_64 \
      --python-version "$(python -c 'import sys;print(f"{sys.version_info[0]}{sys.version_info[1]}")')" \
      bitsandbytes==0.50.2 hydra-core==1.3.8 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 \
      submitit wandb 2>&1 | tail -3 || true
  pip download -d "$WHEELS" --no-deps deepspeed==0.19.8 2>&1 | tail -1
  du -sh "$WHEELS"
  exit 0
fi
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
export DTUNE_CACHE_DIR=${DTUNE_CACHE_DIR:-/tmp/dtune-cache}

# 1. the wheels the machine lacks
for pkg in $PKGS; do
  mod=${pkg//-core/}; mod=${mod//-/_}
  python -c "import $mod" 2>/dev/null || \
    pip install -q --no-index --find-links "$WHEELS" "$pkg" 2>&1 | tail -2 || \
    echo "could not install $pkg from $WHEELS"
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

# 2. ~0.5B Llama with random weights: 24 layers, hidden 1280, MLP 3456 (about 480M params)
MODEL="model=tiny-llama model.name=random-0.5b model.name_or_path=random-0.5b
  model.random_init.hidden_size=1280 model.random_init.num_layers=24
  model.random_init.num_heads=20 model.random_init.num_kv_heads=4
  model.random_init.intermediate_size=3456 model.random_init.vocab_size=32000
  model.random_init.max_position_embeddings=4096"
COMMON="data.builtin.train_size=4000 data.max_seq_len=2048 data.packing=true
  train.micro_batch_size=8 train.max_steps=${STEPS:-30} train.warmup_steps=0 train.save_every=0
  train.log_every=1 train.loss_chunk_size=4096 eval.exact_match_samples=0
  eval.max_loss_samples=16 precision=bf16"
run() {  # name, overrides...
  local name=$1; shift
  echo "== $name"
  timeout 170 python -m dtune $MODEL $COMMON "$@" hydra.run.dir="/tmp/gpu-check/$name" \
    > "/tmp/gpu-check-$name.log" 2>&1 || { echo "$name failed:"; tail -20 "/tmp/gpu-check-$name.log"; }
}
mkdir -p /tmp/gpu-check
run full +method=full train.lr=1e-5 parallelism=zero2 parallelism.nproc_per_node=1
run lora +method=lora train.lr=1e-4
run qlora +method=qlora method.compute_dtype=bf16 train.lr=1e-4

# 3. tokens/s, MFU against a measured bf16 matmul peak, peak memory
python - "$OUT" <<'PY'
import json, statistics, sys, time
from pathlib import Path
import torch

out = Path(sys.argv[1])
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(20):
    a @ b
torch.cuda.synchronize()
peak = 20 * 2 * 8192**3 / (time.perf_counter() - start)
rows = [f"bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s on {torch.cuda.get_device_name()}", "",
        "| run | params | median step | real tok/s | MFU | peak memory | final loss |",
        "|---|---|---|---|---|---|---|"]
report = {"peak_flops": peak, "runs": {}}
for name, k in (("full", 6), ("lora", 4), ("qlora", 4)):
    run = Path("/tmp/gpu-check") / name
    if not (run / "summary.json").is_file():
        rows.append(f"| {name} | failed | | | | | |")
        continue
    s = json.loads((run / "summary.json").read_text())
    steps = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "step_time_s" in m][2:]  # leave warm-up out
    tok_s = statistics.median(m["tokens_per_s"] for m in steps)
    mfu = tok_s * k * s["total_params"] / peak
    report["runs"][name] = dict(summary=s, real_tokens_per_s=tok_s, mfu=mfu,
                                median_step_s=statistics.median(m["step_time_s"] for m in steps))
    rows.append(f"| {name} | {s['total_params'] / 1e6:.0f}M | "
                f"{report['runs'][name]['median_step_s']:.3f} s | {tok_s:,.0f} | "
                f"{100 * mfu:.1f}% ({k}N) | {s['train_peak_memory_bytes'] / 2**30:.2f} GiB | "
                f"{s['final_loss']:.3f} |")
(out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
(out / "gpu_check.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
