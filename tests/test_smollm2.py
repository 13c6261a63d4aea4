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
    from dtune.evaluate import generate
    from dtune.models import load_model_and_tokenizer

    cfg = compose("model=smollm2-135m")
    model, tokenizer, source = load_model_and_tokenizer(cfg.model)
    assert "GGUF" in source or "cache" in source.lower()
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True)
    answer = generate(model, tokenizer, [prompt], 16, 1, add_special_tokens=False)[0]
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
