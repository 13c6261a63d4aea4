"""The real pretrained model, SmolLM2-135M-Instruct, loaded offline from its GGUF package."""
import os

import pytest
import torch

from conftest import compose, run_dtune
from dtune.metrics import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def real_cache(monkeypatch):
    # The GGUF conversion is worth keeping between sessions: use the user's cache.
    monkeypatch.setenv("DTUNE_CACHE_DIR", os.environ["DTUNE_REAL_CACHE_DIR"])


def test_smollm2_loads_offline_and_knows_its_facts():
    from dtune.evaluate import Inference, generate
    from dtune.models import load_model_and_tokenizer

    cfg = compose("model=smollm2-135m")
    model, tokenizer, source = load_model_and_tokenizer(cfg.model)
    assert "GGUF" in source or "cache" in source.lower()
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True)
    answer = generate(Inference.place(model), tokenizer, [prompt], 16, 1,
                      add_special_tokens=False)[0]
    assert "Paris" in answer


def test_lora_on_smollm2_learns_the_builtin_answer_format(tmp_path):
    from peft import PeftModel

    from dtune.models import load_model_and_tokenizer
    from dtune.train import run

    cfg = compose("+method=lora", "train.max_steps=6", "train.micro_batch_size=4",
                  "train.save_every=0", "data.builtin.train_size=64", "data.builtin.eval_size=8",
                  "eval.exact_match_samples=4", "eval.max_new_tokens=24", "train.log_every=1")
    result = run(cfg, tmp_path)
    evals = [m["eval_loss"] for m in read_metrics(tmp_path / "metrics.jsonl") if "eval_loss" in m]
    assert len(evals) == 2 and evals[-1] < 0.7 * evals[0]  # held-out loss, before vs after
    base, _, _ = load_model_and_tokenizer(cfg.model)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "final").eval()
    ids = torch.tensor([[1, 504, 2273, 314, 260]])
    result.model.eval()
    torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits)


def test_cli_trains_then_generates_with_the_real_model(tmp_path):
    run_dir = tmp_path / "run"
    trained = run_dtune("train.max_steps=4", "train.micro_batch_size=4", "train.save_every=0",
                        "data.builtin.train_size=32", "data.builtin.eval_size=4",
                        "eval.exact_match_samples=0", f"hydra.run.dir={run_dir}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "exact match" in trained.stdout and "dtune run summary" in trained.stdout
    answered = run_dtune("generate", str(run_dir), "--prompt", "What is the capital of France?",
                         "--max-new-tokens", "12", module=False)
    assert answered.returncode == 0, answered.stderr[-3000:]
    assert answered.stdout.strip()


def test_merge_then_generate_keeps_the_fine_tuned_behaviour(tmp_path):
    """After a short LoRA run the model answers in the trained format (digits only, not the
    base model's worked explanation), and the merged model answers exactly as the adapter."""
    run_dir = tmp_path / "run"
    trained = run_dtune("train.max_steps=30", "train.micro_batch_size=4", "train.save_every=0",
                        "train.warmup_steps=2", "data.builtin.eval_size=4",
                        "eval.exact_match_samples=0", f"hydra.run.dir={run_dir}",
                        timeout=1800)  # ~1 min on 2 quiet cores; far longer when shared
    assert trained.returncode == 0, trained.stderr[-3000:]
    merged = run_dtune("merge", str(run_dir), module=False)
    assert merged.returncode == 0, merged.stderr[-3000:]
    prompts = ["What is 245 + 310?", "Reverse the order of these words: apple stone river"]
    args = [arg for p in prompts for arg in ("--prompt", p)] + ["--max-new-tokens", "16"]
    adapter = run_dtune("generate", str(run_dir), *args, module=False)
    standalone = run_dtune("generate", str(run_dir / "merged"), *args, module=False)
    assert adapter.returncode == 0 and standalone.returncode == 0, standalone.stderr[-2000:]
    answers = adapter.stdout.strip().splitlines()
    assert answers == standalone.stdout.strip().splitlines()
    assert answers[0].isdigit(), answers
    assert sorted(answers[1].split()) == ["apple", "river", "stone"], answers
