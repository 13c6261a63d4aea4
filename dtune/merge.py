"""`dtune merge`: fold a run's adapter into its base and save a standalone model folder."""
from __future__ import annotations

import logging
from pathlib import Path

from dtune.errors import DtuneError

log = logging.getLogger("dtune")
SOFT_PROMPTS = ("prompt_tuning", "prefix_tuning")


def merge_run(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write base + adapter as one model (safetensors + tokenizer); return its folder."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from dtune.checkpoint import save_final
    from dtune.logs import quiet_libraries
    from dtune.models import load_model_and_tokenizer
    from dtune.run_dir import load_run_config

    quiet_libraries()
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    method = cfg.method.name
    if method in SOFT_PROMPTS:
        raise DtuneError(
            f"{run_dir} was trained with +method={method}: its soft prompt is an input to the "
            "model, not a change to its weights, so there is nothing to merge. Use it as it "
            f"is: `dtune generate {run_dir}`, or PeftModel.from_pretrained on {run_dir}/final."
        )
    if method == "full":
        raise DtuneError(
            f"{run_dir} was trained with +method=full, so {run_dir / 'final'} already is a "
            "standalone model; load it with AutoModelForCausalLM.from_pretrained."
        )
    final = run_dir / "final"
    if not (final / "adapter_config.json").is_file():
        raise DtuneError(f"{final} holds no adapter: the run has not finished.")
    # The base loads unquantized: a QLoRA/8-bit adapter merges into the de-quantized weights.
    base, _, _ = load_model_and_tokenizer(cfg.model, {"dtype": "auto"})
    if method in ("qlora", "lora_int8"):
        log.warning(
            "Merging a %s adapter into the full-precision base: the adapter was trained against "
            "quantized weights, so the merged model's outputs may differ slightly from the "
            "adapter model's (a known effect of merging quantized training).", method)
    merged = PeftModel.from_pretrained(base, final).merge_and_unload()
    out_dir = Path(out_dir) if out_dir else run_dir / "merged"
    save_final(merged, AutoTokenizer.from_pretrained(final), out_dir)
    return out_dir
