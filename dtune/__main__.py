"""`python -m dtune [overrides]`: the Hydra training app over conf/config.yaml."""
from __future__ import annotations

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
    try:
        config = to_config(cfg)  # range checks run here, before the heavy imports below
        from dtune import train

        result = train.run(config, Path(HydraConfig.get().runtime.output_dir))
    except DtuneError as error:
        exit_with(error)
    return result.summary.get("eval_loss")


def main() -> None:
    register_schema()
    try:
        check_overrides([arg for arg in sys.argv[1:] if "=" in arg and not arg.startswith("-")])
    except DtuneError as error:
        exit_with(error)
    train_app()


if __name__ == "__main__":
    main()
