"""Read back a run for `dtune eval`, `generate`, `merge` and `export`: its config and its
trained model, from final/ or from one sealed checkpoint (`--checkpoint step-N`).

A run directory may come from someone else, so nothing read from it enables remote code:
only the user's own `--trust-remote-code` does, and every load says so to transformers. A
checkpoint is read only as a resume would read it: every file as its manifest recorded, and
written by the run whose directory holds it.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from dtune.checkpoint import (TrainState, check_same_parameters, checkpoint_folders,
                              checkpoint_problem, folder_fingerprint, run_id_of)
from dtune.compose import to_config
from dtune.config import Config, LauncherConfig, ParallelismConfig
from dtune.engines import checkpoint_weights, refuse_unreadable_checkpoint
from dtune.errors import DtuneError
from dtune.files import read_text
from dtune.logs import quiet_libraries
from dtune.methods import METHODS, load_options
from dtune.models import load_model_and_tokenizer
from dtune.run_dir import RunDir, resume_overrides
from dtune.run_start import read_run_file
from dtune.settle import settle, this_machine
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
    saved = OmegaConf.create(read_text(run.config_file))
    # settled for the machine that trained; settled anew for this one
    trained_from = (saved.pop("settled", None) or {}).get("init_from")
    merged = OmegaConf.merge(OmegaConf.structured(Config), saved)
    cfg = to_config(merged)
    if cfg.model.trust_remote_code and not trust_remote_code:
        log.warning("%s asks for model.trust_remote_code=true; a config read from a run "
                    "directory never enables remote code. Pass --trust-remote-code if you "
                    "trust %s.", run.config_file, cfg.model.name_or_path)
    cfg.model.trust_remote_code = trust_remote_code
    # the tools load the run in one process, here, whatever launched its training
    cfg.parallelism, cfg.launcher = ParallelismConfig(), LauncherConfig()
    settled = settle(cfg, this_machine())
    if trained_from and settled.settled.init_from != trained_from:
        raise DtuneError(
            f"{run_dir} trained from model.init_from={cfg.model.init_from}, whose final/ is "
            f"not what it was then (SHA-256 {trained_from[:12]}... at the start of training, "
            f"{(settled.settled.init_from or 'missing')[:12]}... now): this run's adapter or "
            "weights would be read onto another model. Restore that run's final/ as it was.")
    return settled


def say_base(cfg: Config, run_dir: Path) -> None:
    revision = f" at revision {cfg.model.revision}" if cfg.model.revision else ""
    allowed = " (remote code allowed: --trust-remote-code)" if cfg.model.trust_remote_code else ""
    # stderr, always: what is about to be loaded matters more than the logging level
    then = f", then model.init_from={cfg.model.init_from}'s final model" \
        if cfg.model.init_from else ""
    print(f"Loading the base model {cfg.model.name_or_path}{revision}{then}, as "
          f"{RunDir(run_dir).config_file} names it{allowed}.", file=sys.stderr, flush=True)


def load_final_model(run_dir: Path, trust_remote_code: bool = False,
                     checkpoint: str | None = None):
    """Return (model, tokenizer, config): the run's trained model as final/ holds it (base +
    adapter, or a full model), or as the sealed checkpoint `checkpoint` (step-N) holds it."""
    quiet_libraries()
    cfg = load_run_config(run_dir, trust_remote_code)
    run = RunDir(run_dir)
    model, tokenizer = load_trained(run, cfg, trained_weights(run, cfg, checkpoint),
                                    load_options(cfg.method))
    return model, tokenizer, cfg


def trained_weights(run: RunDir, cfg: Config, checkpoint: str | None) -> Path:
    """The folder the run's trained weights are read from: the sealed checkpoint `checkpoint`
    (step-N), or final/, refused (with the resume command) while the run has not finished."""
    if checkpoint is not None:
        return sealed_checkpoint(run, checkpoint)
    if not run.final.is_dir():
        raise DtuneError(
            f"{run.final} does not exist: the run has not finished. Resume it with "
            f"`python -m dtune {resume_overrides(run.path)}` plus its overrides, or read one of "
            "its checkpoints with --checkpoint step-N."
        )
    if METHODS[cfg.method.name].adapter and not run.final_is_adapter():
        raise DtuneError(f"{run.final} holds no adapter (no adapter_config.json), though the run "
                         f"trained +method={cfg.method.name}: the run has not finished, or "
                         "final/ was changed since.")
    return run.final


def load_trained(run: RunDir, cfg: Config, folder: Path, options: dict,
                 merging: bool = False):
    """(model in eval mode, tokenizer) from `folder` (trained_weights): final/ (an adapter on
    the run's base, or a full model) or a checkpoint. `options` go to from_pretrained for the
    base; `merging`: a quantized method's adapter goes onto the unquantized base."""
    if folder != run.final:
        return load_checkpoint_model(run, cfg, folder, options, merging)
    tokenizer = load_tokenizer(run.final, cfg.model.trust_remote_code)
    if run.final_is_adapter():
        say_base(cfg, run.path)
        base, _, _ = load_base(cfg, options, under_adapter=True)
        model = load_adapter(base, run.path, cfg)
    else:
        model = load_model_folder(run.final, cfg.model.trust_remote_code, options)
    return model.eval(), tokenizer


CHECKPOINT_NAME = re.compile(r"step-(\d+)")


def sealed_checkpoint(run: RunDir, name: str) -> Path:
    """RUN_DIR/checkpoints/<name> (step-N), checked as a resume checks it: complete, every
    file's SHA-256 the one its manifest recorded, and written by this run (the run id in its
    trainer_state.json is RunDir.run_file's). Anything else is one paragraph naming it."""
    folder = run.checkpoints / name
    found = ", ".join(f.name for _, f in checkpoint_folders(run.path)) or "none"
    match = CHECKPOINT_NAME.fullmatch(name)
    if match is None or folder.is_symlink() or not folder.is_dir():
        raise DtuneError(
            f"--checkpoint {name}: {run.checkpoints} holds no checkpoint of that name (it holds: "
            f"{found}). Name one of those, or leave --checkpoint out to use the run's final/.")
    problem = checkpoint_problem(folder, int(match[1]), verify=True)
    if problem is not None:
        raise DtuneError(
            f"--checkpoint {name}: {folder} is damaged or incomplete: {problem}. dtune reads a "
            "checkpoint only when every file is the one its manifest recorded at the save, as a "
            f"resume does. Name another checkpoint (the run has: {found}), or use final/.")
    record, owner = read_run_file(run), run_id_of(folder)
    if record is None or owner != record["run_id"]:
        mine = f"run {record['run_id']}" if record else f"no run ({run.run_file} is missing)"
        raise DtuneError(
            f"--checkpoint {name}: {folder} was not written by the run in {run.path}: its "
            f"trainer_state.json names run {owner or '(none)'}, and {run.run_file.name} names "
            f"{mine}. Its weights need not fit this run's config, so dtune does not read it. "
            "Read it from the run directory that wrote it, or name one of this run's.")
    return folder


def load_checkpoint_model(run: RunDir, cfg: Config, folder: Path, options: dict,
                          merging: bool = False):
    """(model in eval mode, tokenizer) as the sealed checkpoint `folder` holds them: the base
    and tokenizer loaded as training loads them, the method applied, the trained weights (a
    checkpoint holds only those) put in. `merging`: see load_trained."""
    state = checkpoint_state(folder)
    say_base(cfg, run.path)
    base, tokenizer, _ = load_base(cfg, options, under_adapter=True)
    if state.chat_template is not None:
        tokenizer.chat_template = state.chat_template  # the one the run trained with
    spec = METHODS[cfg.method.name]
    adapt = METHODS["lora"].apply if merging and spec.quantized_bits else spec.apply
    model = adapt(base, cfg.method, tokenizer)
    weights = checkpoint_weights(written_by(state), folder, model)
    check_same_parameters(folder, weights, model, fix=(
        f"The run's config ({run.config_file}) was changed after training, or the checkpoint "
        "comes from another run; restore the config, or read the run that wrote it."))
    with torch.no_grad():
        model.load_state_dict(weights, strict=False)
    return model.eval(), tokenizer


def checkpoint_state(folder: Path) -> TrainState:
    """A sealed checkpoint's trainer_state.json, refused before any model loads where its
    engine's files are for a resume alone (DeepSpeed ZeRO's)."""
    state = TrainState.from_json(read_text(folder / "trainer_state.json"))
    refuse_unreadable_checkpoint(written_by(state), folder)
    return state


def written_by(state: TrainState) -> str:
    """The engine that wrote a checkpoint; the default one (one process, DDP) for those that
    predate the setting."""
    return str(state.settings.get("parallelism.engine") or ParallelismConfig.engine)


def load_adapter(base, run_dir: Path, cfg: Config, trainable: bool = False):
    """The run's final/ adapter on `base` (to be trained on, with `trainable`). An adapter
    trained on another model (another size: peft's size mismatch) is one paragraph naming
    both, not a traceback."""
    run = RunDir(run_dir)
    try:
        return PeftModel.from_pretrained(base, run.final, is_trainable=trainable)
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


def load_model_folder(folder: Path, trust_remote_code: bool = False,
                      options: dict | None = None):
    try:
        return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                    **(options or {}))
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


