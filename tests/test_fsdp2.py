"""FSDP2 (parallelism=fsdp2) on CPU processes with gloo: the same losses as one process, a
checkpoint that resumes on another number of processes with the loss curve going on, the
trained adapter or model in final/ (and in a checkpoint, for dtune's tools), and
train.compile's losses equal to eager ones."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, run_dtune
from dtune.parity import step_losses

# A constant learning rate: a run of 2 steps resumed to 4 follows the 4-step run's schedule.
COMMON = [*TINY, "train.micro_batch_size=2", "train.lr_schedule=constant",
          "eval.exact_match_samples=0", "train.loss_chunk_size=0", "train.save_every=2"]
FULL = [*COMMON, "+method=full", "train.lr=1e-3"]
LORA = [*COMMON, "+method=lora", "train.lr=1e-2", "method.dropout=0"]
FSDP2 = ["parallelism=fsdp2"]


def train_cli(run_dir, *overrides):
    result = run_dtune(*overrides, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def resume_on(run_dir, processes: int, *overrides):
    """Train the run in `run_dir` on to step 4 with `processes` processes, the global batch
    kept (two accumulation steps stand in for a second rank)."""
    accum = 3 - processes
    train_cli(run_dir, *overrides, "train.max_steps=4", "train.resume=true",
              f"parallelism.nproc_per_node={processes}", f"train.grad_accum_steps={accum}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-2") and summary["world_size"] == processes


def test_fsdp2_trains_as_one_process_and_resumes_on_another_number_of_processes(tmp_path):
    """Full fine-tuning: 2 FSDP2 ranks, resumed on 1 process. LoRA: 1 FSDP2 process, resumed
    on 2 ranks. Each loss curve is one process's (plain torch engine, the same global batch)
    to 1e-5 relative in fp32, across the resume; final/ holds the same weights, and so does
    the last checkpoint, as dtune's tools read it."""
    for name, method, first in (("full", FULL, 2), ("lora", LORA, 1)):
        reference, sharded = tmp_path / f"{name}-one", tmp_path / f"{name}-fsdp2"
        train_cli(reference, *method, "train.max_steps=4", "train.grad_accum_steps=2")
        train_cli(sharded, *method, *FSDP2, "train.max_steps=2",
                  f"parallelism.nproc_per_node={first}", f"train.grad_accum_steps={3 - first}")
        assert sorted(p.name for p in (sharded / "checkpoints" / "step-2" / "dcp").iterdir()) \
            == [".metadata"] + [f"__{rank}_0.distcp" for rank in range(first)]
        resume_on(sharded, 3 - first, *method, *FSDP2)
        assert step_losses(sharded) == pytest.approx(step_losses(reference), rel=1e-5)
        assert step_losses(reference)[-1] < step_losses(reference)[0]
        weights = "adapter_model" if name == "lora" else "model"
        ours = load_file(sharded / "final" / f"{weights}.safetensors")
        theirs = load_file(reference / "final" / f"{weights}.safetensors")
        assert ours.keys() == theirs.keys() and ours
        for key, tensor in theirs.items():
            assert ours[key].shape == tensor.shape and tensor.numel() > 0, key
            torch.testing.assert_close(ours[key], tensor, rtol=1e-4, atol=1e-6, msg=key)
    adapter = load_file(tmp_path / "lora-fsdp2" / "final" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 7 * 2  # A and B of 7 layers in 2 blocks: the real adapter
    assert all(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n)  # it trained
    # dtune's tools read the step-4 checkpoint the 2 ranks wrote, whole, in one process
    from peft import get_peft_model_state_dict

    from dtune.load_run import load_final_model

    model, _, _ = load_final_model(tmp_path / "lora-fsdp2", checkpoint="step-4")
    read = get_peft_model_state_dict(model)
    assert read.keys() == adapter.keys()
    for key, tensor in adapter.items():
        torch.testing.assert_close(read[key], tensor, rtol=0, atol=0, msg=key)


def test_compile_gives_the_eager_losses(tmp_path):
    """train.compile=true (each decoder layer through torch.compile, here under FSDP2 in one
    process, 2 steps) gives the eager losses of the plain engine to 1e-5 relative (fp32;
    measured about 1e-7: other fusions, other roundings). Compiling takes most of a minute on
    2 cores, so one compiled run stands for every engine: they share compile_layers
    (bench/fsdp2.py measures the plain engine compiled too)."""
    quick = [*FULL, "train.max_steps=2", "train.save_final=false", "train.save_every=0"]
    train_cli(tmp_path / "eager", *quick)
    train_cli(tmp_path / "compiled", *quick, "train.compile=true", *FSDP2,
              "parallelism.nproc_per_node=1")
    eager = step_losses(tmp_path / "eager")
    assert len(eager) == 2
    assert step_losses(tmp_path / "compiled") == pytest.approx(eager, rel=1e-5)


def test_fsdp2_checkpoint_metadata_rebuilds_only_dcp_records(tmp_path):
    """DCP unpickles its metadata file with plain pickle; dtune's reader rebuilds nothing but
    DCP's own records, so a planted .metadata cannot run code on resume."""
    import os
    import pickle

    from dtune.engines.fsdp2 import SafeReader
    from dtune.errors import DtuneError

    folder = tmp_path / "dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(os.system))  # any callable would do
    with pytest.raises(DtuneError, match="could run code"):
        SafeReader(folder).read_metadata()
