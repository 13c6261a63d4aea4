"""The run directory: its layout, and reading and writing what a run leaves there.

Training, `dtune report`, `dtune check`, eval/generate/merge and the sweep results table all
find a run's files through `RunDir`, so the layout is spelled out once, here:

    RUN_DIR/.hydra/config.yaml    the run's config (`write_record`) metrics.jsonl, summary.json
    RUN_DIR/checkpoints/step-N/   resumable state                   final/  (the HF artifact)
    RUN_DIR/dtune_run.json        the run's id, .dtune.lock         wandb/, slurm_job_id, slurm/
    RUN_DIR/merged[-step-N]/      dtune merge's model               model-*.gguf, eval*.json

Every file here is read and written without following a link planted in its place.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from dtune.errors import DtuneError, excerpt
from dtune.files import (check_replaceable, check_replaceable_file, own_directory, read_text,
                         refuse_enclosing, write_atomically)

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

    def eval_file_at(self, checkpoint: str | None) -> Path:
        """`dtune eval`'s figures: eval.json for final/, eval-step-N.json for a checkpoint."""
        return self.eval_file if checkpoint is None else self.path / f"eval-{checkpoint}.json"

    def merged_at(self, checkpoint: str | None) -> Path:
        """`dtune merge`'s default folder: merged/ from final/, merged-step-N/ from a checkpoint."""
        return self.merged if checkpoint is None else self.path / f"merged-{checkpoint}"

    def gguf_file(self, quant: str, checkpoint: str | None = None) -> Path:
        """`dtune export --gguf`'s default file: model-f16.gguf, model-step-N-q8_0.gguf."""
        return self.path / f"model-{checkpoint + '-' if checkpoint else ''}{quant}.gguf"

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
        """summary.json, None before the run finishes; a damaged one is an error naming it."""
        if not self.summary_file.exists() and not self.summary_file.is_symlink():
            return None
        text = read_text(self.summary_file, errors="replace")
        try:
            summary = json.loads(text)
        except json.JSONDecodeError as exc:
            summary = exc
        if not isinstance(summary, dict):
            found = f"not JSON ({summary.msg} at line {summary.lineno})" \
                if isinstance(summary, Exception) else f"a JSON {type(summary).__name__}"
            raise DtuneError(
                f"{self.summary_file} is damaged: it is {found}, and a run's summary is one "
                f"JSON object (this one starts {excerpt(text, 80)}). The run wrote it when it "
                "finished; restore it from a copy, or delete it to treat the run as unfinished "
                "(its metrics.jsonl still shows its steps).")
        return summary

    def write_summary(self, summary: dict) -> None:
        write_atomically(self.summary_file, json.dumps(summary, indent=2))

    def write_json(self, path: Path, value) -> None:
        write_atomically(path, json.dumps(value, indent=2))

    def write_record(self, config: str, hydra: str | None, overrides: str) -> None:
        """.hydra/: the run's config, Hydra's own and the command line, as YAML text already
        redacted (dtune/redaction.py). Written by dtune, not Hydra, once the run holds the
        directory and its start or resume was found sound: a refused start changes nothing."""
        own_directory(self.hydra, "the run's .hydra folder")
        write_atomically(self.config_file, config)
        if hydra is not None:
            write_atomically(self.hydra / "hydra.yaml", hydra)
        write_atomically(self.overrides_file, overrides)


def check_output_target(out: Path, kind: str, force: bool, reads: list[Path],
                        option: str = "--out", file_kind_of=None,
                        suggestion: Path | None = None) -> None:
    """Refuse, before any work, an output whose writing would destroy more than an output:
    anything in a run's final/ or checkpoints/ (or those folders themselves), --force or not.
    A folder output (`file_kind_of` None) is also refused where it is a folder holding what
    the command reads, the current directory or the home folder (files.refuse_enclosing), a
    run directory or a folder of them; then the kind rule (files.check_replaceable). A file
    output (`file_kind_of` reads the kind a file's own marker names) follows
    files.check_replaceable_file. `suggestion`: the output to name in the messages."""
    target = Path(os.path.realpath(out))
    noun = "folder" if file_kind_of is None else "file"
    suggest = "one that does not exist yet"
    if suggestion is not None or reads:
        suggest = f"e.g. {option} " + str(suggestion or getattr(
            RunDir(reads[0]), kind, RunDir(reads[0]).report))
    for folder in (target, *target.parents):
        run = RunDir(folder.parent)
        if folder in (run.final, run.checkpoints) and run.is_run():
            held = "its trained model" if folder == run.final else "its resumable checkpoints"
            where = f"the {folder.name}/ folder" if folder == target else \
                f"inside the {folder.name}/ folder"
            raise DtuneError(
                f"{option} {out} is {where} of the run {run.path}, which holds {held}; dtune "
                f"never replaces a run's own files, --force or not. Name another {noun}, "
                f"{suggest}.")
    if file_kind_of is not None:
        check_replaceable_file(out, kind, file_kind_of, force, option)
        return
    if RunDir(target).is_run():
        raise DtuneError(
            f"{option} {out} is a run directory: replacing it would delete the run (its config, "
            "metrics, checkpoints and trained model), so dtune refuses it, --force or not. Name "
            f"another folder, {suggest}.")
    runs = []
    with contextlib.suppress(OSError):  # an unreadable folder: check_replaceable says so
        runs = [child for child in (target.iterdir() if target.is_dir() else ())
                if child.is_dir() and not child.is_symlink() and RunDir(child).is_run()]
    if runs:
        raise DtuneError(
            f"{option} {out} holds run directories ({runs[0].name} is one): replacing it would "
            f"delete those runs, so dtune refuses it, --force or not. Name another folder, "
            f"{suggest}.")
    refuse_enclosing(out, reads, option)
    check_replaceable(out, kind, force, option)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A last line cut short (a kill or a full disk during
    the write) is left out with a warning; any other line that is not a JSON object is an
    error naming it."""
    lines = [(number, line) for number, line in enumerate(
        read_text(Path(path), errors="replace").splitlines(), start=1)
        if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if index + 1 < len(lines):
                raise damaged_metrics(path, number, line, f"not JSON ({exc.msg})") from None
            log.warning("%s: its last line is cut short (a run killed while writing it); "
                        "it is left out.", path)
            continue
        if not isinstance(record, dict):
            raise damaged_metrics(path, number, line, f"a JSON {type(record).__name__}")
        records.append(record)
    return records


def damaged_metrics(path: Path, number: int, line: str, found: str) -> DtuneError:
    return DtuneError(
        f"{path}, line {number}: the line is {found}, and every line of metrics.jsonl is one "
        f"JSON object that the run appended ({excerpt(line, 80)}); the file was damaged or "
        "edited. Delete or repair that line (the other records stay as they are).")
