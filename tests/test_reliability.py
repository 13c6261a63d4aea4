"""Losing nothing: NaN steps, damaged checkpoints, and exact resume after kill -9."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, compose, one_line, run_dtune, train
from dtune.parity import step_losses
from dtune.checkpoint import seal, valid_checkpoints
from dtune.errors import DtuneError

FULL = [*TINY, "+method=full", "train.lr=1e-3", "eval.exact_match_samples=0"]


def poisoned_loss(monkeypatch, at_calls: set[int]):
    """Make the loss NaN on chosen forward passes, as a bad batch would."""
    import dtune.train as train_module

    real, calls = train_module.summed_token_loss, {"n": 0}

    def loss(model, batch, *args):
        calls["n"] += 1
        value = real(model, batch, *args)
        return value * float("nan") if calls["n"] in at_calls else value

    monkeypatch.setattr(train_module, "summed_token_loss", loss)


def test_nonfinite_step_is_skipped_counted_and_logged(tmp_path, monkeypatch):
    poisoned_loss(monkeypatch, at_calls={3})
    result = train(tmp_path, *FULL, "train.max_steps=6", "train.on_nonfinite=skip")
    records = [m for m in (json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text()
                           .splitlines()) if "nonfinite_steps" in m]
    assert [m["nonfinite_steps"] for m in records] == [0, 0, 1, 1, 1, 1]
    assert records[2]["loss"] is None and records[3]["loss"] is not None
    assert result.summary["nonfinite_steps"] == 1 and result.summary["steps"] == 6
    assert all(p.isfinite().all() for p in result.model.parameters())  # nothing was applied


def test_nonfinite_step_stops_with_the_step_causes_and_a_checkpoint(tmp_path, monkeypatch):
    poisoned_loss(monkeypatch, at_calls={4})
    with pytest.raises(DtuneError) as caught:
        train(tmp_path, *FULL, "train.max_steps=6", "train.on_nonfinite=stop")
    message = str(caught.value)
    assert "training stopped at step 4" in message and "train.lr=0.001" in message
    assert "fp16 overflow" in message and "bad data row" in message
    assert [p.name for p in valid_checkpoints(tmp_path)] == ["step-4"]


def test_a_huge_learning_rate_stops_the_cli_run_with_a_clear_message(tmp_path):
    result = run_dtune(*FULL, "train.lr=1e30", "train.max_steps=6", "train.on_nonfinite=stop",
                       f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    message = one_line(result.stderr)
    assert "non-finite" in message and "train.lr=1e+30" in message
    assert "Traceback" not in result.stderr


def float_settings(schema=None, prefix: str = ""):
    """Every float field of the schema, by dotted key: a field added later is covered too
    (a list of dataclasses, data.sources, is walked through its first item)."""
    import dataclasses
    import typing

    from dtune.config import Config

    for name, kind in typing.get_type_hints(schema or Config).items():
        key, args = prefix + name, [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) is list:
            kind, key = args[0], key + "[0]"
        elif typing.get_origin(kind) is typing.Union and len(args) == 1:  # Optional[...]
            kind = args[0]
        if kind is float:
            yield key
        elif dataclasses.is_dataclass(kind):
            yield from float_settings(kind, key + ".")


def with_setting(cfg, key: str, value: float):
    """A copy of the composed `cfg` with `key` set (data.sources[0].X: one source holding X)."""
    import copy

    from omegaconf import OmegaConf

    cfg = copy.deepcopy(cfg)
    if key.startswith("data.sources[0]."):
        OmegaConf.update(cfg, "data.sources", [{"path": "a.jsonl", key.rsplit(".", 1)[1]: value}])
    else:
        OmegaConf.update(cfg, key, value)
    return cfg


def test_every_float_setting_of_the_schema_refuses_nan_and_infinity():
    from dtune.compose import compose_dict, to_config

    keys = list(float_settings())
    # the walk reaches every group, nested and listed ones included
    assert {"train.lr", "train.max_grad_norm", "train.weight_decay", "objective.beta",
            "objective.gamma", "method.dropout", "precision.init_loss_scale",
            "data.eval_fraction", "data.sources[0].weight", "data.sources[0].fraction"} <= set(keys)
    composed = compose_dict(["model=tiny-llama"])
    for key in keys:
        for value in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(DtuneError) as caught:
                to_config(with_setting(composed, key, value))
            message = str(caught.value)
            assert f"{key}={value!r} is not a finite number" in message, message
            assert f"Set {key} to a finite number" in message
    # as typed on the command line (the cases)
    for override in ("train.lr=inf", "train.max_grad_norm=nan", "train.weight_decay=inf",
                     "objective.beta=nan", "objective.gamma=inf"):
        with pytest.raises(DtuneError, match=f"^{re.escape(override)} is not a finite number"):
            compose("model=tiny-llama", override)


def test_weights_that_went_nan_are_never_written_to_final(tmp_path, monkeypatch):
    """A skipped step keeps its update out, but an update itself can overflow: here step 2's
    update leaves a NaN in a trained tensor, and the run must not end as if it had worked."""
    import dtune.train as train_module

    real = train_module.train_step

    def step(recipe, state, *window):
        record = real(recipe, state, *window)
        if state.step == 2:
            with torch.no_grad():
                next(p for p in recipe.engine.module.parameters() if p.requires_grad) \
                    .fill_(float("nan"))
        return record

    monkeypatch.setattr(train_module, "train_step", step)
    with pytest.raises(DtuneError) as caught:
        train(tmp_path, *FULL, "train.max_steps=4")
    message = str(caught.value)
    assert "hold NaN or infinite values after step 4" in message
    assert "step 3 was this run's first step with a non-finite loss" in message
    assert f"{tmp_path / 'final'} was not written" in message and "train.lr=" in message
    assert not (tmp_path / "final").exists() and not (tmp_path / "summary.json").exists()


def test_a_damaged_checkpoint_is_skipped_or_reported_never_loaded(tmp_path, caplog):
    train(tmp_path, *FULL, "train.max_steps=2", "train.save_every=1")
    newest = tmp_path / "checkpoints" / "step-2"
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(b"\0" * optimizer.stat().st_size)  # same size, other bytes
    result = train(tmp_path, *FULL, "train.max_steps=3", "train.resume=true",
                   "train.save_every=0")
    assert result.summary["resumed_from"].endswith("step-1")  # its SHA-256 no longer matches
    assert "step-2: optimizer.pt does not match the SHA-256" in caplog.text
    shutil.rmtree(tmp_path / "checkpoints" / "step-3", ignore_errors=True)
    seal(newest, 2)  # a manifest that matches the damage: loading it must fail cleanly
    with pytest.raises(DtuneError, match=r"step-2 could not be loaded.*left as it is") as caught:
        train(tmp_path, *FULL, "train.max_steps=3", "train.resume=true")
    assert "delete" not in str(caught.value).lower()  # no advice that destroys a checkpoint


def test_a_checkpoint_from_another_method_is_refused(tmp_path):
    train(tmp_path, *FULL, "train.max_steps=2", "train.save_every=1")
    with pytest.raises(DtuneError, match=r"method.name: 'full' in the checkpoint, 'lora' now"):
        train(tmp_path, *TINY, "+method=lora", "train.max_steps=3", "train.resume=true",
              "eval.exact_match_samples=0")


def _kill_after_checkpoint(run_dir, overrides, step, env=None):
    """Start a CLI run, SIGKILL its whole process group once checkpoint `step` is complete."""
    process = subprocess.Popen([sys.executable, "-m", "dtune", *overrides,
                                f"hydra.run.dir={run_dir}"], cwd=ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, **(env or {})})
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if latest.is_file() and latest.read_text() == f"step-{step}":
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()[-2000:]


@pytest.mark.parametrize("layout", [[], ["parallelism=ddp", "parallelism.nproc_per_node=2"]],
                         ids=["single", "ddp2"])
def test_kill_9_after_a_checkpoint_resumes_bitwise(tmp_path, layout):
    overrides = [*FULL, "train.max_steps=40", "train.save_every=20", "train.micro_batch_size=16",
                 "data.builtin.train_size=512", *layout]
    whole = run_dtune(*overrides, f"hydra.run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-2000:]
    for attempt in range(3):
        cut = tmp_path / f"cut{attempt}"
        _kill_after_checkpoint(cut, overrides, step=20)
        if [c.name for c in valid_checkpoints(cut)][0] == "step-20":
            break  # else the run raced to its step-40 checkpoint before the kill: try again
    resumed = run_dtune(*overrides, "train.resume=true", f"hydra.run.dir={cut}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-20")
    whole_losses, resumed_losses = step_losses(tmp_path / "whole"), step_losses(cut)
    assert len(resumed_losses) == 40
    assert resumed_losses == whole_losses  # steps 21-40 bitwise, and 1-20 kept as logged


def test_kill_fuzz_three_trials(tmp_path):
    fuzz = subprocess.run([sys.executable, str(ROOT / "bench" / "kill_fuzz.py"), "--trials", "3",
                           "--work-dir", str(tmp_path), "--seed", "7"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert fuzz.returncode == 0, fuzz.stdout[-2000:] + fuzz.stderr[-2000:]
    result = json.loads((tmp_path / "kill_fuzz.json").read_text())
    assert result["trials"] == 3 and result["resumes_ok"] == 3
    assert result["checkpoints_lost"] == 0 and result["silent_jumps"] == 0
    assert "trials" in fuzz.stdout and "checkpoints lost" in fuzz.stdout


def test_deepspeed_skips_a_nonfinite_step_as_one_process_does(tmp_path, monkeypatch):
    """The engine's step() skips a NaN/inf update under DeepSpeed too, so `skip` and `stop`
    mean the same under every engine."""
    common = [*FULL, "train.max_steps=5", "train.loss_chunk_size=0"]
    poisoned_loss(monkeypatch, at_calls={3})
    single = train(tmp_path / "single", *common)
    monkeypatch.undo()
    poisoned_loss(monkeypatch, at_calls={3})
    rank_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    before = {k: os.environ.get(k) for k in rank_keys}
    zero = train(tmp_path / "zero2", *common, "parallelism=zero2",
                 "parallelism.nproc_per_node=1")
    # the one-process group left no rank behind for processes started later
    assert {k: os.environ.get(k) for k in rank_keys} == before
    assert single.summary["nonfinite_steps"] == zero.summary["nonfinite_steps"] == 1
    expected, got = step_losses(tmp_path / "single"), step_losses(tmp_path / "zero2")
    assert expected[2] is None and got[2] is None
    assert got[:2] + got[3:] == pytest.approx(expected[:2] + expected[3:], abs=1e-5)
    assert all(p.isfinite().all() for p in zero.model.parameters())
    # Its checkpoint resumed in one process: the changed stage is named, not called damage.
    with pytest.raises(DtuneError) as caught:
        train(tmp_path / "zero2", *common, "train.max_steps=6", "train.resume=true")
    message = str(caught.value)
    assert "parallelism.zero_stage: 2 in the checkpoint, null now" in message
    assert "damaged" not in message and "delete" not in message.lower()


# --- clear errors instead of tracebacks (issue 21, point 12) ------------------------------

def copy_run(run, to):
    shutil.copytree(run, to, symlinks=True)
    return to


def test_deeply_nested_json_is_named_by_file_and_line(tmp_path):
    from dtune.data.loading import read_records

    good = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"}]})
    deep = {depth: '{"messages": ' + "[" * depth + "]" * depth + "}\n" for depth in (900, 10**5)}
    # Python's JSON reader gives up on the first, Arrow on the second
    for rows, line in (([good, deep[10**5]], 2), ([deep[900]], 1)):
        path = tmp_path / f"deep{line}.jsonl"
        path.write_text("\n".join(rows))
        with pytest.raises(DtuneError) as caught:
            read_records(str(path), "chat", "data.path")
        message = str(caught.value)
        assert f"{path}, line {line}" in message and "nests lists or objects" in message
        assert "Flatten" in message


def word_tokenizer(chat_template: str):
    """A tokenizer with no files behind it: enough to render a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>",
                                        unk_token="[UNK]")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_a_chat_template_that_raises_is_one_paragraph():
    from dtune.data.formatting import tokenize

    record = {"messages": [{"role": "user", "content": "hi"},
                           {"role": "user", "content": "again"},
                           {"role": "assistant", "content": "hello"}]}
    for template, says in [
        ("{% for m in messages %}{% if loop.index0 % 2 == 0 and m.role != 'user' %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
         "{% if loop.index0 % 2 == 1 and m.role != 'assistant' %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
         "{{ m.content }}{% endfor %}", "roles must alternate"),
        ("{{ messages[0].content + 1 }}", "TypeError"),  # a template's own bug
    ]:
        with pytest.raises(DtuneError) as caught:
            tokenize(record, "chat", word_tokenizer(template), 64, False)
        message = str(caught.value)
        assert says in message and "roles user, user, assistant" in message
        assert "data.chat_template=chatml" in message


