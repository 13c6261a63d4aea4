"""The memory planner: counts from the config alone, orders the options as ZeRO promises,
and parallelism=auto picks the cheapest option that fits."""
import pytest

from dtune.errors import DtuneError
from dtune.models import load_model_and_tokenizer
from dtune.plan import GIB, choose, model_shape, plan
from tests.conftest import TINY, compose, one_line, run_dtune


def test_parameter_count_comes_from_the_config_and_matches_the_model():
    cfg = compose(*TINY)
    shape = model_shape(cfg)
    model, _, _ = load_model_and_tokenizer(cfg.model)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.layers == 2 and shape.hidden == 64


def by_name(estimates):
    return {e.parallelism: e for e in estimates}


def test_zero_stages_shard_what_they_promise():
    cfg = compose(*TINY, "+method=full")
    one = by_name(plan(cfg, 1, on_gpu=True))["single"]
    four = by_name(plan(cfg, 4, on_gpu=True))
    assert four["ddp"].total == one.total  # DDP replicates everything
    assert four["zero1"].optimizer == pytest.approx(one.optimizer / 4, rel=1e-6)
    assert four["zero2"].gradients == pytest.approx(one.gradients / 4, rel=1e-6)
    assert four["zero3"].weights == pytest.approx(one.weights / 4, rel=1e-6)
    totals = [four[p].total for p in ("ddp", "zero1", "zero2", "zero3")]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    assert four["zero2_offload"].optimizer == 0 and four["zero2_offload"].offloaded > 0


def test_fsdp2_shards_weights_gradients_and_optimizer_and_auto_may_choose_it():
    one = by_name(plan(compose(*TINY, "+method=full", "precision=bf16"), 1, on_gpu=True))
    four = by_name(plan(compose(*TINY, "+method=full", "precision=bf16"), 4, on_gpu=True))
    single, fsdp2, zero3 = one["single"], four["fsdp2"], four["zero3"]
    # fp32 weights sharded 4 ways, no fp32 masters in the optimizer (DeepSpeed keeps them)
    assert fsdp2.weights == pytest.approx(single.weights / 4, rel=1e-6)
    assert fsdp2.gradients == pytest.approx(single.gradients / 4, rel=1e-6)
    assert fsdp2.optimizer == pytest.approx(single.optimizer / 4, rel=1e-6)
    assert zero3.optimizer == pytest.approx(fsdp2.optimizer * 12 / 8, rel=1e-6)
    assert fsdp2.gathered > 0 and fsdp2_offload_moves(four)
    # a window of several micro-batches holds whole 16-bit gradients until its end
    accum = by_name(plan(compose(*TINY, "+method=full", "precision=bf16",
                                 "train.grad_accum_steps=2"), 4, on_gpu=True))["fsdp2"]
    assert accum.gradients - fsdp2.gradients == 2 * single.gradients / 4
    # where zero3 and fsdp2 both fit and nothing cheaper does, auto takes fsdp2
    estimates = [e for e in plan(compose(*TINY, "+method=full"), 4, on_gpu=True)
                 if e.parallelism in ("fsdp2", "zero3")]
    assert choose(estimates, 100 * GIB)[0].parallelism == "fsdp2"
    # what the config check refuses is neither planned nor chosen
    soft = by_name(plan(compose(*TINY, "+method=prompt_tuning"), 4, on_gpu=True))
    assert "zero3" in soft and "fsdp2" not in soft and "fsdp2_offload" not in soft
    pure = by_name(plan(compose(*TINY, "+method=full", "precision=bf16_pure"), 4, on_gpu=True))
    assert set(pure) == {"ddp", "fsdp2", "fsdp2_offload"}  # DeepSpeed keeps fp32 masters


def fsdp2_offload_moves(estimates) -> bool:
    offloaded = estimates["fsdp2_offload"]
    return offloaded.weights == 0 == offloaded.optimizer and offloaded.offloaded > 0


def test_quantised_bases_and_memory_savers_lower_the_estimate():
    base = (*TINY, "data.max_seq_len=256")
    single = lambda *o: by_name(plan(compose(*base, *o), 1, on_gpu=True))["single"]  # noqa: E731
    lora, qlora = single("+method=lora"), single("+method=qlora")
    linear = model_shape(compose(*base, "+method=lora")).linear_params
    # 4-bit linear weights: about half a byte instead of four
    assert lora.weights - qlora.weights == pytest.approx(linear * (4 - 0.516), rel=1e-3)
    assert single("+method=lora", "train.gradient_checkpointing=true").activations \
        < lora.activations
    assert single("+method=lora", "train.loss_chunk_size=64").activations < lora.activations
    shape = model_shape(compose(*base))
    assert lora.optimizer == 8 * 16 * shape.lora_params_per_rank  # two fp32 moments, r=16
    assert single("+method=full").optimizer == 8 * shape.params


def test_choose_takes_the_cheapest_option_that_fits_and_says_why():
    estimates = plan(compose(*TINY, "+method=full"), 4, on_gpu=True)
    sizes = by_name(estimates)
    best, why = choose(estimates, 100 * GIB)
    assert best.parallelism == "ddp" and "cheapest option that fits" in why
    between = (sizes["zero2"].total + sizes["zero1"].total) / 2
    best, why = choose(estimates, int(between))
    assert best.parallelism == "zero2" and "ddp needs" in why and "zero1 needs" in why
    with pytest.raises(DtuneError, match="no option fits"):
        choose(estimates, 1000)


def test_plan_command_prints_the_table_and_the_choice():
    result = run_dtune("plan", *TINY, "+method=full", "--world-size", "2", "--device-gib", "80",
                       "--device", "gpu", module=False)
    assert result.returncode == 0, result.stderr[-2000:]
    for option in ("ddp", "zero1", "zero2", "zero3", "zero3_offload"):
        assert f"| {option} |" in result.stdout
    assert "parallelism=auto would choose ddp" in one_line(result.stdout)
    # the longest context per layout, as set and with each long-context switch alone
    assert "| parallelism | as set | + gradient_checkpointing | + mlp_tiles=8 | " \
        "+ offload_activations | + sequence_parallel=2 |" in result.stdout


def test_parallelism_auto_trains_with_the_planned_choice(tmp_path):
    result = run_dtune(*TINY, "parallelism=auto", "train.max_steps=2",
                       "eval.exact_match_samples=0", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "parallelism=auto chose single" in one_line(result.stdout + result.stderr)
    assert (tmp_path / "summary.json").is_file()


def test_preference_objectives_plan_two_rows_a_pair_and_dpos_frozen_copy():
    single = lambda *o: by_name(plan(compose(*TINY, *o), 1, on_gpu=True))["single"]  # noqa: E731
    shape = model_shape(compose(*TINY))
    sft = single("+method=full", "train.loss_chunk_size=0")
    orpo = single("+method=full", "objective=orpo", "data.format=preference")
    # chosen and rejected rows: twice the tokens (and their full logits) of the same micro-batch
    assert orpo.activations == pytest.approx(2 * sft.activations, rel=1e-6)
    assert orpo.weights == sft.weights
    copy = single("+method=full", "objective=dpo", "data.format=preference",
                  "objective.reference=frozen_copy")
    precomputed = single("+method=full", "objective=dpo", "data.format=preference",
                         "objective.reference=precomputed")
    assert copy.weights - precomputed.weights == 4 * shape.params  # the fp32 starting weights
    lora = single("+method=lora", "objective=dpo", "data.format=preference")
    assert lora.weights == single("+method=lora").weights  # adapters disabled: no copy
