"""The end of the path (#27, point 10): `dtune export RUN --gguf` writes the merged model as one
GGUF file that transformers' GGUF loader reads back as the same model (logits, tokenizer, chat
template), for llama (the default model's architecture), qwen2 and mistral; `dtune generate`
answers from it; `--checkpoint step-N` reads the model a sealed checkpoint holds, in eval,
generate, merge and export. Refusals: an architecture or tokenizer the writer cannot carry, an
output in a run's own folders or over a file dtune did not write, a damaged, foreign or ZeRO
checkpoint.

Tolerances, as max |logit difference| over the largest |logit|: f16 within 0.2% (measured:
0.02-0.04% on the tiny models, 0.1% on SmolLM2-135M); q8_0 within 5% (measured: 0.6-0.9% tiny,
3.4% on SmolLM2-135M, whose GGUF-shipped weights are already on a 4-bit grid).
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose, one_line, run_dtune
from dtune.errors import DtuneError
from dtune.export import check_architecture, export_gguf, pre_tokenizer_name, write_gguf
from dtune.load_run import load_final_model, load_for_generation, load_run_config
from dtune.run_dir import RunDir

F16, Q8_0 = 0.002, 0.05
# Short enough for the tiny Mistral's 32-token sliding window (the GGUF graph has none).
TEXTS = ["What is 12 + 30?", "<|im_start|>user\nhello there<|im_end|>\n", " ünïcödé  12345"]


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, symlinks=True)
    return to


def assert_close(expected: torch.Tensor, got: torch.Tensor, share: float) -> None:
    worst, scale = (expected - got).abs().max().item(), expected.abs().max().item()
    assert worst <= share * scale, f"max |diff| {worst:.3g} over {share:.1%} of {scale:.3g}"


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def assert_same_tokenizer(expected, got) -> None:
    for text in TEXTS:
        assert got(text)["input_ids"] == expected(text)["input_ids"], text
    assert got.chat_template == expected.chat_template
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(got, name) == getattr(expected, name), name


def merged_model(run_dir: Path, checkpoint=None):
    from dtune.load_run import trained_weights
    from dtune.merge import load_merged

    run = RunDir(run_dir)
    cfg = load_run_config(run.path)
    return load_merged(run, cfg, trained_weights(run, cfg, checkpoint))


@pytest.fixture(scope="module")
def exported(tiny_lora_run, tmp_path_factory) -> Path:
    """The tiny LoRA run's final model as an f16 GGUF (written once for this file)."""
    return export_gguf(tiny_lora_run, tmp_path_factory.mktemp("gguf") / "model.gguf")


