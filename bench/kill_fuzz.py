"""Kill fuzz: SIGKILL a training run at random moments - during steps and during checkpoint
writes - then resume it, and check that it continued from the last complete checkpoint (or
started clean) and trained exactly as an uninterrupted run: no crash on a half-written folder,
no silent jump.

    python bench/kill_fuzz.py --trials 20 [--work-dir DIR] [--seed 0] [--record]
    python bench/kill_fuzz.py --trials 20 --in-save [--record]

--in-save lands every kill inside a checkpoint write: the run pauses between a checkpoint's
files (DTUNE_CHECKPOINT_PAUSE_S, read by dtune/checkpoint.py) and the kill comes at a random
moment after the temporary folder appears, while it is still being written.

Prints a table; writes WORK_DIR/kill_fuzz.json, and with --record bench/results/kill_fuzz.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dtune.parity import step_losses  # noqa: E402
from dtune.checkpoint import valid_checkpoints  # noqa: E402

STEPS = 30
OVERRIDES = ["model=tiny-llama", "+method=full", "train.lr=1e-3", "eval.exact_match_samples=0",
             f"train.max_steps={STEPS}", "train.save_every=2", "train.keep_checkpoints=2",
             "train.micro_batch_size=8", "data.builtin.train_size=512",
             "data.builtin.eval_size=8", "train.warmup_steps=0", "train.log_every=1"]


def command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dtune", *OVERRIDES, *extra, f"hydra.run.dir={run_dir}"]


def step_of(folder: Path) -> int:
    return int(folder.name.split("-", 1)[1])


def logged_steps(metrics: Path) -> int:
    try:
        return metrics.read_text().count('"loss"')
    except OSError:
        return 0


PAUSE_S = 0.4  # --in-save: between a checkpoint's files


def trial(run_dir: Path, target_step: int, delay: float, reference: list[float],
          in_save: bool = False) -> dict:
    """Kill `delay` seconds after step `target_step` was logged: mid-step or mid-save,
    whatever the machine's speed. `in_save`: `delay` after the next checkpoint write began."""
    env = {**os.environ, "DTUNE_CHECKPOINT_PAUSE_S": str(PAUSE_S)} if in_save else None
    process = subprocess.Popen(command(run_dir), cwd=ROOT, start_new_session=True, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    while process.poll() is None and logged_steps(metrics) < target_step:
        time.sleep(0.002)
    if in_save:
        while process.poll() is None \
                and not any((run_dir / "checkpoints").glob(".step-*.tmp-*")):
            time.sleep(0.001)
    time.sleep(delay)
    before = [step_of(c) for c in valid_checkpoints(run_dir)]
    finished_first = process.poll() is not None
    if not finished_first:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    during_save = any((run_dir / "checkpoints").glob(".step-*.tmp-*"))
    after = [step_of(c) for c in valid_checkpoints(run_dir)]
    # a step-N folder that is not complete would be a half-visible checkpoint
    half_visible = [p.name for p in (run_dir / "checkpoints").glob("step-*")
                    if step_of(p) not in after] if (run_dir / "checkpoints").is_dir() else []
    lost = bool(before) and not any(step >= max(before) for step in after)

    resumed = subprocess.run(command(run_dir, "train.resume=true"), cwd=ROOT,
                             capture_output=True, text=True)
    summary = json.loads((run_dir / "summary.json").read_text()) if resumed.returncode == 0 \
        else {}
    losses = step_losses(run_dir) if resumed.returncode == 0 else []
    resumed_from = summary.get("resumed_from")
    expected_from = f"step-{max(after)}" if after else None
    from_right_place = (resumed_from or "").endswith(expected_from or "") if expected_from \
        else resumed_from is None
    return {
        "target_step": target_step,
        "delay_s": round(delay, 3),
        "killed": not finished_first,
        "kill_during_save": during_save,
        "complete_before": before,
        "complete_after": after,
        "checkpoint_lost": lost,
        "half_visible": half_visible,
        "resume_exit": resumed.returncode,
        "resumed_from": resumed_from,
        "resume_ok": resumed.returncode == 0 and from_right_place,
        "silent_jump": resumed.returncode == 0 and losses != reference,
        "error": resumed.stderr[-800:] if resumed.returncode else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-save", action="store_true",
                        help="land every kill inside a checkpoint write")
    parser.add_argument("--record", action="store_true",
                        help="also write bench/results/kill_fuzz.md (kill_fuzz_in_save.md)")
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dtune-kill-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    env_ok = subprocess.run(command(work / "reference"), cwd=ROOT, capture_output=True,
                            text=True)
    if env_ok.returncode != 0:
        raise SystemExit(f"the reference run failed:\n{env_ok.stderr[-2000:]}")
    reference = step_losses(work / "reference")
    step_s = json.loads((work / "reference" / "summary.json").read_text())["loop_time_s"] / STEPS
    rng = random.Random(args.seed)
    rows = []
    for index in range(args.trials):
        # a random step, then a random moment within the next step and its checkpoint write
        if args.in_save:  # a moment inside the save's two pauses
            rows.append(trial(work / f"trial-{index:02d}", rng.randint(1, STEPS - 3),
                              rng.uniform(0, 2 * PAUSE_S), reference, in_save=True))
        else:
            rows.append(trial(work / f"trial-{index:02d}", rng.randint(1, STEPS - 1),
                              rng.uniform(0, 2 * step_s), reference))
        print(json.dumps(rows[-1]), flush=True)
    killed = [r for r in rows if r["killed"]]
    result = {
        "trials": len(rows),
        "killed": len(killed),
        "kills_during_save": sum(r["kill_during_save"] for r in rows),
        "resumes_ok": sum(r["resume_ok"] for r in rows),
        "checkpoints_lost": sum(r["checkpoint_lost"] for r in rows),
        "silent_jumps": sum(r["silent_jump"] for r in rows),
        "half_visible": sum(bool(r["half_visible"]) for r in rows),
        "rows": rows,
    }
    (work / "kill_fuzz.json").write_text(json.dumps(result, indent=2))
    table = "\n".join([
        f"Command: `python bench/kill_fuzz.py --trials {args.trials} --seed {args.seed}"
        f"{' --in-save' if args.in_save else ''}`", "",
        "| trials | killed mid-run | kills during save | resumes OK | checkpoints lost | "
        "half-visible checkpoints | silent jumps |", "|---|---|---|---|---|---|---|",
        f"| {result['trials']} | {result['killed']} | {result['kills_during_save']} | "
        f"{result['resumes_ok']} | {result['checkpoints_lost']} | {result['half_visible']} | "
        f"{result['silent_jumps']} |",
    ])
    print(table)
    if args.record:
        name = "kill_fuzz_in_save.md" if args.in_save else "kill_fuzz.md"
        (ROOT / "bench" / "results" / name).write_text(table + "\n")
    ok = result["resumes_ok"] == len(rows) and not result["checkpoints_lost"] \
        and not result["silent_jumps"] and not result["half_visible"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
