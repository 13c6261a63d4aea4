"""Every method and precision trains, saves what PEFT/transformers reload, and merges."""
import pytest
import torch

from conftest import TINY, compose, one_line, run_dtune, train
from dtune.methods import METHODS
from dtune.errors import DtuneError
from dtune.metrics import read_metrics
from dtune.load_run import load_final_model

PEFT_METHODS = [m for m in METHODS if m != "full"]
# Learning rates that move each kind of parameter within 30 steps on the tiny model.
LR = {"full": 3e-3, "ia3": 1e-1, "prompt_tuning": 1e-1, "prefix_tuning": 3e-2}
# Soft prompts and scales have few parameters and a random base to steer: a smaller margin.
MIN_DROP = {"ia3": 0.03, "prompt_tuning": 0.02, "prefix_tuning": 0.03}
IDS = torch.tensor([[3, 17, 42, 99, 7, 250, 12, 5]])


def tiny_method(data, method, *extra):
    return (*TINY, f"+method={method}", "data=file", f"data.path={data}", "data.format=chat",
            "data.max_seq_len=64", "train.max_steps=30", "eval.exact_match_samples=0",
            f"train.lr={LR.get(method, 1e-2)}", *extra)


def losses(run_dir):
    return [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


def base_weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if not p.requires_grad}


def test_every_method_has_a_config_and_a_function():
    from pathlib import Path

    conf = {p.stem for p in (Path(__file__).parent.parent / "conf" / "method").glob("*.yaml")}
    assert set(METHODS) == conf
    assert all(callable(spec.apply) and spec.precisions for spec in METHODS.values())


@pytest.mark.parametrize("method", METHODS)
def test_method_learns_reloads_and_keeps_its_base_frozen(tmp_path, constant_answer_data, method):
    cfg = compose(*tiny_method(constant_answer_data, method))
    from dtune.methods import apply_method, load_options
    from dtune.models import load_model_and_tokenizer

    untouched, tokenizer, _ = load_model_and_tokenizer(cfg.model, load_options(cfg.method))
    frozen_before = base_weights(apply_method(untouched, cfg.method, tokenizer))

    result = train(tmp_path, *tiny_method(constant_answer_data, method))
    history = losses(tmp_path)
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < (1 - MIN_DROP.get(method, 0.10)) * first, history

    trained = result.model.eval()
    frozen_after = base_weights(trained)
    assert frozen_after.keys() == frozen_before.keys()
    for name, before in frozen_before.items():
        assert torch.equal(before, frozen_after[name]), f"{name} changed"
    if method != "full":
        assert 0 < result.summary["trainable_params"] < 0.5 * result.summary["total_params"]

    reloaded, _, _ = load_final_model(tmp_path)
    torch.testing.assert_close(reloaded(IDS).logits, trained(IDS).logits)


