"""Record the golden runs that tests/test_golden_runs.py compares against.

    python tests/golden_runs/record.py            # rewrites tests/golden_runs/runs.json

Recorded once, on the code before the architecture change (issue: "one recipe read top to
bottom"), so that a refactor that changes what a run computes or leaves behind shows up as a
failing test. Re-record only when a change of behaviour is intended, and say so in the commit.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import TINY  # noqa: E402

# fp32 only: CPU fp32 is deterministic, and later issues change what bf16/fp16 runs compute.
RUNS = {
    "lora": [*TINY, "+method=lora", "train.max_steps=8", "train.lr=3e-3", "train.eval_every=4",
             "train.save_every=4"],
    "full_packed_accum": [*TINY, "+method=full", "data.packing=true", "train.grad_accum_steps=2",
                          "train.max_steps=6", "train.lr=1e-3", "train.lr_schedule=linear",
                          "train.warmup_steps=2", "eval.exact_match_samples=0"],
    "ia3": [*TINY, "+method=ia3", "train.max_steps=4", "train.lr=1e-2",
            "eval.exact_match_samples=0", "train.loss_chunk_size=0"],
    "zero2_two_ranks": [*TINY, "+method=full", "parallelism=zero2", "parallelism.nproc_per_node=2",
                        "train.max_steps=4", "train.lr=1e-3", "eval.exact_match_samples=0"],
}
# Keys of summary.json whose values depend on the machine, not on what was trained.
VOLATILE = ("wall_time_s", "loop_time_s", "train_time_s", "tokens_per_s", "peak_memory_bytes",
            "train_peak_memory_bytes", "peak_memory_bytes_per_rank",
            "train_peak_memory_bytes_per_rank", "model_source", "resumed_from",
            "peak_memory_reserved_bytes", "peak_host_memory_bytes", "parameter_bytes",
            "frozen_parameter_bytes")


def run(name: str, overrides: list[str], work: Path) -> dict:
    run_dir = work / name
    done = subprocess.run([sys.executable, "-m", "dtune", *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "GLOO_SOCKET_IFNAME": "lo"})
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return describe(run_dir)


def describe(run_dir: Path) -> dict:
    """What a run computed and left: per-step losses, evals, summary figures, its files."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "losses": [r["loss"] for r in records if "loss" in r],
        "grad_norms": [r["grad_norm"] for r in records if "loss" in r],
        "lrs": [r["lr"] for r in records if "loss" in r],
        "evals": [{k: v for k, v in r.items()} for r in records if r.get("split") == "eval"],
        "step_keys": sorted({k for r in records if "loss" in r for k in r}),
        "summary": {k: v for k, v in summary.items() if k not in VOLATILE},
        "summary_keys": sorted(summary),
        "files": sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                        if p.is_file() and not p.name.endswith(".log")),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        result = {name: run(name, overrides, Path(work)) for name, overrides in RUNS.items()}
    out = Path(__file__).with_name("runs.json")
    out.write_text(json.dumps({"overrides": RUNS, "runs": result}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