def failing_save(error: Exception):
    def save_pretrained(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 1000)  # half-written
        raise error
    return save_pretrained


def test_a_full_disk_during_merge_names_the_bytes_needed_and_leaves_nothing(
        tiny_lora_run, tmp_path, monkeypatch):
    import errno

    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    from dtune.merge import merge_run

    out = tmp_path / "merged"
    for error in (OSError(errno.ENOSPC, "No space left on device"),
                  RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "576 vs 534"),  # torch.save cut short
                  SafetensorError("Error while serializing: I/O error: No space left on "
                                  "device (os error 28)")):
        monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing_save(error))
        with pytest.raises(DtuneError) as caught:
            merge_run(tiny_lora_run, out)
        message = str(caught.value)
        assert message.startswith(f"the disk is full: writing the model's weights to {out}")
        assert "bytes) on the disk of" in message and "give --out a folder" in message
        needed = int(message.split("It needs about ")[1].split("(")[1].split(" bytes")[0]
                     .replace(",", ""))
        assert needed > 100_000  # the tiny model's weights, not the adapter's
        assert list(tmp_path.iterdir()) == []  # no merged/, no temporary folder
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing_save(ValueError("bug")))
    with pytest.raises(ValueError, match="bug"):  # anything else is not called a full disk
        merge_run(tiny_lora_run, out)


