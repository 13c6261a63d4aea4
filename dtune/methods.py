"""Methods: each is a plain function that takes the loaded model, the method config and the
tokenizer, and returns the model to train with only what it should update left trainable.

A method that needs the base loaded differently (4-bit, 8-bit) says so in `load_options`.
Adding a method is one function here, one entry in METHODS, and one YAML file in conf/method/.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dtune.config import MethodConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def load_options(cfg: MethodConfig) -> dict:
    """Extra from_pretrained arguments for the base model (bitsandbytes quantization)."""
    from transformers import BitsAndBytesConfig

    if cfg.name == "qlora":
        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=DTYPES[cfg.compute_dtype],
        )}
    if cfg.name == "lora_int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {}


def full(model, cfg: MethodConfig, tokenizer):
    """Full-parameter fine-tuning: every weight trains."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def lora(model, cfg: MethodConfig, tokenizer, use_dora: bool = False):
    """LoRA (Hu et al., 2021): frozen base, trainable low-rank updates on the chosen layers."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=_targets(cfg),
        modules_to_save=cfg.modules_to_save,
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def dora(model, cfg: MethodConfig, tokenizer):
    """DoRA: LoRA on the direction of each weight, plus a trained magnitude vector."""
    return lora(model, cfg, tokenizer, use_dora=True)


def quantized_lora(model, cfg: MethodConfig, tokenizer):
    """QLoRA and LoRA on an 8-bit base: LoRA over a base that `load_options` quantized."""
    from peft import prepare_model_for_kbit_training

    # Casts norms and embeddings to fp32 and makes the inputs carry gradients; gradient
    # checkpointing is a separate switch, so it is not turned on here.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return lora(model, cfg, tokenizer)


def ia3(model, cfg: MethodConfig, tokenizer):
    """IA3: learned per-channel scales on keys, values and the MLP down-projection."""
    from peft import IA3Config, get_peft_model

    targets = _targets(cfg)
    feedforward = None
    if targets not in (None, "all-linear"):
        feedforward = [t for t in targets if "down" in t or "mlp" in t or "fc" in t]
    config = IA3Config(target_modules=targets, feedforward_modules=feedforward,
                       modules_to_save=cfg.modules_to_save, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def prompt_tuning(model, cfg: MethodConfig, tokenizer):
    """Prompt tuning: a trainable soft prompt; the model itself stays frozen."""
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    from_text = bool(cfg.init_text)
    config = PromptTuningConfig(
        num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if from_text else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=cfg.init_text if from_text else None,
        tokenizer_name_or_path=tokenizer.name_or_path if from_text else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def prefix_tuning(model, cfg: MethodConfig, tokenizer):
    """Prefix tuning: trainable key/value prefixes in every attention layer."""
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


METHODS = {
    "full": full,
    "lora": lora,
    "dora": dora,
    "qlora": quantized_lora,
    "lora_int8": quantized_lora,
    "ia3": ia3,
    "prompt_tuning": prompt_tuning,
    "prefix_tuning": prefix_tuning,
}


def apply_method(model, cfg: MethodConfig, tokenizer):
    return METHODS[cfg.name](model, cfg, tokenizer)


def _targets(cfg: MethodConfig):
    if cfg.target_modules == "attention":
        return list(ATTENTION)
    if cfg.target_modules == "default":
        return None  # peft's per-architecture default
    if isinstance(cfg.target_modules, str):
        return cfg.target_modules
    return list(cfg.target_modules)


def is_adapter(model) -> bool:
    """True when the model is a PEFT wrapper whose `final/` is an adapter, not a full model."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts as the values it stores."""
    trainable, total = 0, 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