def load_for_generation(path: Path, trust_remote_code: bool = False,
                        checkpoint: str | None = None):
    """A run directory (its final model, or its sealed checkpoint `checkpoint`), a plain model
    folder such as `dtune merge` writes, or a GGUF file such as `dtune export` writes.

    Returns (model, tokenizer, system prompt or None)."""
    path = Path(path)
    if RunDir(path).config_file.is_file():
        model, tokenizer, cfg = load_final_model(path, trust_remote_code, checkpoint)
        return model, tokenizer, cfg.data.system_prompt
    if checkpoint is not None:
        raise DtuneError(
            f"--checkpoint {checkpoint} names a checkpoint of a run directory, and {path} is not "
            "one (no .hydra/config.yaml); pass the run's directory, or leave --checkpoint out.")
    quiet_libraries()
    if path.suffix == ".gguf" and path.is_file():
        model, tokenizer = load_gguf_file(path)
        return model, tokenizer, None
    if (path / "config.json").is_file():
        model = load_model_folder(path, trust_remote_code).eval()
        return model, load_tokenizer(path, trust_remote_code), None
    raise DtuneError(
        f"{path} is neither a dtune run directory (no .hydra/config.yaml), nor a model folder "
        "(no config.json), nor a .gguf file; pass a training run's directory, a folder written "
        "by dtune merge or a file written by dtune export --gguf."
    )


