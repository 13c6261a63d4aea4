"""Read back a finished run for `dtune eval`, `generate` and `merge`: its config and model.

A run directory may come from someone else, so nothing read from it enables remote code:
only the user's own `--trust-remote-code` does, and every load says so to transformers.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from dtune.compose import to_config
from dtune.config import Config
from dtune.errors import DtuneError
from dtune.files import read_text
from dtune.logs import quiet_libraries
from dtune.methods import load_options
from dtune.models import load_model_and_tokenizer
from dtune.precision import resolve
from dtune.run_dir import RunDir, resume_overrides
from dtune.tokenizer_setup import set_up_tokenizer

log = logging.getLogger("dtune")


def load_run_config(run_dir: Path, trust_remote_code: bool = False) -> Config:
    """The run's config, with `model.trust_remote_code` set by the caller (the user's
    flag), never by the file."""
    run = RunDir(run_dir)
    if not run.config_file.is_file():
        raise DtuneError(
            f"{run_dir} is not a dtune run directory: {run.config_file} is missing. Pass the "
            "folder a training run wrote (its hydra.run.dir)."
        )
    merged = OmegaConf.merge(OmegaConf.structured(Config),
                             OmegaConf.create(read_text(run.config_file)))
    cfg = to_config(merged)
    if cfg.model.trust_remote_code and not trust_remote_code:
        log.warning("%s asks for model.trust_remote_code=true; a config read from a run "
                    "directory never enables remote code. Pass --trust-remote-code if you "
                    "trust %s.", run.config_file, cfg.model.name_or_path)
    cfg.model.trust_remote_code = trust_remote_code
    resolve(cfg)
    return cfg


def say_base(cfg: Config, run_dir: Path) -> None:
    revision = f" at revision {cfg.model.revision}" if cfg.model.revision else ""
    allowed = " (remote code allowed: --trust-remote-code)" if cfg.model.trust_remote_code else ""
    # stderr, always: what is about to be loaded matters more than the logging level
    print(f"Loading the base model {cfg.model.name_or_path}{revision}, as "
          f"{RunDir(run_dir).config_file} names it{allowed}.", file=sys.stderr, flush=True)


def load_final_model(run_dir: Path, trust_remote_code: bool = False):
    """Return (model, tokenizer, config) from `run_dir/final`: base + adapter, or a full model."""
    quiet_libraries()
    cfg = load_run_config(run_dir, trust_remote_code)
    run = RunDir(run_dir)
    if not run.final.is_dir():
        raise DtuneError(
            f"{run.final} does not exist: the run has not finished. Resume it with "
            f"`python -m dtune {resume_overrides(run_dir)}` plus its overrides."
        )
    tokenizer = load_tokenizer(run.final, trust_remote_code)
    if run.final_is_adapter():
        say_base(cfg, run_dir)
        base, _, _ = load_model_and_tokenizer(cfg.model, load_options(cfg.method))
        model = load_adapter(base, run.path, cfg)
    else:
        model = load_model_folder(run.final, trust_remote_code)
    model.eval()
    return model, tokenizer, cfg


def load_adapter(base, run_dir: Path, cfg: Config):
    """The run's final/ adapter on `base`. An adapter trained on another model (another size:
    peft's size mismatch) is one paragraph naming both, not a traceback."""
    run = RunDir(run_dir)
    try:
        return PeftModel.from_pretrained(base, run.final)
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        first = next((line.strip() for line in str(exc).splitlines()
                      if "size mismatch" in line and "copying a param" in line),
                     " ".join(str(exc).split()))
        raise DtuneError(
            f"the adapter in {run.final} does not fit the base model {cfg.model.name_or_path} "
            f"that {run.config_file} names: its weights have other shapes ({first[:300]}). The "
            "adapter was trained on another model (another size or architecture), or the run's "
            "config was changed after training. Pass the run directory that trained this "
            f"adapter, or restore model.* in {run.config_file} to the model it was trained on."
        ) from None


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc):
            raise custom_code_refused(folder) from None
        raise DtuneError(
            f"{folder} holds no tokenizer that transformers can load "
            f"({' '.join(str(exc).split())[:200]}); the folder needs the files "
            "tokenizer.save_pretrained writes."
        ) from None
    # final/ carries the template and pad token training set; a plain model folder may lack
    # a pad token, and gets one as training would pick it.
    set_up_tokenizer(tokenizer)
    return tokenizer


def load_model_folder(folder: Path, trust_remote_code: bool = False):
    try:
        return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise custom_code_refused(folder) from None


def custom_code_refused(folder: Path) -> DtuneError:
    return DtuneError(
        f"{folder} holds a model that needs custom Python code from its folder, and dtune runs "
        "no code from a model folder unless you allow it. Read that code first; pass "
        "--trust-remote-code only if you trust whoever wrote the folder."
    )


def load_for_generation(path: Path, trust_remote_code: bool = False):
    """A run directory (its final model) or a plain model folder, such as `dtune merge` writes.

    Returns (model, tokenizer, system prompt or None)."""
    path = Path(path)
    if RunDir(path).config_file.is_file():
        model, tokenizer, cfg = load_final_model(path, trust_remote_code)
        return model, tokenizer, cfg.data.system_prompt
    if (path / "config.json").is_file():
        quiet_libraries()
        model = load_model_folder(path, trust_remote_code).eval()
        return model, load_tokenizer(path, trust_remote_code), None
    raise DtuneError(
        f"{path} is neither a dtune run directory (no .hydra/config.yaml) nor a model folder "
        "(no config.json); pass a training run's directory or a folder written by dtune merge."
    )
