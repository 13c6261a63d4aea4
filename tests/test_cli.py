"""The `dtune` console tools on a finished run: eval and generate."""
import json

from conftest import one_line, run_dtune


def test_dtune_eval_reports_loss_and_exact_match(tiny_lora_run):
    result = run_dtune("eval", str(tiny_lora_run), "--samples", "8", module=False)
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((tiny_lora_run / "eval.json").read_text())
    assert written["eval_loss"] > 0
    assert 0.0 <= written["exact_match"] <= 1.0 and written["n"] == 8
    summary = json.loads((tiny_lora_run / "summary.json").read_text())
    assert written["eval_loss"] < 1.5 * summary["eval_loss"]  # same model, larger sample


def test_dtune_generate_answers_as_the_trained_model_does(tiny_lora_run):
    from dtune.evaluate import Inference, generate
    from dtune.load_run import load_final_model

    prompts = ["What is 12 + 30?", "Convert 3 km to m."]
    result = run_dtune("generate", str(tiny_lora_run), "--prompt", prompts[0], "--prompt",
                       prompts[1], "--max-new-tokens", "8", module=False)
    assert result.returncode == 0, result.stderr[-2000:]
    model, tokenizer, _ = load_final_model(tiny_lora_run)
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    expected = generate(Inference.place(model), tokenizer, chats, 8, 1,
                        add_special_tokens=False)
    assert result.stdout.split("\n")[:2] == expected


def test_dtune_train_is_the_same_app_as_python_m_dtune(tmp_path):
    result = run_dtune("train", "model=tiny-llama", "train.lrr=1", module=False)
    assert result.returncode != 0
    assert "Did you mean train.lr" in one_line(result.stderr)


def test_eval_on_a_folder_that_is_not_a_run_is_refused(tmp_path):
    result = run_dtune("eval", str(tmp_path), module=False)
    assert result.returncode != 0
    assert "is not a dtune run directory" in one_line(result.stderr)
    assert "Traceback" not in result.stderr
