"""Experiment tracking: mirror what the train loop logs to Weights & Biases.

`metrics.jsonl` and `summary.json` stay the run's own record; a tracker sends the same records
elsewhere. Only the main process talks to W&B, and nothing here may stop training: if W&B
cannot start it falls back to offline, and if that fails too, tracking is off for the run.
"""
from __future__ import annotations

import dataclasses
import logging
import netrc
import os
import subprocess
from pathlib import Path
from urllib.parse import urlparse

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from dtune.config import Config
from dtune.files import own_directory
from dtune.methods import method_spec
from dtune.redaction import masked_argv, redact, secret_values
from dtune.run_dir import RunDir

log = logging.getLogger("dtune")


class Tracker:
    """The `tracker=none` tracker, and every process but the main one: does nothing."""

    def log(self, record: dict) -> None:
        """Send one metrics record (a training step or an eval) as `MetricsLog.write` got it."""

    def summary(self, summary: dict) -> None:
        """Send the run's final summary."""

    def finish(self) -> None:
        """Close the tracker's run; call once, at the end of training."""


def create_tracker(cfg: Config, run_dir: Path, run_id: str,
                   is_main_process: bool = True) -> Tracker:
    """The tracker `cfg.tracker` asks for, for the run `run_id` (dtune/run_start.py: kept when
    it resumes, new for a fresh run)."""
    if not is_main_process:
        return Tracker()
    return TRACKERS[cfg.tracker.name](cfg, Path(run_dir), run_id)


class WandbTracker(Tracker):
    def __init__(self, cfg: Config, run_dir: Path, run_id: str):
        import wandb  # deliberately here: a second to import, and only tracker=wandb needs it

        self.wandb, self.cfg, self.run_dir = wandb, cfg, run_dir
        self.secrets = secret_values(os.environ)
        # dtune's own run id: a resumed run continues its W&B run, a fresh one starts another
        self.run_id = run_id
        own_directory(RunDir(run_dir).wandb, "W&B's folder in the run directory")
        args = init_args(cfg, run_dir, self.run_id, os.environ)
        args["config"] = redact(args["config"], self.secrets)
        mode, reason = choose_mode(cfg.tracker.mode, os.environ)
        self.run = self._start(args, mode, reason)
        # W&B drops steps below the resumed run's counter: those were logged before the kill.
        self.first_step = self.run.step if self.run is not None else 0

    def _start(self, args: dict, mode: str | None, reason: str):
        wandb = self.wandb
        try:
            # silent: dtune prints the few lines that matter (where the run is, how to sync).
            # W&B looks for git in its dir, the run dir; point it at the launch repository.
            repo = git_root()
            settings = wandb.Settings(silent=True, git_root=repo, disable_git=repo is None)
            with masked_argv():  # W&B uploads the command line as the run's `args`
                run = wandb.init(**args, mode=mode, settings=settings)
        except Exception as exc:  # a bad key, no network, a server error: keep training
            if mode == "offline":
                log.warning("W&B could not start offline either (%s); tracking is off for "
                            "this run, metrics.jsonl has every metric.", _first_line(exc))
                return None
            log.warning("W&B could not start online (%s); logging offline instead.",
                        _first_line(exc))
            try:
                wandb.teardown()  # the failed service still holds the run id
            except Exception:
                pass
            return self._start(args, "offline", "W&B could not be reached")
        if run.offline:
            log.warning("W&B is offline for this run (%s). Upload it later with: "
                        "wandb sync %s", reason, RunDir(self.run_dir).wandb)
        elif run.url:
            log.info("W&B run: %s", run.url)
        return run

    def log(self, record: dict) -> None:
        step = int(record.get("step", 0))
        if self.run is None or step < self.first_step:
            return
        self._call(self.run.log, wandb_metrics(record), step=step)

    def summary(self, summary: dict) -> None:
        if self.run is not None:
            clean = {k: v for k, v in redact(summary, self.secrets).items() if v is not None}
            self._call(self.run.summary.update, clean)

    def finish(self) -> None:
        if self.run is None:
            return
        final = RunDir(self.run_dir).final
        if self.cfg.tracker.log_artifact and final.is_dir():
            self._call(self._log_artifact, final)
        self._call(self.run.finish)
        self.run = None

    def _log_artifact(self, final: Path) -> None:
        # Named by run id, so a resumed run adds versions to its own artifact.
        kind = "adapter" if method_spec(self.cfg.method).adapter else "model"
        artifact = self.wandb.Artifact(f"dtune-{kind}-{self.run_id}", type="model",
                                       metadata={"method": self.cfg.method.name,
                                                 "model": self.cfg.model.name_or_path})
        artifact.add_dir(str(final))
        self.run.log_artifact(artifact)

    def _call(self, fn, *args, **kwargs) -> None:
        """Run a W&B call; the first failure turns tracking off instead of ending training."""
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            log.warning("W&B failed (%s); tracking is off for the rest of this run, "
                        "metrics.jsonl has every metric.", _first_line(exc))
            run, self.run = self.run, None
            try:
                run.finish(exit_code=1)
            except Exception:
                pass


