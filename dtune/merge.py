"""`dtune merge`: fold a run's adapter into its base and save a standalone model folder."""
from __future__ import annotations

import logging
from pathlib import Path

from dtune.checkpoint import save_final
from dtune.errors import DtuneError
from dtune.load_run import load_adapter, load_run_config, load_tokenizer, say_base
from dtune.logs import quiet_libraries
from dtune.methods import METHODS
from dtune.models import load_model_and_tokenizer
from dtune.run_dir import RunDir, check_output_target

log = logging.getLogger("dtune")


def merge_run(run_dir: Path, out_dir: Path | None = None, force: bool = False,
              trust_remote_code: bool = False) -> Path:
    """Write base + adapter as one model (safetensors + tokenizer); return its folder.

    The folder appears whole when done. An existing folder that dtune did not write is refused
    up front unless `force`."""
    quiet_libraries()
    run = RunDir(run_dir)
    cfg = load_run_config(run.path, trust_remote_code)
    spec = METHODS[cfg.method.name]
    if not spec.adapter:
        raise DtuneError(
            f"{run.path} was trained with +method={spec.name}, so {run.final} already is a "
            "standalone model; load it with AutoModelForCausalLM.from_pretrained."
        )
    if not spec.merges:
        raise DtuneError(
            f"{run.path} was trained with +method={spec.name}: its soft prompt is an input to "
            "the model, not a change to its weights, so there is nothing to merge. Use it as it "
            f"is: `dtune generate {run.path}`, or PeftModel.from_pretrained on {run.final}."
        )
    if not run.final_is_adapter():
        raise DtuneError(f"{run.final} holds no adapter: the run has not finished.")
    out_dir = Path(out_dir) if out_dir else run.merged
    provenance = {"run_dir": str(run.path.resolve()), "base": cfg.model.name_or_path,
                  "revision": cfg.model.revision, "method": spec.name}
    check_output_target(out_dir, "merged", force, [run.path])  # before the slow part
    say_base(cfg, run.path)
    # The base loads unquantized: a QLoRA/8-bit adapter merges into the de-quantized weights.
    base, _, _ = load_model_and_tokenizer(cfg.model, {"dtype": "auto"})
    if spec.quantized_bits:
        log.warning(
            "Merging a %s adapter into the full-precision base: the adapter was trained against "
            "quantized weights, so the merged model's outputs may differ slightly from the "
            "adapter model's (a known effect of merging quantized training).", spec.name)
    merged = load_adapter(base, run.path, cfg).merge_and_unload()
    save_final(merged, load_tokenizer(run.final), out_dir, provenance=provenance, force=force,
               kind="merged", fix="Free space there, or give --out a folder on a disk with room.")
    return out_dir
