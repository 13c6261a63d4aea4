"""The run directory: its layout, and reading and writing what a run leaves there.

Training, `dtune report`, `dtune check`, eval/generate/merge and the sweep results table all
find a run's files through `RunDir`, so the layout is spelled out once, here:

    RUN_DIR/.hydra/config.yaml    the resolved config (Hydra)      metrics.jsonl, summary.json
    RUN_DIR/checkpoints/step-N/   resumable state                  final/  (the HF artifact)
    RUN_DIR/wandb_run_id, wandb/  W&B                              slurm_job_id, slurm/
"""
from __future__ import annotations

import json
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from dtune.files import write_atomically

log = logging.getLogger("dtune")


def resume_overrides(run_dir) -> str:
    """`hydra.run.dir=RUN_DIR train.resume=true` as a shell command line must spell it: a
    path with spaces, commas or quotes is quoted for Hydra's grammar (where a comma would make
    a sweep) and then for the shell, so the suggested command runs as printed."""
    path = str(run_dir)
    if not re.fullmatch(r"[\w./~+@%-]+", path):
        # Hydra unescapes a backslash only before a quote or at the end of a quoted value.
        path = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, path)
        path = "'" + path.replace("'", "\\'") + "'"
    return f"{shlex.quote('hydra.run.dir=' + path)} train.resume=true"


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # --- the layout ---------------------------------------------------------------------
    @property
    def run_file(self) -> Path:
        """Which run owns this directory: its run id, written when the run starts."""
        return self.path / "dtune_run.json"

    @property
    def lock_file(self) -> Path:
        """Held (flock) by the run that writes here, for its whole life."""
        return self.path / ".dtune.lock"

    @property
    def hydra(self) -> Path:
        return self.path / ".hydra"

    @property
    def config_file(self) -> Path:
        return self.hydra / "config.yaml"

    @property
    def overrides_file(self) -> Path:
        return self.hydra / "overrides.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def merged(self) -> Path:
        return self.path / "merged"

    @property
    def eval_file(self) -> Path:
        return self.path / "eval.json"

    @property
    def reference_logps(self) -> Path:
        """DPO's precomputed reference log-probs (dtune/reference.py)."""
        return self.path / "reference_logps.safetensors"

    @property
    def report(self) -> Path:
        return self.path / "report"

    @property
    def log_file(self) -> Path:
        return self.path / "dtune.log"

    @property
    def wandb_run_id_file(self) -> Path:
        return self.path / "wandb_run_id"

    @property
    def wandb(self) -> Path:
        return self.path / "wandb"

    @property
    def slurm_job_id_file(self) -> Path:
        return self.path / "slurm_job_id"

    @property
    def slurm(self) -> Path:
        return self.path / "slurm"

    # --- what is in it --------------------------------------------------------------------
    def is_run(self) -> bool:
        return self.run_file.is_file() or self.config_file.is_file() \
            or self.metrics_file.is_file()

    def final_is_adapter(self) -> bool:
        """Whether final/ is a PEFT adapter (else a full model folder)."""
        return (self.final / "adapter_config.json").is_file()

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.metrics_file)

    def step_records(self) -> list[dict]:
        """The training steps of metrics.jsonl (not the evals), in order."""
        return [r for r in self.read_metrics() if "loss" in r and r.get("split") != "eval"]

    def read_summary(self) -> dict | None:
        return json.loads(self.summary_file.read_text()) if self.summary_file.is_file() else None

    def write_summary(self, summary: dict) -> None:
        write_atomically(self.summary_file, json.dumps(summary, indent=2))

    def write_json(self, path: Path, value) -> None:
        write_atomically(path, json.dumps(value, indent=2))


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A last line cut short (a kill or a full disk during
    the write) is left out with a warning; anything else that is not JSON is an error."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise
            log.warning("%s: its last line is cut short (a run killed while writing it); "
                        "it is left out.", path)
    return records