# One entry per `tracker=` option (conf/tracker/*.yaml): (config, run dir, run id) -> Tracker.
TRACKERS = {"none": lambda cfg, run_dir, run_id: Tracker(), "wandb": WandbTracker}


def wandb_metrics(record: dict) -> dict:
    """W&B names for a metrics.jsonl record: `train/loss`, `eval/loss`, `eval/exact_match/add`."""
    if record.get("split") == "eval":
        out = {}
        for key, value in record.items():
            if key in ("step", "split"):
                continue
            out["eval/loss" if key == "eval_loss" else f"eval/{key}"] = value
        return out
    return {f"train/{k}": v for k, v in record.items() if k != "step"}


def init_args(cfg: Config, run_dir: Path, run_id: str, env) -> dict:
    """`wandb.init` arguments, with dtune's defaults where the config leaves a field unset."""
    t = cfg.tracker
    sweep_dir = hydra_sweep_dir()
    group = t.group
    if group is None and sweep_dir is not None:
        group = sweep_dir[-128:]  # W&B's limit on group names
    if group is None and env.get("SLURM_ARRAY_JOB_ID"):
        group = f"slurm-array-{env['SLURM_ARRAY_JOB_ID']}"
    return {
        "project": t.project,
        "entity": t.entity,
        "name": t.run_name or default_run_name(run_dir),
        "group": group,
        "tags": list(t.tags) if t.tags is not None else
        [cfg.method.name, cfg.model.name, cfg.parallelism.name]
        + ([cfg.objective.name] if cfg.objective.name != "sft" else []),
        "config": dataclasses.asdict(cfg),  # the fully resolved config
        "id": run_id,
        "resume": "allow",
        "dir": str(run_dir),
        "job_type": "train",
    }


def default_run_name(run_dir: Path) -> str:
    """The run dir relative to the working directory (less a leading `runs/`), else its name,
    with the sweep's folder name before a bare job number: `lr-sweep/3`."""
    run_dir = Path(run_dir).resolve()
    try:
        relative = run_dir.relative_to(Path.cwd().resolve())
    except ValueError:
        return f"{run_dir.parent.name}/{run_dir.name}" if run_dir.name.isdigit() \
            else run_dir.name
    parts = relative.parts[1:] if relative.parts[:1] == ("runs",) and len(relative.parts) > 1 \
        else relative.parts
    return "/".join(parts) or run_dir.name


def hydra_sweep_dir() -> str | None:
    """The sweep dir when this process runs one job of a Hydra multirun."""
    try:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return str(HydraConfig.get().sweep.dir)
    except Exception:  # no Hydra context (an in-process run): no sweep
        pass
    return None


def choose_mode(configured: str | None, env) -> tuple[str | None, str]:
    """(mode for wandb.init, why). tracker.mode wins, then WANDB_MODE (wandb reads it itself),
    then online if credentials exist, else offline: a machine with no account still tracks."""
    if configured:
        return configured, f"tracker.mode={configured}"
    if env.get("WANDB_MODE"):
        return None, f"WANDB_MODE={env['WANDB_MODE']}"
    if has_credentials(env):
        return "online", "credentials found"
    return "offline", "no W&B API key or `wandb login` found"


def has_credentials(env) -> bool:
    """An API key in the environment, an identity token file, or a `wandb login` in netrc."""
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return bool(host) and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def git_root() -> str | None:
    """The repository the run was launched from, so W&B records its commit (W&B would look
    in the run dir, which is not one)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return out.stdout.strip()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