def test_report_on_a_damaged_metrics_or_summary_file_is_one_paragraph(tiny_lora_run,
                                                                       tmp_path):
    from dtune.report import write_report
    from dtune.run_dir import RunDir

    run = RunDir(copy_run(tiny_lora_run, tmp_path / "run"))
    lines = run.metrics_file.read_text().splitlines()
    run.metrics_file.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(DtuneError, match=rf"{run.metrics_file}, line 2: the line is not JSON"):
        write_report([run.path], tmp_path / "report")
    run.metrics_file.write_text("\n".join([lines[0], "[1, 2]", *lines[1:]]) + "\n")
    with pytest.raises(DtuneError, match="line 2: the line is a JSON list"):
        run.read_metrics()
    run.metrics_file.write_text("\n".join(lines) + "\n")
    for text, found in (("[1, 2]", "is a JSON list"), ("{oops", "is not JSON")):
        run.summary_file.write_text(text)
        with pytest.raises(DtuneError, match=rf"{run.summary_file} is damaged: it {found}"):
            write_report([run.path], tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_a_run_name_with_dollar_signs_is_reported_as_written(tiny_lora_run, tmp_path):
    """Plot labels are not mathtext: `$_$` in a run's name broke the report."""
    from dtune.report import write_report

    run = copy_run(tiny_lora_run, tmp_path / "lr$_$run")
    page = write_report([run], tmp_path / "report")
    assert "lr$_$run" in page.read_text()


def test_an_adapter_trained_on_another_model_size_is_one_paragraph(tiny_lora_run, tmp_path):
    import yaml

    from dtune.load_run import load_final_model
    from dtune.merge import merge_run
    from dtune.run_dir import RunDir

    run = RunDir(copy_run(tiny_lora_run, tmp_path / "run"))
    config = yaml.safe_load(run.config_file.read_text())
    config["model"]["random_init"]["hidden_size"] = 128  # not the size it was trained on
    run.config_file.write_text(yaml.safe_dump(config))
    for load in (lambda: load_final_model(run.path), lambda: merge_run(run.path)):
        with pytest.raises(DtuneError) as caught:
            load()
        message = one_line(str(caught.value))
        assert f"the adapter in {run.final} does not fit the base model tiny-llama" in message
        assert "size mismatch" in message and f"model.* in {run.config_file}" in message
    assert not run.merged.exists()


def test_data_values_in_messages_are_cut_to_an_excerpt():
    from dtune.data.loading import validate_record

    huge = ["word " * 460_000]  # 2.3 MB, in a list where a string belongs
    with pytest.raises(DtuneError) as caught:
        validate_record({"text": huge}, "text", "data.jsonl, line 7")
    message = str(caught.value)
    assert message.startswith("data.jsonl, line 7: the column 'text' must be a string, "
                              "found list ['word word")
    assert len(message) < 400
    with pytest.raises(DtuneError) as caught:
        validate_record({"messages": [{"role": "x" * 10**6, "content": "hi"}]}, "chat", "here")
    assert len(str(caught.value)) < 400 and "(1,000,000 characters)" in str(caught.value)


def test_max_new_tokens_beyond_the_models_context_is_refused(tiny_lora_run, monkeypatch,
                                                             capsys):
    """eval.max_new_tokens=100000000000 generated until killed."""
    from types import SimpleNamespace

    import dtune.evaluate
    from dtune import cli
    from dtune.train import check_context_length

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=1024))
    cfg = compose(*TINY, "eval.max_new_tokens=100000000000")
    with pytest.raises(DtuneError, match=r"eval.max_new_tokens=100000000000 is longer than "
                                         r"the context of tiny-llama \(1024 positions\)"):
        check_context_length(cfg, model)
    check_context_length(compose(*TINY, "eval.max_new_tokens=1024"), model)

    def never(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr(dtune.evaluate, "generate", never)
    for command in (["generate", str(tiny_lora_run), "--prompt", "hi"],
                    ["eval", str(tiny_lora_run), "--samples", "1"]):
        with pytest.raises(SystemExit):
            cli.main([*command, "--max-new-tokens", "100000000000"])
        message = one_line(capsys.readouterr().err)
        assert "--max-new-tokens=100000000000 is longer than the context" in message
        assert "Set --max-new-tokens<=1024" in message