def test_a_lora_runs_gguf_is_the_merged_model_with_its_tokenizer(tiny_lora_run, exported,
                                                                 tmp_path):
    model, tokenizer = merged_model(tiny_lora_run)
    ids = torch.tensor([tokenizer(TEXTS[0] + TEXTS[1])["input_ids"]])
    expected = logits(model, ids)
    back, back_tokenizer, _ = load_for_generation(exported)
    assert_close(expected, logits(back, ids), F16)
    assert_same_tokenizer(tokenizer, back_tokenizer)
    # q8_0 through the command line, into the run's default file name
    run = copy_run(tiny_lora_run, tmp_path / "run")
    result = run_dtune("export", str(run), "--gguf", "--quant", "q8_0", module=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"written to {RunDir(run).gguf_file('q8_0')}" in result.stdout
    back, back_tokenizer, _ = load_for_generation(RunDir(run).gguf_file("q8_0"))
    assert_close(expected, logits(back, ids), Q8_0)
    assert_same_tokenizer(tokenizer, back_tokenizer)
    assert exported.stat().st_size > 1.7 * RunDir(run).gguf_file("q8_0").stat().st_size


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families_round_trip_through_gguf(family, tmp_path):
    """Qwen2 (biases on q/k/v, tied embeddings, its own pre-tokenizer, rotary halves kept) and
    Mistral (written as llama.cpp's llama graph, q/k rows interleaved)."""
    from dtune.methods import apply_method
    from dtune.models import load_model_and_tokenizer

    cfg = compose(*TINY, f"model.random_init.family={family}", "+method=lora")
    base, tokenizer, _ = load_model_and_tokenizer(cfg.model)
    model = apply_method(base, cfg.method, tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero: drawn here, so the merge changes weights
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    merged = model.merge_and_unload().eval()
    ids = torch.tensor([tokenizer(TEXTS[0] + TEXTS[2])["input_ids"]])
    expected = logits(merged, ids)
    for quant, share in (("f16", F16), ("q8_0", Q8_0)):
        out = tmp_path / f"{family}-{quant}.gguf"
        write_gguf(merged, tokenizer, out, quant, check_architecture(merged.config))
        back, back_tokenizer, _ = load_for_generation(out)
        assert type(back).__name__ == ("Qwen2ForCausalLM" if family == "qwen2"
                                       else "LlamaForCausalLM")
        assert_close(expected, logits(back, ids), share)
        assert_same_tokenizer(tokenizer, back_tokenizer)


def test_dtune_generate_answers_from_a_gguf(exported, capsys):
    from dtune.cli import main
    from dtune.evaluate import Inference, generate

    prompts = ["What is 12 + 30?", "Convert 3 km to m."]
    main(["generate", str(exported), "--raw", "--prompt", prompts[0], "--prompt", prompts[1],
          "--max-new-tokens", "8"])
    model, tokenizer, _ = load_for_generation(exported)
    expected = generate(Inference.place(model), tokenizer, prompts, 8, 1,
                        add_special_tokens=True)
    assert capsys.readouterr().out.split("\n")[:2] == expected and all(expected)


def test_a_checkpoint_gives_the_model_it_holds(tiny_lora_run, tmp_path, capsys):
    """step-12 is the step final/ was saved at, so the two loads must agree; step-6 is earlier
    training. eval from step-12 gives the held-out loss training recorded at step 12."""
    from dtune.cli import main
    from dtune.merge import merge_run

    run = copy_run(tiny_lora_run, tmp_path / "run")
    final, tokenizer, _ = load_final_model(run)
    at_12, _, _ = load_final_model(run, checkpoint="step-12")
    at_6, _, _ = load_final_model(run, checkpoint="step-6")
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    torch.testing.assert_close(logits(at_12, ids), logits(final, ids), rtol=1e-6, atol=1e-6)
    assert (logits(at_6, ids) - logits(final, ids)).abs().max() > 1e-3
    (run / "eval.json").unlink(missing_ok=True)  # another test's `dtune eval` of the shared run
    main(["eval", str(run), "--checkpoint", "step-12", "--samples", "1"])
    written = json.loads((run / "eval-step-12.json").read_text())
    recorded = [m for m in RunDir(run).read_metrics() if m.get("step") == 12 and "eval_loss" in m]
    assert written["checkpoint"] == "step-12" and not (run / "eval.json").exists()
    assert abs(written["eval_loss"] - recorded[0]["eval_loss"]) < 1e-5
    assert json.loads(capsys.readouterr().out)["eval_loss"] == written["eval_loss"]
    # merge and export read the same weights
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merge_run(run, checkpoint="step-6"))
    assert (run / "merged-step-6" / "model.safetensors").is_file()
    torch.testing.assert_close(logits(merged, ids), logits(at_6, ids), rtol=1e-4, atol=1e-4)
    back, _, _ = load_for_generation(export_gguf(run, checkpoint="step-6"))
    assert_close(logits(at_6, ids), logits(back, ids), F16)
    assert RunDir(run).gguf_file("f16", "step-6").name == "model-step-6-f16.gguf"


def reseal(folder: Path, **state) -> None:
    """Change a checkpoint's trainer_state.json and write its manifest again, as if the run
    that wrote it had saved it so (a foreign or a ZeRO checkpoint, not a damaged one)."""
    from dtune.checkpoint import MANIFEST, seal

    path = folder / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **state}))
    (folder / MANIFEST).unlink()
    seal(folder, int(folder.name.split("-")[1]))


def test_a_damaged_foreign_zero_or_unknown_checkpoint_is_refused_in_one_paragraph(
        tiny_lora_run, tmp_path, exported):
    from dtune.merge import merge_run

    run = RunDir(copy_run(tiny_lora_run, tmp_path / "run"))
    weights = run.checkpoints / "step-6" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    reseal(run.checkpoints / "step-12", run_id="0123456789ab")
    for load in (lambda c: load_final_model(run.path, checkpoint=c),
                 lambda c: merge_run(run.path, checkpoint=c),
                 lambda c: export_gguf(run.path, checkpoint=c)):
        with pytest.raises(DtuneError) as caught:
            load("step-6")
        assert "model.safetensors does not match the SHA-256 its manifest recorded" in \
            one_line(str(caught.value))
        with pytest.raises(DtuneError, match="was not written by the run in .* names run "
                                             "0123456789ab"):
            load("step-12")
        with pytest.raises(DtuneError, match=r"holds no checkpoint of that name \(it holds: "
                                             r"step-12, step-6\)"):
            load("step-99")
    shutil.copytree(tiny_lora_run / "checkpoints" / "step-12", run.checkpoints / "step-13")
    (run.checkpoints / "step-13" / "model.safetensors").unlink()  # ZeRO keeps its own files
    settings = json.loads((run.checkpoints / "step-13" / "trainer_state.json").read_text())[
        "settings"]
    reseal(run.checkpoints / "step-13", step=13, zero_world_size=2,
           settings={**settings, "parallelism.engine": "deepspeed"})
    with pytest.raises(DtuneError, match="written by DeepSpeed ZeRO"):
        load_final_model(run.path, checkpoint="step-13")
    with pytest.raises(DtuneError, match="names a checkpoint of a run directory"):
        load_for_generation(exported, checkpoint="step-6")
    assert not run.merged_at("step-6").exists() and not run.gguf_file("f16", "step-6").exists()


