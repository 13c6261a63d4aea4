"""Methods: each is a plain function that takes the loaded model and the method config and
returns the model to train, with only the parameters it should update left trainable.
"""
from __future__ import annotations

from dtune.config import MethodConfig


def full(model, cfg: MethodConfig):
    """Full-parameter fine-tuning: every weight trains."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def lora(model, cfg: MethodConfig):
    """LoRA (Hu et al., 2021): frozen base, trainable low-rank updates on the chosen layers."""
    from peft import LoraConfig, get_peft_model

    target = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


METHODS = {"full": full, "lora": lora}


def apply_method(model, cfg: MethodConfig):
    return METHODS[cfg.name](model, cfg)


def is_adapter(model) -> bool:
    """True when the model is a PEFT wrapper whose `final/` is an adapter, not a full model."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
