"""Model families: the tiny random-init config of each, built from transformers' own config
class; the `method.target_modules` presets, resolved from a model's real module names; and
whether a model can train on packed rows.

transformers is imported inside the functions: config validation imports this module's
callers before anything heavy is loaded.
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Optional

import torch

from dtune.config import Config, RandomInitConfig
from dtune.errors import DtuneError

log = logging.getLogger("dtune")

# Smaller than the test sequences, so the sliding-window masks are really exercised.
SLIDING_WINDOW = 32


def family_config(arch: RandomInitConfig, vocab_size: int, special: dict):
    """The transformers config of a random-init model of `arch.family`."""
    import transformers as tf

    head_dim = arch.hidden_size // arch.num_heads
    common = dict(
        vocab_size=vocab_size, hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads, max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=False, **special)
    kv = dict(num_key_value_heads=arch.num_kv_heads)
    # Gemma and Qwen3 default head_dim to 256/128 and Gemma scales queries by
    # query_pre_attn_scalar (256): tie both to the tiny model's real head size.
    gemma = dict(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=SLIDING_WINDOW,
                 tie_word_embeddings=True)  # Gemma checkpoints tie the LM head to the embeddings
    family = arch.family
    if family == "llama":
        return tf.LlamaConfig(**common, **kv)
    if family == "qwen2":  # Qwen2.5's small checkpoints tie embeddings too
        return tf.Qwen2Config(**{**common, "tie_word_embeddings": True}, **kv)
    if family == "qwen3":
        return tf.Qwen3Config(**common, **kv, head_dim=head_dim)
    if family == "mistral":
        return tf.MistralConfig(**common, **kv, sliding_window=SLIDING_WINDOW)
    if family == "gemma2":  # the soft-capping values of the released Gemma 2 checkpoints
        return tf.Gemma2Config(**{**common, **gemma}, **kv, final_logit_softcapping=30.0,
                               attn_logit_softcapping=50.0)
    if family == "gemma3":  # one sliding-window and one global layer, as in 5:1 at scale
        layer_types = ["sliding_attention", "full_attention"] * arch.num_layers
        return tf.Gemma3TextConfig(**{**common, **gemma}, **kv,
                                   layer_types=layer_types[: arch.num_layers])
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**common, **kv)
    if family == "gpt_neox":  # fused query_key_value, plain (ungated) MLP, no grouped KV heads
        return tf.GPTNeoXConfig(**common)
    if family == "qwen2_moe":  # every layer sparse: 4 small experts, 2 per token, one shared
        return tf.Qwen2MoeConfig(
            **common, **kv, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
            moe_intermediate_size=max(arch.intermediate_size // 4, 1),
            shared_expert_intermediate_size=arch.intermediate_size)
    raise AssertionError(f"no config for family {family!r}")  # RandomInitConfig checks it


# ---- target_modules presets -------------------------------------------------------------

# A linear layer inside decoder layer N: "<...>.layers.N.<path in the layer>"
_IN_LAYER = re.compile(r"\.(?:layers|h|blocks)\.\d+\.(.+)$")
# MoE routers stay frozen: a low-rank update on the router moves which experts see each token
# (and the load balance trained into it), and its output has one value per expert (or one, the
# shared-expert gate), so a rank-16 adapter would be larger than the router itself.
_ROUTER = re.compile(r"(^|\.)(gate|router|shared_expert_gate)$")


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    """Every linear layer of the decoder layers (bitsandbytes' 4/8-bit layers included), keyed
    by its path inside the layer ("self_attn.q_proj"); the LM head and embeddings are outside
    the layers, so never in it."""
    found = {}
    for name, module in model.named_modules():
        match = _IN_LAYER.search(name)
        if match and isinstance(module, torch.nn.Linear):
            found.setdefault(match.group(1), module)
    return found


def fused_experts(model) -> list[str]:
    """The 3-D expert weights of a mixture-of-experts layer ("mlp.experts.gate_up_proj").

    transformers 5 stores each MoE layer's experts fused, one [experts, out, in] parameter per
    projection, not as nn.Linear modules, so `target_modules` cannot reach them; peft 0.21's
    `target_parameters` can (LoRA only: its ParamWrapper refuses DoRA)."""
    found = []
    for name, param in model.named_parameters():
        match = _IN_LAYER.search(name)
        if match and param.dim() == 3 and "expert" in match.group(1) and \
                match.group(1) not in found:
            found.append(match.group(1))
    return found


def _kind(path: str) -> str:
    block = path.split(".")[0]
    if _ROUTER.search(path):
        return "router"
    if "attn" in block or "attention" in block:
        return "attention"
    if any(word in block for word in ("mlp", "moe", "ffn", "feed_forward")):
        return "mlp"
    return "other"


def resolve_targets(model, preset, peft_defaults: dict, with_experts: bool = True
                    ) -> tuple[Optional[list[str]], Optional[list[str]]]:
    """(target_modules, target_parameters) for peft from `method.target_modules`.

    all-linear: every linear layer of the decoder layers but MoE routers (the LM head is not
    in a layer); attention / mlp: those of the attention or the MLP block; default: peft's
    choice for the architecture; a list: the user's names, each checked to match a module.
    Fused MoE experts join all-linear and mlp as target_parameters when `with_experts`."""
    linears = decoder_linears(model)
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    if preset == "default":
        if model_type not in peft_defaults:
            raise _no_match(preset, linears, f"peft has no default layers for {model_type!r}")
        return None, None
    if isinstance(preset, str):
        kinds = {"all-linear": ("attention", "mlp", "other"), "attention": ("attention",),
                 "mlp": ("mlp",)}[preset]
        modules = sorted(p for p in linears if _kind(p) in kinds)
        experts = fused_experts(model) if with_experts and preset != "attention" else []
        if not modules and not experts:
            raise _no_match(preset, linears, f"no {preset} layer in this {model_type} model")
        return modules, experts or None
    missing = [name for name in preset
               if not any(p == name or p.endswith(f".{name}") for p in linears)]
    if missing:
        raise _no_match(list(preset), linears, f"{', '.join(missing)} matches no linear layer")
    return list(preset), None


def _no_match(preset, linears: dict, why: str) -> DtuneError:
    names = ", ".join(sorted(linears)) or "none"
    return DtuneError(
        f"method.target_modules={preset!r} selects nothing to adapt: {why}. The linear layers "
        f"inside this model's decoder layers are: {names}. Choose all-linear, attention or "
        "mlp, or list names from these, e.g. method.target_modules=[q_proj,v_proj].")


# ---- packing ----------------------------------------------------------------------------

def packs_by_position_ids(model) -> bool:
    """Whether the model builds its attention masks with transformers' masking_utils, whose
    create_*_mask functions, given position_ids and no 2-D mask (dtune's packed rows), find
    where positions restart and keep attention inside each example (transformers >= 5).
    A model that builds its masks otherwise (older or remote code, or a recurrent model such
    as Mamba, which has no mask at all) would let examples see each other."""
    from transformers import masking_utils

    makers = {getattr(masking_utils, name) for name in dir(masking_utils)
              if name.startswith("create_") and name.endswith("_mask")}
    base = getattr(model, "get_base_model", lambda: model)()
    for cls in type(base).__mro__:
        module = sys.modules.get(cls.__module__)
        if module is not None and any(getattr(module, name, None) in makers
                                      for name in dir(module) if name.startswith("create_")):
            return True
    return False


def check_packing(cfg: Config, model) -> None:
    """Refuse data.packing=true for a model whose examples would attend to each other."""
    if not cfg.data.packing or packs_by_position_ids(model):
        return
    model_type = getattr(model.config, "model_type", type(model).__name__)
    raise DtuneError(
        f"data.packing=true cannot train model.name_or_path={cfg.model.name_or_path!r}: its "
        f"family ({model_type}) does not build its attention masks with transformers' "
        "masking_utils, so nothing would tell the packed examples apart and each would see the "
        "ones before it in its row. Set data.packing=false (rows are then padded, one example "
        "each).")