def test_quantized_bases_are_really_quantized(tmp_path, constant_answer_data):
    import bitsandbytes as bnb

    q4 = train(tmp_path / "q4", *tiny_method(constant_answer_data, "qlora", "train.max_steps=2"))
    q8 = train(tmp_path / "q8", *tiny_method(constant_answer_data, "lora_int8",
                                              "train.max_steps=2"))
    layers4 = [m for m in q4.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    layers8 = [m for m in q8.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers4) == len(layers8) == 2 * 7  # q, k, v, o, gate, up, down per layer
    state = layers4[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # NF4 with double quantization
    assert layers4[0].weight.dtype == torch.uint8 and layers8[0].weight.dtype == torch.int8


def test_qlora_gradients_match_lora_on_the_dequantized_base():
    """The adapter sees the same gradient as over the dequantized weights in fp32."""
    import bitsandbytes as bnb

    from dtune.methods import apply_method, load_options
    from dtune.models import load_model_and_tokenizer

    q_cfg = compose("model=tiny-llama", "+method=qlora", "method.dropout=0")
    ref_cfg = compose("model=tiny-llama", "+method=lora", "method.dropout=0")
    quantized, tokenizer, _ = load_model_and_tokenizer(q_cfg.model, load_options(q_cfg.method))
    reference, _, _ = load_model_and_tokenizer(ref_cfg.model)
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            reference.get_submodule(name).weight.data.copy_(weight)
    grads = []
    for model, cfg in ((quantized, q_cfg), (reference, ref_cfg)):
        torch.manual_seed(0)
        peft_model = apply_method(model, cfg.method, tokenizer)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # non-zero B so that A receives gradient too
                param.data.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        with torch.no_grad():  # an eval pass first, as training does before step 1
            peft_model.eval()(input_ids=torch.tensor([[5, 6, 7]]))
        peft_model.train()
        peft_model(input_ids=torch.randint(0, 400, (4, 24), generator=torch.Generator()
                                           .manual_seed(1))).logits.pow(2).mean().backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, expected in grads[1].items():
        torch.testing.assert_close(grads[0][name], expected, rtol=0.05,
                                   atol=0.05 * float(expected.abs().max()), msg=name)


def test_fp16_overflow_skips_the_step_lowers_the_scale_and_training_goes_on(tmp_path,
                                                                            constant_answer_data):
    # 2**24 overflows fp16 gradients here; the scale halves per skipped step until it fits.
    result = train(tmp_path, *tiny_method(constant_answer_data, "full", "precision=fp16",
                                          f"precision.init_loss_scale={2**24}",
                                          "train.max_steps=12"))
    steps = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "loss" in m]
    assert steps[0]["skipped_steps"] == 1 and steps[0]["loss_scale"] == 2**23
    skipped = [b["skipped_steps"] > a["skipped_steps"] for a, b in zip(steps, steps[1:])]
    assert not all(skipped)  # once the scale fits, steps are taken again
    assert result.summary["skipped_steps"] == steps[-1]["skipped_steps"] < 12
    assert result.summary["loss_scale"] < 2**24
    first_taken = skipped.index(False) + 1
    assert steps[-1]["loss"] < steps[first_taken]["loss"]  # and the model learns
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # master weights


def test_fp16_mixed_precision_learns(tmp_path, constant_answer_data):
    train(tmp_path, *tiny_method(constant_answer_data, "full", "precision=fp16",
                                 "train.max_steps=15"))
    history = losses(tmp_path)
    assert history[-1] < 0.8 * history[0]
    assert "loss_scale" in read_metrics(tmp_path / "metrics.jsonl")[-2]


@pytest.mark.parametrize("precision, weight_dtype", [("bf16", torch.float32),
                                                     ("bf16_pure", torch.bfloat16)])
def test_bf16_precisions(tmp_path, constant_answer_data, precision, weight_dtype):
    result = train(tmp_path, *tiny_method(constant_answer_data, "full", f"precision={precision}",
                                          "train.max_steps=4"))
    assert result.summary["precision"] == precision
    assert {p.dtype for p in result.model.parameters()} == {weight_dtype}
    assert all(torch.isfinite(torch.tensor(losses(tmp_path))))


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merge_matches_the_adapter_model(tmp_path, constant_answer_data, method):
    from transformers import AutoModelForCausalLM

    from dtune.merge import merge_run

    result = train(tmp_path, *tiny_method(constant_answer_data, method, "train.max_steps=5"))
    merged_dir = merge_run(tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert (merged_dir / "model.safetensors").is_file()
    assert (merged_dir / "tokenizer.json").is_file()
    torch.testing.assert_close(merged(IDS).logits, result.model.eval()(IDS).logits,
                               rtol=1e-4, atol=1e-4)


def test_qlora_merges_into_the_dequantized_base(tmp_path, constant_answer_data):
    from transformers import AutoModelForCausalLM

    from dtune.merge import merge_run

    result = train(tmp_path, *tiny_method(constant_answer_data, "qlora", "train.max_steps=5"))
    merged = AutoModelForCausalLM.from_pretrained(merge_run(tmp_path, tmp_path / "out"))
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    adapter_logits = result.model.eval()(IDS).logits
    # quantization error only: close, not equal
    assert (merged(IDS).logits - adapter_logits).abs().max() < 0.1


def test_merge_refuses_soft_prompts_and_full_runs(tmp_path, constant_answer_data):
    from dtune.merge import merge_run

    train(tmp_path / "pt", *tiny_method(constant_answer_data, "prompt_tuning",
                                        "train.max_steps=1"))
    with pytest.raises(DtuneError, match="nothing to merge"):
        merge_run(tmp_path / "pt")
    result = run_dtune("merge", str(tmp_path / "pt"), module=False)
    assert result.returncode != 0 and "nothing to merge" in one_line(result.stderr)


@pytest.mark.parametrize("method", ["prompt_tuning", "qlora", "prefix_tuning"])
def test_generate_works_for_every_kind_of_adapter(tmp_path, constant_answer_data, method):
    from dtune.evaluate import Inference, generate

    train(tmp_path, *tiny_method(constant_answer_data, method, "train.max_steps=2"))
    model, tokenizer, _ = load_final_model(tmp_path)
    model = Inference.place(model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "apple river"}],
                                           tokenize=False, add_generation_prompt=True)
    greedy = generate(model, tokenizer, [prompt, prompt], 6, 2, add_special_tokens=False)
    assert greedy[0] == greedy[1]
    sampled = generate(model, tokenizer, [prompt], 6, 1, add_special_tokens=False,
                       do_sample=True, temperature=0.7)
    assert isinstance(sampled[0], str)


def test_prompt_tuning_can_start_from_a_text(tmp_path, constant_answer_data):
    result = train(tmp_path, *tiny_method(constant_answer_data, "prompt_tuning",
                                          "method.init_text='Answer the question'",
                                          "method.num_virtual_tokens=4", "train.max_steps=1"))
    assert result.summary["trainable_params"] == 4 * 64


@pytest.mark.parametrize("overrides, message", [
    (["+method=lora", "precision=bf16_pure"], "precision=bf16_pure does not work with +method=lora"),
    (["+method=qlora", "precision=fp16", "method.compute_dtype=fp32"], "method.compute_dtype=fp16"),
    (["+method=prompt_tuning", "data.max_seq_len=16", "method.num_virtual_tokens=20"],
     "leaves no room"),
    (["+method=lora", "method.init_text=hello"], "method.init_text='hello' has no effect"),
    (["+method=lora", "method.target_modules=ffn"], "method.target_modules='ffn'"),
    (["+method=qlora", "method.quant_type=int3"], "nf4, fp4"),
])
def test_combinations_that_cannot_work_are_refused_up_front(overrides, message):
    with pytest.raises(DtuneError) as caught:
        compose("model=tiny-llama", *overrides)
    assert message in str(caught.value)


@pytest.mark.parametrize("method", METHODS)
def test_without_train_lr_a_method_trains_at_its_own_rate_and_learns(tmp_path, method):
    """One learning rate does not fit all: at LoRA's, IA3 and soft prompts learn nothing."""
    from dtune.methods import METHODS as SPECS
    from dtune.train import run

    cfg = compose(*TINY, f"+method={method}", "train.max_steps=20",
                  "eval.exact_match_samples=0", "eval.max_loss_samples=8")
    assert cfg.train.lr == SPECS[method].recommended_lr
    run(cfg, tmp_path)
    history = losses(tmp_path)
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3 - 0.01, history
