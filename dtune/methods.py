"""Methods: one spec each, read by config validation, the planner, merge and the README table.

A spec says how to load the base and adapt it (`apply`: the loaded model, the method config
and the tokenizer in; the model to train out, with only what should update left trainable),
which config fields it reads, the precisions it allows, whether DeepSpeed ZeRO can shard it,
whether its base is quantized, whether `dtune merge` folds it into the base, and the learning
rate it trains with when the user sets none. Adding a method is one spec here and one YAML
file in conf/method/.

peft, transformers and torch are imported inside the functions below, deliberately: config
validation reads these specs before anything heavy is loaded, so a typo is refused at once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

from dtune.config import MethodConfig

log = logging.getLogger("dtune")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    trains: str  # what trains, in words (the README's method table)
    apply: Callable  # (model, MethodConfig, tokenizer) -> model to train
    fields: frozenset  # the MethodConfig fields it reads
    recommended_lr: float  # train.lr when the user sets none
    precisions: tuple = ("fp32", "fp16", "bf16")
    zero: bool = True  # DeepSpeed ZeRO can shard its weights
    quantized_bits: Optional[int] = None  # the frozen base's storage: 4, 8 or full precision
    # THE answer to "is this an adapter?": a frozen base under a PEFT wrapper, so final/ is
    # an adapter (else a full model folder), the reference can be the base with the adapters
    # disabled, and merge folds it. Read it through the spec; never compare the name to "full".
    adapter: bool = True
    merges: bool = True  # `dtune merge` folds it into the base
    soft_prompt: bool = False  # virtual tokens in front of the input: no packing

    def load_options(self, cfg: MethodConfig, device=None) -> dict:
        """Extra from_pretrained arguments for the base: bitsandbytes quantization, and on a
        GPU the device it is placed on, so that the weights go straight there rather than
        through a whole copy in host memory per process (bitsandbytes quantizes while it
        places). `device` None: where the caller places it (ZeRO-3 partitions as it loads)."""
        placement = {"device_map": {"": device.index or 0}} \
            if device is not None and device.type == "cuda" else {}
        if self.quantized_bits is None:
            return placement
        import torch
        from transformers import BitsAndBytesConfig

        if self.quantized_bits == 8:
            return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), **placement}
        # compute_dtype still "auto" here: a tool loading a run's base, no precision settled
        dtype = DTYPE_NAMES.get(cfg.compute_dtype, "float32")
        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, dtype)), **placement}


DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def full(model, cfg: MethodConfig, tokenizer):
    """Full-parameter fine-tuning: every weight trains."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def lora(model, cfg: MethodConfig, tokenizer, use_dora: bool = False):
    """LoRA (Hu et al., 2021): frozen base, trainable low-rank updates on the chosen layers."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    modules, experts = _targets(cfg, model, PEFT, with_experts=not use_dora)
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=modules, target_parameters=experts,
                        modules_to_save=cfg.modules_to_save, use_dora=use_dora,
                        task_type="CAUSAL_LM")
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
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT

    # all-linear goes to peft as the name, as before presets resolved by family: peft picks
    # each layer's feed-forward side itself then (an explicit list needs them named)
    targets = "all-linear" if cfg.target_modules == "all-linear" else \
        _targets(cfg, model, PEFT, with_experts=False)[0]
    feedforward = None
    if targets not in (None, "all-linear"):
        feedforward = [t for t in targets if any(word in t.rsplit(".", 1)[-1]
                                                 for word in ("down", "mlp", "fc"))]
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


_LORA = frozenset({"r", "alpha", "dropout", "target_modules", "modules_to_save"})
_QUANT = frozenset({"quant_type", "double_quant", "compute_dtype"})
_SOFT_PROMPT = frozenset({"num_virtual_tokens", "modules_to_save"})

# Learning rates: LoRA's 1e-3 suits alpha = 2r on small and mid-size models; full fine-tuning
# moves every weight and wants far less; IA3 and soft prompts have few parameters steering a
# frozen model and want far more (Lester et al. used 0.3 for prompt tuning). Each was the best
# of its candidates on SmolLM2-135M (bench/method_lr.py, bench/results/method_lr.md).
METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("full", "every weight", full, frozenset(), 5e-5,
               precisions=("fp32", "fp16", "bf16", "bf16_pure"), adapter=False, merges=False),
    MethodSpec("lora", "low-rank updates beside frozen weights", lora, _LORA, 1e-3),
    MethodSpec("dora", "LoRA on each weight's direction, plus its magnitude", dora, _LORA, 1e-3),
    MethodSpec("qlora", "LoRA over a base stored in 4 bits (NF4, double quantization)",
               quantized_lora, _LORA | _QUANT, 1e-3, zero=False, quantized_bits=4),
    MethodSpec("lora_int8", "LoRA over a base stored in 8 bits (LLM.int8)", quantized_lora,
               _LORA, 1e-3, zero=False, quantized_bits=8),
    MethodSpec("ia3", "one learned scale per channel of keys, values and MLP output", ia3,
               frozenset({"target_modules", "modules_to_save"}), 3e-2),
    MethodSpec("prompt_tuning", "a soft prompt: `num_virtual_tokens` trainable embeddings "
               "before the input", prompt_tuning, _SOFT_PROMPT | {"init_text"}, 3e-1,
               merges=False, soft_prompt=True),
    MethodSpec("prefix_tuning", "trainable key/value prefixes in every attention layer",
               prefix_tuning, _SOFT_PROMPT, 3e-2, merges=False, soft_prompt=True),
)}


def method_spec(cfg: MethodConfig) -> MethodSpec:
    return METHODS[cfg.name]


def apply_method(model, cfg: MethodConfig, tokenizer):
    return METHODS[cfg.name].apply(model, cfg, tokenizer)


def load_options(cfg: MethodConfig, device=None) -> dict:
    return METHODS[cfg.name].load_options(cfg, device)


def _targets(cfg: MethodConfig, model, peft_defaults: dict, with_experts: bool = True):
    """(target_modules, target_parameters): the preset resolved from the model's own layer
    names (dtune/families.py). Without `with_experts` (DoRA: peft's wrapper of a fused
    expert weight refuses it) an MoE's experts stay frozen, and the log says so."""
    from dtune.families import fused_experts, resolve_targets

    modules, experts = resolve_targets(model, cfg.target_modules, peft_defaults, with_experts)
    if not with_experts and cfg.target_modules in ("all-linear", "mlp") and fused_experts(model):
        log.info("method.target_modules=%s: the fused MoE expert weights stay frozen (peft "
                 "adapts them with LoRA only); attention and the shared expert are adapted",
                 cfg.target_modules)
    return modules, experts


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts as the values it stores, a
    ZeRO-3 partitioned one as the whole weight (`ds_numel`), not this rank's shard."""
    trainable, total = 0, 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", param.numel())
        if param.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
