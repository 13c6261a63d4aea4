"""The user's path, tried as a new user would (issue 27): what the README promises works as
written, and what cannot is refused in dtune's own words before anything loads."""
import hashlib
import json
import logging
import os

import pytest

from conftest import TINY, compose, one_line, run_dtune
from dtune.errors import DtuneError
from dtune.run_dir import RunDir

SMALL = [*TINY, "eval.exact_match_samples=0", "data.builtin.train_size=64",
         "data.builtin.eval_size=8", "eval.max_loss_samples=8"]


def run_in(path, *overrides):
    from dtune.train import run

    return run(compose(*overrides), path)


# --- 1. preference pairs stream --------------------------------------------------------------

@pytest.mark.parametrize("method", ["+method=lora", "+method=full"])
def test_preference_pairs_train_from_a_stream(tmp_path, method):
    """The built-in pairs, streamed: the adapters' own base as DPO's reference for LoRA, a
    frozen copy for full fine-tuning (nothing to precompute over a stream)."""
    result = run_in(tmp_path, *SMALL, method, "objective=dpo", "data=builtin_preference",
                    "data.streaming=true", "train.max_steps=3")
    steps = RunDir(tmp_path).step_records()
    assert [s["pairs"] for s in steps] == [4, 4, 4]
    assert all(s["loss"] is not None for s in steps)
    assert result.summary["reference"] == ("adapter_disabled" if "lora" in method
                                           else "frozen_copy")
    assert result.summary["preference_accuracy_after"] is not None


