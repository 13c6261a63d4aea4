"""Model families (#14): every family dtune supports, built tiny from transformers' own config
class, under full, lora, qlora and dora. For each: dtune's loss (chunked and plain) is the
model's own forward loss; packed rows give each example its loss alone (or packing is refused);
`dtune merge` reproduces the adapter model; `dtune plan` counts the real parameters; and the
target_modules presets find the family's own layer names."""
import functools
import random

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY, compose, train
from dtune.config import MODEL_FAMILIES
from dtune.data.batching import collate, collate_packed, loss_token_count
from dtune.data.builtin import WORDS
from dtune.data.formatting import IGNORE, Example
from dtune.errors import DtuneError
from dtune.families import decoder_linears, packs_by_position_ids, resolve_targets
from dtune.loss import (LogitTransform, chunked_lm_loss, chunked_loss_mismatch,
                        summed_token_loss)
from dtune.methods import apply_method, count_parameters, load_options
from dtune.models import build_tiny_tokenizer, load_model_and_tokenizer
from dtune.plan import model_shape, trainable_params

METHODS = ["full", "lora", "qlora", "dora"]
FAMILY_TINY = (*TINY, "eval.exact_match_samples=0", "data.max_seq_len=96")
# Each family's layers as transformers 5 names them (path inside a decoder layer).
LLAMA_LIKE = (["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"],
              ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"])
PRESETS = {
    **{f: LLAMA_LIKE for f in ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3")},
    "phi3": (["self_attn.o_proj", "self_attn.qkv_proj"], ["mlp.down_proj", "mlp.gate_up_proj"]),
    "gpt_neox": (["attention.dense", "attention.query_key_value"],
                 ["mlp.dense_4h_to_h", "mlp.dense_h_to_4h"]),
    # the router gate and the 1-output shared-expert gate stay out (dtune/families.py)
    "qwen2_moe": (LLAMA_LIKE[0], ["mlp.shared_expert.down_proj", "mlp.shared_expert.gate_proj",
                                  "mlp.shared_expert.up_proj"]),
}


def family_cfg(family: str, method: str = "full", *extra: str):
    return compose(*FAMILY_TINY, f"model.random_init.family={family}", f"+method={method}",
                   *extra)


def adapted(family: str, method: str, *extra: str):
    """The family's tiny model with `method` applied; LoRA's B starts at zero, so it is drawn
    at random here, or the adapter would change nothing that merge or the loss could show."""
    cfg = family_cfg(family, method, *extra)
    model, tokenizer, _ = load_model_and_tokenizer(cfg.model, load_options(cfg.method))
    model = apply_method(model, cfg.method, tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return cfg, model, tokenizer


# One build per family and method for the tests that only read the model (several seconds
# saved per family; the whole file must stay within a few minutes on two cores).
shared = functools.lru_cache(maxsize=None)(adapted)


def examples(tokenizer, lengths=(40, 23, 35)) -> list[Example]:
    """Examples longer than the families' sliding window (32), the first few tokens a prompt."""
    rng = random.Random(0)
    words = list(WORDS)
    found = []
    for n in lengths:
        ids = tokenizer(" ".join(rng.choice(words) for _ in range(n)))["input_ids"][:n]
        found.append(Example(ids, [IGNORE] * 5 + ids[5:]))
    return found


def own_loss(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["labels"], use_cache=False).loss


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", MODEL_FAMILIES)
@torch.no_grad()  # the gradients: the next test
def test_dtune_loss_is_the_models_own_forward_loss(family, method):
    _, model, tokenizer = shared(family, method)
    model.train()
    batch = collate(examples(tokenizer), tokenizer.pad_token_id)
    own = own_loss(model, batch).item()
    tokens = loss_token_count(batch)
    assert chunked_loss_mismatch(model, batch["input_ids"][:1]) is None
    for chunk_size in (0, 16):  # the plain loss, and the chunked one in several chunks
        ours = summed_token_loss(model, batch, chunk_size).item() / tokens
        assert abs(ours - own) < 1e-5, (chunk_size, ours, own)


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_chunked_loss_gradients_are_the_plain_losss(family):
    _, model, tokenizer = shared(family, "full")
    batch = collate(examples(tokenizer), tokenizer.pad_token_id)
    grads = []
    for chunk_size in (0, 16):
        model.zero_grad()
        summed_token_loss(model, batch, chunk_size).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        scale = max(1.0, grad.abs().max().item())  # fp32 rounding, relative to the largest
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6 * scale,
                                   msg=name)


def test_gemma2_soft_capped_logits_reach_the_chunked_loss_and_its_gradient():
    _, model, tokenizer = adapted("gemma2", "full")
    with torch.no_grad():  # random init keeps |logits| ~ 0.2, where tanh(x / 30) is linear
        model.get_output_embeddings().weight.mul_(300)
    batch = collate(examples(tokenizer), tokenizer.pad_token_id)
    tokens = loss_token_count(batch)
    own = own_loss(model, batch)
    chunked = summed_token_loss(model, batch, 16) / tokens
    assert abs(chunked.item() - own.item()) < 1e-5
    hidden = model(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                   output_hidden_states=True).hidden_states[-1][:, :-1]
    uncapped = chunked_lm_loss(hidden.reshape(-1, 64), model.lm_head.weight,
                               batch["labels"][:, 1:].reshape(-1), 16, LogitTransform())
    assert abs(uncapped.item() / tokens - own.item()) > 0.1  # the cap matters at this scale
    weight = model.lm_head.weight
    (g_own,) = torch.autograd.grad(own, weight)
    (g_chunked,) = torch.autograd.grad(chunked, weight)
    torch.testing.assert_close(g_chunked, g_own, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type, extra", [("cohere", {"logit_scale": 4.0}),
                                               ("granite", {"logits_scaling": 0.25})])
def test_logit_scaling_reaches_the_chunked_loss(model_type, extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=512, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    batch = collate(examples(build_tiny_tokenizer(512)), 0)
    own = own_loss(model, batch).item()
    assert chunked_loss_mismatch(model, batch["input_ids"][:1]) is None
    ours = summed_token_loss(model, batch, 16).item() / loss_token_count(batch)
    assert abs(ours - own) < 1e-5


def test_a_logit_step_dtune_does_not_know_makes_the_run_use_the_plain_loss(caplog):
    from transformers import AutoConfig, AutoModelForCausalLM

    from dtune.loss_plan import checked_chunk_size

    # HyperCLOVA X multiplies by its logits_scaling, where Granite divides: not trusted
    config = AutoConfig.for_model("hyperclovax", vocab_size=512, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  logits_scaling=4.0)
    model = AutoModelForCausalLM.from_config(config)
    tokenizer = build_tiny_tokenizer(512)
    ids = torch.tensor([tokenizer("a few words")["input_ids"]])
    assert "hyperclovax" in chunked_loss_mismatch(model, ids)

    class Engine:  # what checked_chunk_size uses of an engine
        def __init__(self):
            self.module = model

        def eval_context(self):
            return torch.no_grad()

        def to_device(self, batch):
            return batch

    with caplog.at_level("WARNING", logger="dtune"):
        assert checked_chunk_size(Engine(), tokenizer, 1024) == 0
    assert "train.loss_chunk_size=1024 is not used" in caplog.text


@pytest.mark.parametrize("family", MODEL_FAMILIES)
@torch.no_grad()
def test_packed_rows_give_each_example_its_loss_alone(family):
    _, model, tokenizer = shared(family, "lora")
    assert packs_by_position_ids(model)
    found = examples(tokenizer)
    # two rows: all three examples laid end to end, and one short row padded after
    packed = collate_packed([found, found[1:2]], tokenizer.pad_token_id)
    alone = [summed_token_loss(model, collate([e], tokenizer.pad_token_id)).item()
             for e in found]
    # Packing masks each example's first label: compare with the alone loss of its rest.
    starts = [0, len(found[0].input_ids), len(found[0].input_ids) + len(found[1].input_ids)]
    for i, start in enumerate(starts):
        only = dict(packed, labels=torch.full_like(packed["labels"], IGNORE))
        end = start + len(found[i].input_ids)
        only["labels"][0, start:end] = packed["labels"][0, start:end]
        assert summed_token_loss(model, only).item() == pytest.approx(alone[i], abs=1e-4)
    second_row = dict(packed, labels=packed["labels"].clone())
    second_row["labels"][0] = IGNORE
    assert summed_token_loss(model, second_row).item() == pytest.approx(alone[1], abs=1e-4)


def test_packing_is_refused_for_a_family_that_cannot_tell_examples_apart(tmp_path):
    from transformers import MambaConfig, MambaForCausalLM

    tokenizer = build_tiny_tokenizer(512)
    folder = tmp_path / "tiny-mamba"
    MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=64,
                                 num_hidden_layers=1)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(DtuneError) as refused:
        train(tmp_path / "run", *TINY, "model=smollm2-135m", f"model.name_or_path={folder}",
              "+method=lora", "method.target_modules=[in_proj]", "data.packing=true")
    message = " ".join(str(refused.value).split())
    assert "data.packing=true" in message and "(mamba)" in message
    assert "data.packing=false" in message


def save_as_run(run_dir, cfg, model, tokenizer) -> None:
    """A run directory as training leaves it: the config and final/ (the adapter)."""
    from dtune.checkpoint import save_final

    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / ".hydra" / "config.yaml")
    save_final(model, tokenizer, run_dir / "final")