def load_gguf_file(path: Path):
    """(model in eval mode, tokenizer) from a GGUF file, through transformers' GGUF loader:
    the weights dequantized to fp32, the tokenizer and chat template from its metadata."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32)
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        raise DtuneError(
            f"{path} could not be read by transformers' GGUF loader ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}). It reads the architectures and tokenizers "
            "llama.cpp's common files use (those dtune export --gguf writes among them); "
            "generate with llama.cpp itself, or pass the model folder the file came from."
        ) from None
    set_up_tokenizer(tokenizer)  # a pad token, as for any model folder
    return model.eval(), tokenizer


def load_base(cfg: Config, options: dict, under_adapter: bool = False):
    """(model, tokenizer, source): what a run starts from, as training loads it and as the
    tools load it under a run's adapter or checkpoint (`under_adapter`): the base model, or
    with `model.init_from` the earlier run's final model (`load_init_from`)."""
    if cfg.model.init_from:
        return load_init_from(cfg, options, under_adapter)
    return load_model_and_tokenizer(cfg.model, options, chat_template=cfg.data.chat_template)


def load_init_from(cfg: Config, options: dict, under_adapter: bool = False):
    """(model, tokenizer, source) for `model.init_from=RUN_DIR`: that run's final/ as this
    run's starting weights, a full model as it is, or an adapter on what that run started
    from (its base, or its own init_from): merged into it (this run's method then adapts the
    merged model), or with `model.init_adapter=continue` left trainable for this run to go
    on training (`under_adapter`: left out, this run's own adapter or checkpoint replacing
    it). Its tokenizer comes along: final/ holds the chat template and pad token it
    trained with."""
    run = RunDir(Path(cfg.model.init_from))
    if not run.config_file.is_file() or not run.final.is_dir():
        raise DtuneError(
            f"model.init_from={cfg.model.init_from} is not a finished dtune run directory (it "
            f"needs {run.config_file.name} in .hydra/ and final/). Pass the hydra.run.dir of a "
            "run that finished, or set model.name_or_path to a model folder instead.")
    earlier = load_run_config(run.path, cfg.model.trust_remote_code)
    if earlier.model.name_or_path != cfg.model.name_or_path:
        raise DtuneError(
            f"model.init_from={cfg.model.init_from} trained {earlier.model.name_or_path}, but "
            f"this run names model.name_or_path={cfg.model.name_or_path}. Set the model this "
            f"run starts from to the earlier run's (e.g. model={earlier.model.name}), so the "
            "tokenizer, template and base match.")
    folder = trained_weights(run, earlier, None)
    found = folder_fingerprint(folder)
    if cfg.settled.init_from and found != cfg.settled.init_from:
        raise DtuneError(
            f"model.init_from={cfg.model.init_from}: its final/ changed after this run's "
            f"config was settled (SHA-256 {cfg.settled.init_from[:12]}... then, "
            f"{found[:12]}... now), so the run would not start from the weights it was "
            "launched with. Launch it again to start from final/ as it is now.")
    tokenizer = load_tokenizer(folder, cfg.model.trust_remote_code)
    how = ""
    if run.final_is_adapter():
        base, _, _ = load_base(earlier, options)
        if not cfg.model.continues_adapter:
            model, how = load_adapter(base, run.path, earlier).merge_and_unload(), \
                ": its adapter merged into the model it trained"
        elif under_adapter:
            model = base
        else:
            check_same_method(cfg, earlier)
            model, how = load_adapter(base, run.path, earlier, trainable=True), \
                ": its adapter trained on (model.init_adapter=continue)"
    elif cfg.model.continues_adapter:
        raise DtuneError(
            f"model.init_adapter=continue, but model.init_from={cfg.model.init_from} trained "
            f"+method={earlier.method.name}: its final/ is a full model, with no adapter to go "
            "on training. Use model.init_adapter=merge (the default) to train this run's "
            "method on that model.")
    else:
        model = load_model_folder(folder, cfg.model.trust_remote_code, options)
    log.info("Starting from %s (model.init_from)%s", folder, how)
    return model.train(), tokenizer, f"init_from {folder}"


def check_same_method(cfg: Config, earlier: Config) -> None:
    """model.init_adapter=continue trains the earlier run's adapter as it is: this run's
    method settings must be the ones it was made with."""
    mine, theirs = asdict(cfg.method), asdict(earlier.method)
    differ = [f"method.{k}={mine[k]!r} here, {theirs[k]!r} there" for k in mine
              if mine[k] != theirs[k]]
    if differ:
        raise DtuneError(
            f"model.init_adapter=continue trains the adapter of model.init_from="
            f"{cfg.model.init_from} as it is, but this run's method differs from the one that "
            f"made it: {'; '.join(differ[:4])}. Set this run's method as that run's "
            f"(+method={earlier.method.name} and its method.* values), or use "
            "model.init_adapter=merge to train a new adapter on the merged model.")
