"""A results table for every Hydra sweep: results.csv and results.md in the sweep dir.

Registered in conf/config.yaml as a Hydra callback, so it runs after any multirun - sequential,
on SLURM as an array job (hydra/launcher=submitit_slurm), or an Optuna search. It reads the
job folders rather than what the launcher returned, so jobs that failed still get a row.
"""
from __future__ import annotations

import csv
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dtune.run_dir import RunDir

COLUMNS = ["job", "overrides", "state", "eval_loss", "final_loss", "exact_match_after",
           "steps", "run_dir"]


class SweepResults(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            rows = collect(sweep_dir)
            write_tables(sweep_dir, rows)
            print(f"Sweep results ({len(rows)} jobs): {sweep_dir / 'results.md'}", flush=True)


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job folder (one holding .hydra/overrides.yaml), in job order."""
    rows = []
    for overrides_file in sweep_dir.glob("**/.hydra/overrides.yaml"):
        run = RunDir(overrides_file.parent.parent)
        overrides = OmegaConf.to_container(OmegaConf.load(overrides_file))
        row = {"job": run.path.relative_to(sweep_dir).as_posix(),
               "overrides": " ".join(overrides), "run_dir": str(run.path)}
        summary = run.read_summary()
        if summary is not None:
            row.update(state="completed", **{k: summary.get(k) for k in
                                             ("eval_loss", "final_loss", "exact_match_after",
                                              "steps")})
        elif run.slurm_job_id_file.is_file():
            row["state"] = f"submitted (SLURM job {run.slurm_job_id_file.read_text().strip()})"
        elif run.checkpoints.is_dir():
            row["state"] = "stopped (resumable)"
        else:
            row["state"] = "failed or not run"
        rows.append(row)
    return sorted(rows, key=lambda r: [int(p) if p.isdigit() else p for p in r["job"].split("/")])


def write_tables(sweep_dir: Path, rows: list[dict]) -> None:
    with (sweep_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(k)) for k in COLUMNS) + " |" for row in rows]
    (sweep_dir / "results.md").write_text("\n".join(lines) + "\n")
