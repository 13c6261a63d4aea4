"""A results table for every Hydra sweep: results.csv and results.md in the sweep dir.

Registered in conf/config.yaml as a Hydra callback, so it runs after any multirun - sequential,
on SLURM as an array job (hydra/launcher=submitit_slurm), or an Optuna search. It reads the
job folders rather than what the launcher returned, so jobs that failed still get a row: a
job dtune refused ends as a failed job (errors.JobFailed) rather than ending the sweep, and
each job's end records its outcome in the sweep dir (`.dtune-jobs/`, read by `collect`), from
wherever the job ran. The table is rewritten as each job ends, and the sweep exits non-zero
when a job failed.
Nothing here writes or reads through a link planted in the sweep dir: it is checked to be a
folder of this user's before the sweep writes anything, and files go in by rename.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import json
import re
import shutil
import sys

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dtune.errors import DtuneError, JobFailed, exit_with
from dtune.files import check_own_directory, own_directory, read_text, refuse_symlink, \
    write_atomically
from dtune.redaction import redact
from dtune.launchers.slurm import require_sbatch
from dtune.run_dir import RunDir

COLUMNS = ["job", "overrides", "state", "eval_loss", "final_loss", "exact_match_after",
           "steps", "run_dir"]
# What the sweep writes into its own dir (Hydra's multirun.yaml, this table).
SWEEP_FILES = ("multirun.yaml", "results.csv", "results.md")
OUTCOMES = ".dtune-jobs"  # in the sweep dir: one file per job that failed, with the reason


class SweepResults(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """Before Hydra writes multirun.yaml: the sweep dir is a real folder of this user's
        and nothing the sweep writes there is a planted link."""
        try:
            sweep_dir = own_directory(Path(config.hydra.sweep.dir), "the sweep directory "
                                      "(hydra.sweep.dir)", parents=True)
            for name in SWEEP_FILES:
                refuse_symlink(sweep_dir / name)
            outcomes = own_directory(sweep_dir / OUTCOMES, "the sweep's job records")
            shutil.rmtree(outcomes)  # an earlier sweep's, in this dir: this one starts afresh
            if "submitit" in str(config.hydra.launcher.get("_target_", "")) \
                    and "Slurm" in str(config.hydra.launcher._target_):
                require_sbatch("hydra/launcher=submitit_slurm",
                               "or sweep here with the default launcher (leave out "
                               "hydra/launcher=submitit_slurm)")
        except DtuneError as error:
            exit_with(error)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        """A sweep job's command line, in a job folder of its own that holds no run yet, so
        that a job refused before it starts still gets its row. The run, once it holds the
        folder, writes the whole record (dtune/app.py record_run)."""
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

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        """Where the job ran (here, or a SLURM node): its outcome, if it failed, then the
        table as it stands."""
        if HydraConfig.get().mode.name != "MULTIRUN":
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        run = Path(HydraConfig.get().runtime.output_dir)
        value = getattr(job_return, "_return_value", None)
        reason = value.message if isinstance(value, JobFailed) else \
            f"{type(value).__name__}: {value}" if job_return.status == JobStatus.FAILED else None
        try:
            if reason is not None:
                record_failure(sweep_dir, run, reason)
            write_tables(sweep_dir, collect(sweep_dir))
        except DtuneError as error:
            print(f"dtune: warning: the sweep's results table was not updated: {error}",
                  file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect(sweep_dir)
        write_tables(sweep_dir, rows)
        failed = [row["job"] for row in rows if row["state"].startswith("failed")]
        print(f"Sweep results ({len(rows)} jobs): {sweep_dir / 'results.md'}", flush=True)
        if failed:  # a sweep with a failed job does not end as a success
            print(f"dtune: {len(failed)} of {len(rows)} sweep jobs failed ({', '.join(failed)});"
                  " results.md gives each one's reason.", file=sys.stderr, flush=True)
            sys.exit(1)


def record_failure(sweep_dir: Path, run: Path, reason: str) -> None:
    """The job's failure, in the sweep dir (the job's own folder may hold another run)."""
    job = run.relative_to(sweep_dir).as_posix() if run.is_relative_to(sweep_dir) else str(run)
    folder = own_directory(sweep_dir / OUTCOMES, "the sweep's job records")
    write_atomically(folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', job)}.json",
                     json.dumps({"job": job, "reason": " ".join(reason.split())}))


def failures(sweep_dir: Path) -> dict[str, str]:
    """{job: the reason it failed} as this sweep's jobs recorded them."""
    folder = sweep_dir / OUTCOMES
    found = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(read_text(path))
            found[str(record["job"])] = str(record["reason"])
        except (OSError, ValueError, KeyError, TypeError, DtuneError):
            continue
    return found


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job folder (one holding .hydra/overrides.yaml), in job order."""
    rows, failed = [], failures(sweep_dir)
    for overrides_file in sweep_dir.glob("**/.hydra/overrides.yaml"):
        run = RunDir(overrides_file.parent.parent)
        overrides = OmegaConf.to_container(OmegaConf.create(read_text(overrides_file)))
        row = {"job": run.path.relative_to(sweep_dir).as_posix(),
               "overrides": " ".join(overrides), "run_dir": str(run.path)}
        summary = None if row["job"] in failed else read_summary(run)
        if row["job"] in failed:  # this sweep's job, whatever an earlier run left there
            row["state"] = f"failed: {first_sentence(failed[row['job']])}"
        elif summary is not None:
            row.update(state="completed", **{k: summary.get(k) for k in
                                             ("eval_loss", "final_loss", "exact_match_after",
                                              "steps")})
        elif run.slurm_job_id_file.is_file():
            job = read_text(run.slurm_job_id_file).strip()[:40]
            row["state"] = f"submitted (SLURM job {job})"
        elif run.checkpoints.is_dir():
            row["state"] = "stopped (resumable)"
        else:
            row["state"] = "not run (or stopped before its first checkpoint)"
        rows.append(row)
    return sorted(rows, key=lambda r: [int(p) if p.isdigit() else p for p in r["job"].split("/")])


def read_summary(run: RunDir) -> dict | None:
    try:
        return run.read_summary()
    except DtuneError:  # a damaged summary.json: its row says so, the others are still shown
        return {"steps": "summary.json damaged"}


def first_sentence(reason: str, limit: int = 160) -> str:
    """The start of a refusal's paragraph, for a table cell: what went wrong, not the fix."""
    text = reason.removeprefix("dtune: error: ")
    end = text.find(". ")
    text = text[: end + 1] if 0 < end < limit else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
