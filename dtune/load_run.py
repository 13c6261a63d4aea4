"""Read back a finished run for `dtune eval`, `generate` and `merge`: its config and model."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from dtune.compose import to_config
from dtune.config import Config
from dtune.errors import DtuneError
from dtune.logs import quiet_libraries
from dtune.methods import load_options
from dtune.models import load_model_and_tokenizer
from dtune.precision import resolve
from dtune.run_dir import RunDir


def load_run_config(run_dir: Path) -> Config:
    run = RunDir(run_dir)
    if not run.config_file.is_file():
        raise DtuneError(
            f"{run_dir} is not a dtune run directory: {run.config_file} is missing. Pass the "
            "folder a training run wrote (its hydra.run.dir)."
        )
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run.config_file))
    cfg = to_config(merged)
    resolve(cfg)
    return cfg


def load_final_model(run_dir: Path):
    """Return (model, tokenizer, config) from `run_dir/final`: base + adapter, or a full model."""
    quiet_libraries()
    cfg = load_run_config(run_dir)
    run = RunDir(run_dir)
    if not run.final.is_dir():
        raise DtuneError(
            f"{run.final} does not exist: the run has not finished. Resume it with "
            f"`python -m dtune hydra.run.dir={run_dir} train.resume=true` plus its overrides."
        )
    tokenizer = AutoTokenizer.from_pretrained(run.final)
    if run.final_is_adapter():
        base, _, _ = load_model_and_tokenizer(cfg.model, load_options(cfg.method))
        model = PeftModel.from_pretrained(base, run.final)
    else:
        model = AutoModelForCausalLM.from_pretrained(run.final)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer, cfg


def load_for_generation(path: Path):
    """A run directory (its final model) or a plain model folder, such as `dtune merge` writes.

    Returns (model, tokenizer, system prompt or None)."""
    path = Path(path)
    if RunDir(path).config_file.is_file():
        model, tokenizer, cfg = load_final_model(path)
        return model, tokenizer, cfg.data.system_prompt
    if (path / "config.json").is_file():
        quiet_libraries()
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer, None
    raise DtuneError(
        f"{path} is neither a dtune run directory (no .hydra/config.yaml) nor a model folder "
        "(no config.json); pass a training run's directory or a folder written by dtune merge."
    )