@pytest.mark.parametrize("method", ["lora", "qlora", "dora"])
@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_merge_reproduces_the_adapter_model(tmp_path, family, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dtune.merge import merge_run

    cfg, model, tokenizer = shared(family, method)
    save_as_run(tmp_path, cfg, model, tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(merge_run(tmp_path)).eval()
    ids = collate(examples(tokenizer), tokenizer.pad_token_id)["input_ids"]
    adapter_model = model.eval()
    if method == "qlora":  # it merges into the full-precision base (dtune/merge.py)
        quantized = adapter_model
        base, _, _ = load_model_and_tokenizer(cfg.model)
        adapter_model = PeftModel.from_pretrained(base, tmp_path / "final").eval()
    with torch.no_grad():
        logits = merged(ids).logits
        torch.testing.assert_close(logits, adapter_model(ids).logits, rtol=1e-4, atol=1e-4)
        if method == "qlora":  # and the 4-bit adapter model by NF4's error only: 10-20% of
            # these tiny random logits, against ~140% for an unrelated model's
            error = (logits - quantized(ids).logits).abs().mean() / logits.abs().mean()
            assert error < 0.3, error


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_plan_counts_the_real_parameters(family):
    shape = model_shape(family_cfg(family))
    _, full, _ = shared(family, "full")
    assert shape.params == pytest.approx(sum(p.numel() for p in full.parameters()), rel=0.01)
    for method in ("lora", "dora"):
        cfg, model, _ = shared(family, method)
        trainable, _ = count_parameters(model)
        assert trainable_params(cfg, model_shape(cfg)) == pytest.approx(trainable, rel=0.01)


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_presets_name_the_familys_own_layers(family):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    _, model, _ = shared(family, "full")
    attention, mlp = PRESETS[family]
    assert resolve_targets(model, "attention", PEFT)[0] == attention
    assert resolve_targets(model, "mlp", PEFT)[0] == mlp
    assert resolve_targets(model, "all-linear", PEFT)[0] == sorted(attention + mlp)
    experts = resolve_targets(model, "all-linear", PEFT)[1]
    assert experts == (["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
                       if family == "qwen2_moe" else None)
    with pytest.raises(DtuneError) as refused:
        resolve_targets(model, ["c_attn"], PEFT)
    assert all(name in str(refused.value) for name in decoder_linears(model))


@pytest.mark.parametrize("preset", ["attention", "mlp"])
def test_lora_adapts_exactly_the_preset_layers(preset):
    _, model, _ = adapted("phi3", "lora", f"method.target_modules={preset}")
    adapted_layers = {n.split("layers.0.")[1].rsplit(".lora_A", 1)[0]
                      for n, _ in model.named_parameters() if "layers.0." in n and "lora_A" in n}
    assert adapted_layers == set(PRESETS["phi3"][preset == "mlp"])


def test_default_preset_without_a_peft_default_says_what_to_choose():
    with pytest.raises(DtuneError) as refused:
        adapted("phi3", "lora", "method.target_modules=default")
    message = " ".join(str(refused.value).split())
    assert "peft has no default layers for 'phi3'" in message
    assert "self_attn.qkv_proj" in message and "all-linear" in message


@pytest.mark.parametrize("family, method, extra", [
    ("gemma2", "lora", ["data.packing=true"]),  # soft caps, sliding window, packed rows
    ("qwen2_moe", "qlora", []),  # experts through peft's target_parameters, 4-bit base
    ("phi3", "dora", []),  # fused projections
])
def test_a_real_run_trains_and_merges(tmp_path, family, method, extra):
    from dtune.merge import merge_run
    from dtune.metrics import read_metrics

    result = train(tmp_path, *FAMILY_TINY, f"model.random_init.family={family}",
                   f"+method={method}", "train.max_steps=4", "train.lr=3e-3", *extra)
    losses = [m["loss"] for m in read_metrics(tmp_path / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert result.summary["trainable_params"] > 0
    assert (merge_run(tmp_path) / "model.safetensors").is_file()