def test_preference_pairs_stream_from_a_file(tmp_path):
    rows = [{"prompt": f"What is {i} + {i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)}
            for i in range(40)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_in(tmp_path / "run", *SMALL, "objective=dpo", "data=file", f"data.path={path}",
                    "data.format=preference", "data.streaming=true", "train.max_steps=2")
    assert result.summary["steps"] == 2 and result.summary["final_loss"] is not None


# --- 2. a sweep runs every job, and says which failed and why -------------------------------

def test_a_sweep_runs_past_a_failing_job_and_its_table_says_why(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_dtune("-m", *SMALL, "train.max_steps=1", "train.lr=1e-3,-1,2e-3",
                       f"hydra.sweep.dir={sweep}")
    assert result.returncode != 0  # a sweep with a failed job is no success
    assert "1 of 3 sweep jobs failed (1)" in one_line(result.stderr)
    table = (sweep / "results.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert "| completed |" in rows["0"] and "| completed |" in rows["2"]
    assert "failed: train.lr=-1.0 is out of range; it must be > 0." in rows["1"]
    assert "Traceback" not in result.stderr


# --- 3. how long a run trains: one rule ------------------------------------------------------

def test_epochs_on_your_own_data_are_honoured_and_the_summary_says_what_set_the_length(
        tmp_path):
    rows = [{"instruction": f"say {i}", "output": str(i)} for i in range(40)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ["data=file", f"data.path={path}", "data.format=alpaca", "data.eval_fraction=0.1"]
    assert compose(*SMALL, *data).train.max_steps == -1  # the built-in data's 80 stays there
    three = run_in(tmp_path / "three", *SMALL, *data, "train.epochs=3")
    assert three.summary["steps"] == 27 and three.summary["steps_set_by"] == "train.epochs=3"
    both = run_in(tmp_path / "both", *SMALL, *data, "train.epochs=3", "train.max_steps=5")
    assert both.summary["steps"] == 5
    assert both.summary["steps_set_by"] == "train.max_steps=5, before train.epochs=3 (27 steps)"


def test_a_resume_that_changes_the_planned_steps_says_so(tmp_path, caplog):
    run_in(tmp_path, *SMALL, "train.max_steps=2", "train.save_every=1")
    caplog.set_level(logging.WARNING, logger="dtune")
    run_in(tmp_path, *SMALL, "train.max_steps=4", "train.resume=true")
    assert "planned 2 steps when step-2 was saved and plans 4 now" in caplog.text
    assert "learning-rate schedule" in caplog.text


# --- 4. dtune plan plans for the device asked about; the hub is asked once -------------------

def test_plan_with_a_gpus_memory_plans_for_gpus_on_a_machine_without_one():
    result = run_dtune("plan", *TINY, "+method=full", "--world-size", "8", "--device-gib", "80",
                       module=False)
    assert result.returncode == 0, result.stderr[-2000:]
    header = result.stdout.splitlines()[0]
    assert "80.0 GiB per device (GPU: --device-gib given" in header
    assert "precision=bf16" in header  # auto settles as on a GPU
    assert "parallelism=auto would choose ddp, the cheapest option that fits" in result.stdout


def test_a_plan_that_does_not_fit_never_suggests_the_method_in_use():
    from dtune.plan import choose, plan

    for method, suggested in (("qlora", False), ("lora", True), ("full", True)):
        estimates = plan(compose(*TINY, f"+method={method}"), 1, on_gpu=True)
        with pytest.raises(DtuneError) as caught:
            choose(estimates, 1000, method)
        assert ("+method=qlora" in str(caught.value)) is suggested, method


def test_an_unreachable_hub_is_asked_once_then_every_library_works_offline(monkeypatch,
                                                                             caplog):
    import huggingface_hub.constants

    from dtune import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(hub, "_ANSWER", [])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    caplog.set_level(logging.WARNING, logger="dtune")
    assert hub.hub_reachable() is False and hub.hub_reachable() is False
    assert caplog.text.count("does not answer from this machine") == 1
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE


# --- 5. the submitit SLURM launcher without SLURM --------------------------------------------

def test_the_submitit_launcher_without_sbatch_gets_one_paragraph(tmp_path):
    result = run_dtune("-m", *SMALL, "hydra/launcher=submitit_slurm", "train.lr=1e-3,2e-3",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}", env={"PATH": str(tmp_path)})
    assert result.returncode != 0
    message = one_line(result.stderr)
    assert "hydra/launcher=submitit_slurm submits with `sbatch`, which is not on PATH" in message
    assert "Traceback" not in result.stderr


# --- 6. resuming a finished run changes nothing ----------------------------------------------

def test_resuming_a_finished_run_trains_nothing_and_rewrites_nothing(tmp_path, caplog):
    common = [*SMALL, "train.max_steps=2", "train.save_every=1"]
    first = run_in(tmp_path, *common)

    def digest(name):
        return hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()

    before = {name: digest(name) for name in ("summary.json", "metrics.jsonl",
                                              "final/adapter_model.safetensors")}
    caplog.set_level(logging.WARNING, logger="dtune")
    again = run_in(tmp_path, *common, "train.resume=true")
    assert {name: digest(name) for name in before} == before
    assert again.summary == first.summary
    assert "finished at step 2" in caplog.text and "nothing to train" in caplog.text


# --- 9. dtune report over runs that are no sweep ----------------------------------------------

def test_report_counts_as_swept_only_what_the_runs_command_lines_set():
    from dtune.report import Run, mark_swept

    def run(label, overrides, **config):
        base = {"model.name": "tiny-llama", "model.random_init.hidden_size": 64,
                "train.lr": 1e-3, "data.path": "builtin"}
        return Run(label, None, {**base, **config}, overrides, [], None)

    unrelated = [run("a", ["model=tiny-llama", "train.lr=1e-3"]),
                 run("b", ["model=other", "train.lr=3e-3"], **{
                     "model.name": "other", "model.random_init.hidden_size": 128,
                     "train.lr": 3e-3, "data.path": "x.jsonl"})]
    # data.path differs too, but neither command line set it: not what was varied
    assert mark_swept(unrelated) == ["model.name", "model.random_init.hidden_size", "train.lr"]
    unrecorded = [run("c", [], **{"train.lr": 1.0}), run("d", [])]
    assert mark_swept(unrecorded) == ["train.lr"]


def test_python_m_dtune_runs_the_tools_as_the_dtune_command_does(tmp_path):
    for args in (["eval", str(tmp_path)], ["export", str(tmp_path), "--gguf"]):
        by_module, by_command = run_dtune(*args), run_dtune(*args, module=False)
        assert by_module.returncode == by_command.returncode != 0
        assert one_line(by_module.stderr) == one_line(by_command.stderr)
        assert "is not a dtune run directory" in one_line(by_module.stderr)
