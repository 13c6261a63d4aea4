"""`python -m dtune [overrides]`: the Hydra training app over conf/config.yaml."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dtune.config import check_overrides, register_schema, to_config
from dtune.errors import DtuneError, exit_with


def _config_dir() -> str:
    source_tree = Path(__file__).resolve().parent.parent / "conf"
    return str(source_tree) if source_tree.is_dir() else "pkg://dtune.conf"


@hydra.main(version_base="1.3", config_path=_config_dir(), config_name="config")
def train_app(cfg: DictConfig) -> float | None:
    """Returns the final eval loss, which Hydra sweepers minimise."""
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    try:
        config = to_config(cfg)  # range checks run here, before the heavy imports below
        if config.launcher.name == "slurm":
            from launchers.slurm import submit

            return submit(config, Path(run_dir), list(hydra_cfg.overrides.task))
        return run_training(config, run_dir, list(hydra_cfg.overrides.task))
    except DtuneError as error:
        exit_with(error)


def run_training(config, run_dir: str, overrides: list[str]) -> float | None:
    """Train here: in this process, or in workers started for the processes asked for. Also
    what a SLURM job runs (launchers/slurm.py). Returns the final eval loss."""
    try:
        from dtune import distributed

        if config.parallelism.name == "auto":
            from dtune.plan import resolve_auto

            resolve_auto(config)
        parallel = config.parallelism
        if distributed.launched_ranks(parallel) is None and parallel.name != "single" \
                and distributed.wanted_processes(parallel) > 1:
            distributed.check_process_count(parallel)
            code = distributed.launch_workers(parallel, run_dir, overrides)
            if code:
                sys.exit(code)
            return _read_eval_loss(Path(run_dir))
        from dtune import train

        result = train.run(config, Path(run_dir))
        if os.environ.get("DTUNE_DIE_WITH_PARENT") == "1" and result.summary["world_size"] > 1:
            # A finished worker of dtune's own launch: every file is written and every rank is
            # past the last collective. Skip process-group and interpreter teardown, where gloo
            # and DeepSpeed threads can abort (SIGABRT, seen under load) and fail a good run.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    finally:
        if "dtune.distributed" in sys.modules:
            sys.modules["dtune.distributed"].shutdown()
    return result.summary.get("eval_loss")


def _read_eval_loss(run_dir: Path) -> float | None:
    import json

    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()).get("eval_loss") if summary.is_file() else None


def main() -> None:
    register_schema()
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":
        # Worker ranks (and srun's tasks on other nodes) share rank 0's run dir: only rank 0
        # writes Hydra's files and log.
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled",
                     "hydra/hydra_logging=disabled"]
    try:
        check_overrides([arg for arg in sys.argv[1:] if "=" in arg and not arg.startswith("-")])
    except DtuneError as error:
        exit_with(error)
    train_app()


if __name__ == "__main__":
    main()
