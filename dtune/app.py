"""The Hydra training app over conf/config.yaml: `python -m dtune [overrides]` and
`dtune train [overrides]` (dtune/__main__.py, dtune/cli.py) hand the command line to main().

The launcher the config names (`launcher._target_`) runs the training: here
(dtune.launch.run_training) or as a SLURM job (dtune.launchers.slurm.submit).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from dtune.compose import check_moved, check_overrides, config_dir, register_schema, to_config
from dtune.errors import DtuneError, JobFailed, exit_with, print_error
from dtune.redaction import MaskSecrets, redact, take_env_secrets
from dtune.run_dir import RunDir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def train_app(cfg: DictConfig) -> float | None:
    """Returns the final eval loss, which Hydra sweepers minimise."""
    hydra_cfg = HydraConfig.get()
    run_dir = RunDir(Path(hydra_cfg.runtime.output_dir))
    try:
        config, launch = settled_launch(cfg)
        from dtune import run_start  # torch: after the config checks, which need none

        if not run_start.answers_for_run(config):  # a worker: its launcher holds the run dir
            return launch(config, str(run_dir.path), list(hydra_cfg.overrides.task))
        with run_start.claimed(config, run_dir,  # the lock, a fresh run or a resume
                               world_size=run_start.planned_world_size(config)):
            record_run(run_dir, cfg, hydra_cfg)
            return launch(config, str(run_dir.path), list(hydra_cfg.overrides.task))
    except DtuneError as error:
        if hydra_cfg.mode == RunMode.MULTIRUN:  # the sweep goes on; its table says why
            print_error(error)
            return JobFailed(str(error))
        exit_with(error)
    except SystemExit as stop:  # the workers of a multi-process job failed (their words above)
        if hydra_cfg.mode == RunMode.MULTIRUN and stop.code:
            return JobFailed(f"its worker processes exited with status {stop.code}; their "
                             "messages are in the sweep's output")
        raise


def settled_launch(cfg: DictConfig):
    """(the settled config, the function that launches it). A worker that dtune started
    receives the config its launcher settled, and trains; anything else settles the composed
    one here, once, with every check that needs neither model nor data, before the launcher
    (launcher._target_) submits a job or starts a worker."""
    from dtune.settle import received, settle

    handed = received()
    if handed is not None:
        from dtune.launch import run_training

        return handed, run_training
    config = to_config(cfg)  # the settings' own checks, before torch loads
    check_moved("launcher._target_", config.launcher._target_)
    launch = get_method(config.launcher._target_)
    return settle(config), launch


def record_run(run_dir: RunDir, cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """RUN_DIR/.hydra as Hydra would write it (conf/config.yaml turns Hydra's own writing
    off), once the run holds the directory, through one redaction pass."""
    def text(node) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(redact(
            OmegaConf.to_container(node, resolve=False))))

    run_dir.write_record(text(cfg), text(OmegaConf.create({"hydra": hydra_cfg})),
                         text(hydra_cfg.overrides.task))


def main(tools: tuple[str, ...]) -> None:
    """Train from sys.argv[1:]; `tools` are the dtune commands, named when a word on the
    command line is neither a setting nor a tool."""
    register_schema()
    # Before Hydra parses the command line: what it parses, it saves under RUN_DIR/.hydra.
    sys.argv[1:] = take_env_secrets(sys.argv[1:])
    logging.getLogger("dtune").addFilter(MaskSecrets())
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":
        # Worker ranks (and srun's tasks on other nodes) share rank 0's run dir: only rank 0
        # writes Hydra's files and log.
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled",
                     "hydra/hydra_logging=disabled"]
    try:
        refuse_bare_words(sys.argv[1:], tools)
        check_overrides([arg for arg in sys.argv[1:] if "=" in arg and not arg.startswith("-")])
    except DtuneError as error:
        exit_with(error)
    train_app()


# Hydra's own flags whose value follows as the next word (`hydra --help` lists them).
HYDRA_FLAGS_WITH_VALUES = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                           "--cfg", "-c", "--package", "-p", "--info", "-i",
                           "--experimental-rerun"}


def refuse_bare_words(args: list[str], tools: tuple[str, ...]) -> None:
    """A word with no `=` is neither a setting nor a tool: Hydra would stop on it with a
    grammar traceback ("missing EQUAL")."""
    for before, arg in zip([""] + args, args):
        if before in HYDRA_FLAGS_WITH_VALUES:  # --config-dir DIR: a value, not a word
            continue
        if "=" not in arg and not arg.startswith(("-", "~")):
            raise DtuneError(
                f"{arg!r} on the command line is neither a setting nor a dtune tool. Settings "
                f"are key=value (a method, for example, is `+method=qlora`), and the tools "
                f"are {', '.join(tools)}: for example `python -m dtune eval RUN_DIR`. "
                "`python -m dtune --help` lists the settings' groups.")

