"""Read back what a run left in its directory: its config and its final model."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from dtune.config import Config, to_config
from dtune.errors import DtuneError


def load_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise DtuneError(
            f"{run_dir} is not a dtune run directory: {path} is missing. Pass the folder a "
            "training run wrote (its hydra.run.dir)."
        )
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    return to_config(merged)


def load_final_model(run_dir: Path):
    """Return (model, tokenizer, config) from `run_dir/final`: base + adapter, or a full model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dtune.logs import quiet_libraries
    from dtune.models import load_model_and_tokenizer

    quiet_libraries()
    cfg = load_run_config(run_dir)
    final = Path(run_dir) / "final"
    if not final.is_dir():
        raise DtuneError(
            f"{final} does not exist: the run has not finished. Resume it with "
            f"`python -m dtune hydra.run.dir={run_dir} train.resume=true` plus its overrides."
        )
    tokenizer = AutoTokenizer.from_pretrained(final)
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        from dtune.methods import load_options

        base, _, _ = load_model_and_tokenizer(cfg.model, load_options(cfg.method))
        model = PeftModel.from_pretrained(base, final)
    else:
        model = AutoModelForCausalLM.from_pretrained(final)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer, cfg


def load_for_generation(path: Path):
    """A run directory (its final model) or a plain model folder, such as `dtune merge` writes.

    Returns (model, tokenizer, system prompt or None)."""
    path = Path(path)
    if (path / ".hydra" / "config.yaml").is_file():
        model, tokenizer, cfg = load_final_model(path)
        return model, tokenizer, cfg.data.system_prompt
    if (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from dtune.logs import quiet_libraries

        quiet_libraries()
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer, None
    raise DtuneError(
        f"{path} is neither a dtune run directory (no .hydra/config.yaml) nor a model folder "
        "(no config.json); pass a training run's directory or a folder written by dtune merge."
    )
