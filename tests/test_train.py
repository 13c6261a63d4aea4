"""The training loop on the tiny model: what a run leaves, and the loop's correctness."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, compose, train
from dtune.checkpoint import valid_checkpoints
from dtune.metrics import read_metrics
from dtune.models import load_model_and_tokenizer
from dtune.train import run


def steps(run_dir):
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


def test_cli_run_leaves_the_documented_run_directory(tiny_lora_run):
    run_dir = tiny_lora_run
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "final" / "adapter_config.json").is_file()
    assert (run_dir / "final" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-12",
                                                                                "step-6"]
    records = steps(run_dir)
    assert [m["step"] for m in records] == list(range(1, 13))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens"):
        assert all(key in m for m in records), key
    evals = [m for m in read_metrics(run_dir / "metrics.jsonl") if m.get("split") == "eval"]
    assert [m["step"] for m in evals] == [0, 4, 8, 12]
    assert all("eval_loss" in m for m in evals)
    assert "exact_match" in evals[0] and "exact_match" in evals[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("final_loss", "eval_loss", "wall_time_s", "trainable_params", "total_params",
                "peak_memory_bytes", "exact_match_before", "exact_match_after"):
        assert summary[key] is not None, key
    assert 0 < summary["trainable_params"] < summary["total_params"]


def test_full_fine_tuning_lowers_the_loss_and_saves_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = compose(*TINY, "+method=full", "train.max_steps=30", "train.lr=3e-3")
    result = run(cfg, tmp_path)
    losses = [m["loss"] for m in steps(tmp_path)]
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    result.model.eval()
    torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits)


def test_lora_adapter_reloads_with_peft_and_gives_the_same_logits(tmp_path):
    from peft import PeftModel

    cfg = compose(*TINY, "+method=lora", "train.max_steps=10", "train.lr=1e-2")
    result = run(cfg, tmp_path)
    base, _, _ = load_model_and_tokenizer(cfg.model)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "final").eval()
    result.model.eval()
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    trained_logits = result.model(ids).logits
    torch.testing.assert_close(reloaded(ids).logits, trained_logits)
    # and the adapter did change the model, so the comparison means something
    plain, _, _ = load_model_and_tokenizer(cfg.model)
    assert not torch.allclose(plain(ids).logits, trained_logits)


def test_two_identical_runs_give_identical_losses(tmp_path):
    cfg = compose(*TINY, "+method=lora", "train.max_steps=6", "eval.exact_match_samples=0")
    run(cfg, tmp_path / "a")
    run(cfg, tmp_path / "b")
    assert [m["loss"] for m in steps(tmp_path / "a")] == [m["loss"] for m in steps(tmp_path / "b")]


def test_accumulated_gradient_equals_the_gradient_of_the_whole_batch():
    from dtune.data.batching import collate
    from dtune.data.builtin import generate
    from dtune.data.formatting import tokenize
    from dtune.distributed import Ranks
    from dtune.engines import build_engine
    from dtune.train import accumulate_gradients, window_counts

    cfg = compose(*TINY, "+method=full")
    model, tokenizer, _ = load_model_and_tokenizer(cfg.model)
    records, _ = generate(["add", "reverse_words", "extract_json"], 8, 0, seed=5)
    examples = [tokenize(r, "chat", tokenizer, 256, False) for r in records]
    assert len({len(e.input_ids) for e in examples}) > 1  # unequal lengths make this a real test

    engine = build_engine(cfg, model, Ranks(), total_steps=1)

    def grads(window):
        model.zero_grad()
        loss = float(accumulate_gradients(engine, window, window_counts(window).loss_tokens))
        return loss, [p.grad.clone() for p in model.parameters()]

    pad = tokenizer.pad_token_id
    loss_1x8, grads_1x8 = grads([collate([e], pad) for e in examples])
    loss_8x1, grads_8x1 = grads([collate(examples, pad)])
    loss_2x4, grads_2x4 = grads([collate(examples[:2], pad), collate(examples[2:], pad)])
    assert loss_1x8 == pytest.approx(loss_8x1, rel=1e-6)
    assert loss_2x4 == pytest.approx(loss_8x1, rel=1e-6)
    for g_a, g_b, g_c in zip(grads_1x8, grads_8x1, grads_2x4):
        torch.testing.assert_close(g_a, g_b, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(g_c, g_b, rtol=1e-4, atol=1e-7)


def test_one_by_eight_and_eight_by_one_runs_follow_the_same_losses(tmp_path):
    common = (*TINY, "+method=full", "train.max_steps=3", "train.lr=1e-3",
              "eval.exact_match_samples=0")
    run(compose(*common, "train.micro_batch_size=1", "train.grad_accum_steps=8"), tmp_path / "a")
    run(compose(*common, "train.micro_batch_size=8", "train.grad_accum_steps=1"), tmp_path / "b")
    losses_a = [m["loss"] for m in steps(tmp_path / "a")]
    losses_b = [m["loss"] for m in steps(tmp_path / "b")]
    assert losses_a == pytest.approx(losses_b, rel=1e-5)


def test_resume_continues_exactly_where_the_checkpoint_left_off(tmp_path):
    cfg = compose(*TINY, "+method=lora", "train.max_steps=8", "train.save_every=4",
                  "eval.exact_match_samples=0")
    run(cfg, tmp_path / "whole")
    # Make a copy look like a run killed after its step-4 checkpoint.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    shutil.rmtree(cut / "checkpoints" / "step-8")
    shutil.rmtree(cut / "final")
    (cut / "checkpoints" / "latest").write_text("step-4")
    resumed_cfg = compose(*TINY, "+method=lora", "train.max_steps=8", "train.save_every=4",
                          "eval.exact_match_samples=0", "train.resume=true")
    result = run(resumed_cfg, cut)
    assert result.summary["resumed_from"].endswith("step-4")
    whole, resumed = steps(tmp_path / "whole"), steps(cut)
    assert [m["step"] for m in resumed] == list(range(1, 9))  # no step logged twice
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole]  # bitwise
    final_whole = load_file(tmp_path / "whole" / "final" / "adapter_model.safetensors")
    final_resumed = load_file(cut / "final" / "adapter_model.safetensors")
    for name in final_whole:
        assert torch.equal(final_whole[name], final_resumed[name]), name


def test_resume_skips_a_checkpoint_whose_files_do_not_match_its_manifest(tmp_path):
    cfg = compose(*TINY, "+method=lora", "train.max_steps=4", "train.save_every=2",
                  "eval.exact_match_samples=0")
    run(cfg, tmp_path)
    newest = tmp_path / "checkpoints" / "step-4"
    with open(newest / "optimizer.pt", "ab") as handle:
        handle.write(b"torn write")
    assert [p.name for p in valid_checkpoints(tmp_path)] == ["step-2"]


def test_epochs_set_the_step_count_when_max_steps_is_unset(tmp_path):
    cfg = compose(*TINY, "+method=lora", "train.max_steps=-1", "train.epochs=2",
                  "data.builtin.train_size=40", "train.micro_batch_size=8",
                  "train.grad_accum_steps=2", "eval.exact_match_samples=0")
    result = run(cfg, tmp_path)
    assert result.summary["steps"] == 2 * (40 // 8 // 2)


def test_a_run_may_end_without_its_final_checkpoint_and_model(tmp_path):
    """train.save_final=false: what a benchmark that only measures asks for (a 1B model's
    checkpoint and final/ are 16 GB)."""
    result = train(tmp_path, *TINY, "+method=full", "train.max_steps=2",
                   "eval.exact_match_samples=0", "train.save_final=false")
    assert result.summary["steps"] == 2 and result.summary["final_artifact"] is None
    assert not (tmp_path / "final").exists() and not (tmp_path / "checkpoints").exists()
