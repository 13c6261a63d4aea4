"""A results table for every Hydra sweep: results.csv and results.md in the sweep dir.

Registered in conf/config.yaml as a Hydra callback, so it runs after any multirun - sequential,
on SLURM as an array job (hydra/launcher=submitit_slurm), or an Optuna search. It reads the
job folders rather than what the launcher returned, so jobs that failed still get a row.
Nothing here writes or reads through a link planted in the sweep dir: it is checked to be a
folder of this user's before the sweep writes anything, and files go in by rename.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dtune.errors import DtuneError, exit_with
from dtune.files import check_own_directory, own_directory, read_text, refuse_symlink, \
    write_atomically
from dtune.redaction import redact
from dtune.run_dir import RunDir

COLUMNS = ["job", "overrides", "state", "eval_loss", "final_loss", "exact_match_after",
           "steps", "run_dir"]
# What the sweep writes into its own dir (Hydra's multirun.yaml, this table).
SWEEP_FILES = ("multirun.yaml", "results.csv", "results.md")


class SweepResults(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """Before Hydra writes multirun.yaml: the sweep dir is a real folder of this user's
        and nothing the sweep writes there is a planted link."""
        try:
            sweep_dir = own_directory(Path(config.hydra.sweep.dir), "the sweep directory "
                                      "(hydra.sweep.dir)", parents=True)
            for name in SWEEP_FILES:
                refuse_symlink(sweep_dir / name)
        except DtuneError as error:
            exit_with(error)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        """A sweep job's command line, in a job folder of its own that holds no run yet, so
        that a job refused before it starts still gets its row. The run, once it holds the
        folder, writes the whole record (dtune/__main__.py record_run)."""
        run = RunDir(Path(HydraConfig.get().runtime.output_dir))
        try:
            check_own_directory(run.path)
            if HydraConfig.get().mode.name == "MULTIRUN" and not run.is_run() \
                    and not run.hydra.exists():
                own_directory(run.hydra)
                write_atomically(run.overrides_file, OmegaConf.to_yaml(OmegaConf.create(
                    redact(list(config.hydra.overrides.task)))))
        except DtuneError:
            pass  # the job itself refuses that folder, in its own words

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
        overrides = OmegaConf.to_container(OmegaConf.create(read_text(overrides_file)))
        row = {"job": run.path.relative_to(sweep_dir).as_posix(),
               "overrides": " ".join(overrides), "run_dir": str(run.path)}
        summary = run.read_summary()
        if summary is not None:
            row.update(state="completed", **{k: summary.get(k) for k in
                                             ("eval_loss", "final_loss", "exact_match_after",
                                              "steps")})
        elif run.slurm_job_id_file.is_file():
            job = read_text(run.slurm_job_id_file).strip()[:40]
            row["state"] = f"submitted (SLURM job {job})"
        elif run.checkpoints.is_dir():
            row["state"] = "stopped (resumable)"
        else:
            row["state"] = "failed or not run"
        rows.append(row)
    return sorted(rows, key=lambda r: [int(p) if p.isdigit() else p for p in r["job"].split("/")])


def write_tables(sweep_dir: Path, rows: list[dict]) -> None:
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in COLUMNS})
    write_atomically(sweep_dir / "results.csv", table.getvalue())

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(k)) for k in COLUMNS) + " |" for row in rows]
    write_atomically(sweep_dir / "results.md", "\n".join(lines) + "\n")
