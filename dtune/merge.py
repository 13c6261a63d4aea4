"""`dtune merge`: fold a run's adapter into its base and save a standalone model folder; and
the merged model itself, which `dtune export` writes as GGUF."""
from __future__ import annotations

import logging
from pathlib import Path

from dtune.checkpoint import save_final
from dtune.config import Config
from dtune.errors import DtuneError
from dtune.load_run import load_run_config, load_trained, trained_weights
from dtune.logs import quiet_libraries
from dtune.methods import METHODS, MethodSpec
from dtune.run_dir import RunDir, check_output_target

log = logging.getLogger("dtune")


def merge_run(run_dir: Path, out_dir: Path | None = None, force: bool = False,
              trust_remote_code: bool = False, checkpoint: str | None = None) -> Path:
    """Write base + adapter as one model (safetensors + tokenizer); return its folder. With
    `checkpoint` (step-N), that sealed checkpoint's weights instead of final/'s (a full
    fine-tune's checkpoint, too, becomes a model folder).

    The folder appears whole when done. An existing folder that dtune did not write is refused
    up front unless `force`."""
    quiet_libraries()
    run = RunDir(run_dir)
    cfg = load_run_config(run.path, trust_remote_code)
    spec = METHODS[cfg.method.name]
    if not spec.adapter and checkpoint is None:
        raise DtuneError(
            f"{run.path} was trained with +method={spec.name}, so {run.final} already is a "
            "standalone model; load it with AutoModelForCausalLM.from_pretrained (or write "
            "one of its checkpoints as a model folder with --checkpoint step-N)."
        )
    check_standalone(run, spec, "merge")
    folder = trained_weights(run, cfg, checkpoint)
    out_dir = Path(out_dir) if out_dir else run.merged_at(checkpoint)
    provenance = {"run_dir": str(run.path.resolve()), "base": cfg.model.name_or_path,
                  "revision": cfg.model.revision, "method": spec.name,
                  **({"checkpoint": checkpoint} if checkpoint else {})}
    check_output_target(out_dir, "merged", force, [run.path],  # before the slow part
                        suggestion=run.merged_at(checkpoint))
    model, tokenizer = load_merged(run, cfg, folder)
    save_final(model, tokenizer, out_dir, provenance=provenance, force=force,
               kind="merged", fix="Free space there, or give --out a folder on a disk with room.")
    return out_dir


def check_standalone(run: RunDir, spec: MethodSpec, command: str) -> None:
    """Refuse a soft prompt (prompt or prefix tuning): it is an input to the model, so no
    standalone model holds it."""
    if spec.adapter and not spec.merges:
        raise DtuneError(
            f"{run.path} was trained with +method={spec.name}: its soft prompt is an input to "
            "the model, not a change to its weights, so there is nothing to merge and no "
            f"standalone model for dtune {command} to write. Use it as it is: `dtune generate "
            f"{run.path}`, or PeftModel.from_pretrained on {run.final}."
        )


def load_merged(run: RunDir, cfg: Config, folder: Path):
    """(standalone model, tokenizer) from `folder` (load_run.trained_weights): an adapter
    merged into the unquantized base in the checkpoint's own dtype, or a full fine-tune's
    model as it is."""
    spec = METHODS[cfg.method.name]
    if spec.quantized_bits:
        log.warning(
            "Merging a %s adapter into the full-precision base: the adapter was trained against "
            "quantized weights, so the merged model's outputs may differ slightly from the "
            "adapter model's (a known effect of merging quantized training).", spec.name)
    # The base loads unquantized: a QLoRA/8-bit adapter merges into the de-quantized weights.
    model, tokenizer = load_trained(run, cfg, folder, {"dtype": "auto"}, merging=True)
    return (model.merge_and_unload() if spec.adapter else model), tokenizer