def test_export_refuses_what_it_cannot_write_before_loading_a_weight(tiny_lora_run, tmp_path,
                                                                     monkeypatch):
    import yaml

    import dtune.export
    from dtune.merge import check_standalone
    from dtune.methods import METHODS

    monkeypatch.setattr(dtune.export, "load_merged", lambda *a: pytest.fail("weights loaded"))
    run = RunDir(copy_run(tiny_lora_run, tmp_path / "run"))
    config = yaml.safe_load(run.config_file.read_text())
    config["model"]["random_init"]["family"] = "phi3"
    run.config_file.write_text(yaml.safe_dump(config))
    with pytest.raises(DtuneError) as caught:
        export_gguf(run.path)
    assert "writes llama, mistral, qwen2 models" in one_line(str(caught.value))
    assert "is a 'phi3' model" in str(caught.value) and "dtune merge" in str(caught.value)
    # a tokenizer that splits text in a way llama.cpp has no name for
    from tokenizers import pre_tokenizers

    _, tokenizer, _ = load_final_model(tiny_lora_run)
    assert pre_tokenizer_name(tokenizer) == "gpt-2"
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(DtuneError, match="byte-level BPE tokenizers that split text as GPT-2"):
        pre_tokenizer_name(tokenizer)
    with pytest.raises(DtuneError, match="soft prompt .* no standalone model for dtune export"):
        check_standalone(run, METHODS["prompt_tuning"], "export")


def test_export_writes_only_where_an_output_may_go(tiny_lora_run, exported, tmp_path,
                                                    monkeypatch):
    import dtune.export

    run = RunDir(copy_run(tiny_lora_run, tmp_path / "run"))
    monkeypatch.setattr(dtune.export, "load_merged", lambda *a: pytest.fail("weights loaded"))
    for out, expect in [(run.final / "model.gguf", "inside the final/ folder of the run"),
                        (run.final, "the final/ folder of the run"),
                        (run.checkpoints / "step-6" / "x.gguf", "inside the checkpoints/")]:
        with pytest.raises(DtuneError, match=expect) as caught:
            export_gguf(run.path, out, force=True)
        assert f"Name another file, e.g. --gguf {run.gguf_file('f16')}" in \
            one_line(str(caught.value))
    mine = tmp_path / "notes.gguf"
    mine.write_text("mine")
    with pytest.raises(DtuneError, match="dtune did not write it as a GGUF model file"):
        export_gguf(run.path, mine)
    (tmp_path / "folder.gguf").mkdir()
    with pytest.raises(DtuneError, match="is a folder, and this command writes one file"):
        export_gguf(run.path, tmp_path / "folder.gguf", force=True)
    os.symlink(mine, tmp_path / "link.gguf")
    with pytest.raises(DtuneError, match="is a symbolic link"):
        export_gguf(run.path, tmp_path / "link.gguf", force=True)
    assert mine.read_text() == "mine"
    # a GGUF dtune wrote is replaced without --force, another file only with it; each whole
    monkeypatch.undo()
    again = shutil.copy(exported, tmp_path / "again.gguf")
    for out, force in ((again, False), (mine, True)):
        assert export_gguf(run.path, out, force=force) == out
        assert out.read_bytes()[:4] == b"GGUF" and not list(tmp_path.glob(".*.tmp-*"))


@pytest.mark.slow
def test_smollm2_round_trips_through_gguf(tmp_path, monkeypatch):
    """The real default model (about a minute: 270 MB written and read back per quant)."""
    from dtune.models import load_model_and_tokenizer

    monkeypatch.setenv("DTUNE_CACHE_DIR", os.environ["DTUNE_REAL_CACHE_DIR"])  # its conversion
    cfg = compose("model=smollm2-135m")
    model, tokenizer, _ = load_model_and_tokenizer(cfg.model)
    ids = torch.tensor([tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, tokenize=True, return_dict=False)])
    expected = logits(model.eval(), ids)
    for quant, share in (("f16", F16), ("q8_0", Q8_0)):
        out = tmp_path / f"smollm2-{quant}.gguf"
        write_gguf(model, tokenizer, out, quant, check_architecture(model.config),
                   {"base": cfg.model.name_or_path})
        back, back_tokenizer, _ = load_for_generation(out)
        assert_close(expected, logits(back, ids), share)
        assert_same_tokenizer(tokenizer, back_tokenizer)
        del back


def test_each_pre_tokenizer_name_means_the_split_transformers_gguf_loader_applies():
    """A name whose split differed in transformers' reader would tokenize prompts otherwise
    than training did; "gpt-2" and "smollm" it leaves to GPT-2's own split."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from dtune.export import PRE_TOKENIZERS

    for shape, name in PRE_TOKENIZERS.items():
        if isinstance(shape[0], str) and shape[0].startswith("("):  # a Split's regex
            assert GGUF_PRE_TOKENIZER_SPLITS[name] == shape[0], name
        else:
            assert name not in GGUF_PRE_TOKENIZER_SPLITS, name
