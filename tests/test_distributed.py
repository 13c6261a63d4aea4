"""Parallelism on 2 CPU processes with gloo: parity, ZeRO artifacts, resume, multi-node."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY, one_line, run_dtune
from dtune.parity import COMPARISONS, run_check, step_losses
from dtune.distributed import Ranks, launched_ranks, slurm_hosts
from dtune.config import ParallelismConfig

LORA = [*TINY, "+method=lora", "train.lr=1e-2", "method.dropout=0", "eval.exact_match_samples=2"]


def train_cli(run_dir, *overrides, env=None):
    result = run_dtune(*overrides, f"hydra.run.dir={run_dir}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_parity_of_every_layout(tmp_path):
    """DDP = 1 process (1e-5); ZeRO 1/2/3 = DDP (1e-4); FSDP2 = DDP (1e-5) over 20 steps;
    accumulation x ranks."""
    # the sequence-parallel row: tests/test_sequence_parallel.py, over fewer steps
    results = run_check(tmp_path, steps=20, only=[c[1] for c in COMPARISONS
                                                  if c[2] != "sequence"])
    assert len(results) == 6
    for result in results:
        assert result.passed, (result.name, result.max_abs_diff)
    # read the runs back independently of dtune check's own comparison
    single = step_losses(tmp_path / "1_process_x_2_accum")
    ddp = step_losses(tmp_path / "ddp_2_ranks")
    zero3 = step_losses(tmp_path / "zero3_2_ranks")
    fsdp2 = step_losses(tmp_path / "fsdp2_2_ranks")
    assert len(single) == len(ddp) == len(zero3) == len(fsdp2) == 20
    assert single == pytest.approx(ddp, abs=1e-5)
    assert zero3 == pytest.approx(ddp, abs=1e-4)
    assert fsdp2 == pytest.approx(ddp, abs=1e-5)
    assert single[-1] < single[0]
    summary = json.loads((tmp_path / "ddp_2_ranks" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 8
    lines = (tmp_path / "ddp_2_ranks" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if '"loss"' in line]
    assert steps == list(range(1, 21))  # rank 0 alone writes metrics


def test_zero3_lora_saves_the_real_adapter(tmp_path):
    # the plain loss on both sides: ZeRO-3 cannot take the chunked one, the default elsewhere
    common = [*LORA, "train.max_steps=4", "train.micro_batch_size=2", "train.loss_chunk_size=0"]
    train_cli(tmp_path / "z3", *common, "parallelism=zero3", "parallelism.nproc_per_node=2")
    train_cli(tmp_path / "one", *common, "train.grad_accum_steps=2")
    zero3 = load_file(tmp_path / "z3" / "final" / "adapter_model.safetensors")
    single = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    assert zero3.keys() == single.keys() and len(zero3) == 2 * 7 * 2
    for name, tensor in single.items():
        assert zero3[name].shape == tensor.shape and tensor.numel() > 0, name
        torch.testing.assert_close(zero3[name], tensor, rtol=1e-3, atol=1e-5, msg=name)
    assert any(t.abs().sum() > 0 for n, t in zero3.items() if "lora_B" in n)  # it trained


@pytest.mark.parametrize("layout", ["zero3_offload", "zero2_offload"])
def test_offloaded_zero_trains_and_saves_a_loadable_model(tmp_path, layout):
    from transformers import AutoModelForCausalLM

    train_cli(tmp_path, *TINY, "+method=full", "train.max_steps=3", f"parallelism={layout}",
              "parallelism.nproc_per_node=2", "eval.exact_match_samples=0")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert sum(p.numel() for p in model.parameters()) > 100_000
    assert all(torch.isfinite(torch.tensor(step_losses(tmp_path))))


def test_qlora_trains_under_ddp(tmp_path):
    train_cli(tmp_path, *TINY, "+method=qlora", "train.max_steps=3", "parallelism=ddp",
              "parallelism.nproc_per_node=2", "eval.exact_match_samples=0")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_artifact"] == "peft_adapter"


def test_ddp_checkpoint_resumes_on_one_process_with_the_same_losses(tmp_path):
    common = [*LORA, "train.max_steps=6", "train.save_every=3", "train.micro_batch_size=2"]
    train_cli(tmp_path / "ddp", *common, "parallelism=ddp", "parallelism.nproc_per_node=2")
    # The same global batch on one process: 2 accumulation steps stand in for 2 ranks.
    cut = tmp_path / "cut"
    subprocess.run(["cp", "-r", str(tmp_path / "ddp"), str(cut)], check=True)
    subprocess.run(["rm", "-rf", str(cut / "checkpoints" / "step-6"), str(cut / "final")],
                   check=True)
    train_cli(cut, *common, "train.grad_accum_steps=2", "train.resume=true")
    assert step_losses(cut) == pytest.approx(step_losses(tmp_path / "ddp"), abs=1e-5)


def test_zero_checkpoint_refuses_another_world_size(tmp_path):
    common = [*TINY, "+method=full", "train.max_steps=2", "train.save_every=1",
              "eval.exact_match_samples=0"]
    train_cli(tmp_path, *common, "parallelism=zero2", "parallelism.nproc_per_node=2")
    result = run_dtune(*common, "train.max_steps=3", "parallelism=zero2",
                       "parallelism.nproc_per_node=1", "train.resume=true",
                       f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "processes (ZeRO shards its state by rank): 2 in the checkpoint, 1 now" in \
        one_line(result.stderr + result.stdout)


def test_two_nodes_on_localhost_match_one_node_with_two_processes(tmp_path):
    common = [*LORA, "train.max_steps=4", "parallelism=ddp", "parallelism.nproc_per_node=1",
              "parallelism.nnodes=2", "parallelism.master_addr=127.0.0.1",
              "parallelism.master_port=29731", f"hydra.run.dir={tmp_path / 'two-nodes'}"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    nodes = [subprocess.Popen([sys.executable, "-m", "dtune", *common,
                               f"parallelism.node_rank={rank}"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    train_cli(tmp_path / "one-node", *LORA, "train.max_steps=4", "parallelism=ddp",
              "parallelism.nproc_per_node=2")
    assert step_losses(tmp_path / "two-nodes") == pytest.approx(
        step_losses(tmp_path / "one-node"), abs=1e-6)


@pytest.fixture
def private_environ(monkeypatch):
    """launched_ranks() exports RANK, MASTER_ADDR...: keep them from leaking into other tests."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               and not k.startswith("SLURM_")}
    monkeypatch.setattr(os, "environ", environ)
    return environ


def test_slurm_variables_map_to_ranks_and_master(monkeypatch, private_environ):
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: dtune parses the list itself
    ranks = launched_ranks(ParallelismConfig(name="ddp", nproc_per_node=2))
    assert ranks == Ranks(rank=3, world_size=4, local_rank=1, node_rank=1)
    assert os.environ["MASTER_ADDR"] == "gpu07"
    assert os.environ["MASTER_PORT"] == str(20000 + 4242)
    assert os.environ["RANK"] == "3" and os.environ["WORLD_SIZE"] == "4"


def test_one_slurm_task_per_node_with_several_gpus_launches_its_workers(monkeypatch,
                                                                       private_environ):
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_NNODES", "2")
    assert launched_ranks(ParallelismConfig(name="ddp", nproc_per_node=4)) is None


def test_nodelist_expansion(monkeypatch, private_environ):
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node1,node2")
    assert slurm_hosts() == ["node1", "node2"]
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-03,10],cpu7")
    assert slurm_hosts() == ["gpu01", "gpu02", "gpu03", "gpu10", "cpu7"]


def test_more_processes_than_cores_is_refused():
    result = run_dtune(*TINY, "parallelism=ddp", f"parallelism.nproc_per_node={os.cpu_count() + 1}")
    assert result.returncode != 0
    assert "CPU cores" in one_line(result.stderr) and "Traceback" not in result.stderr


def test_quantized_methods_are_refused_under_zero():
    """tests/test_bad_inputs.py runs `python -m dtune` on the tiny model with these overrides
    ("quantized base under ZeRO") and checks a non-zero exit and the fragments below; the
    same run is not started here a second time."""
    import test_bad_inputs

    (case,) = [c for c in test_bad_inputs.CASES if c.overrides == ["+method=qlora",
                                                                   "parallelism=zero3"]]
    assert case.module and not case.files and "use parallelism=ddp" in case.expect


def test_zero3_checkpoint_resumes_with_the_same_losses(tmp_path):
    common = [*TINY, "+method=full", "train.lr=1e-3", "train.max_steps=4", "train.save_every=2",
              "eval.exact_match_samples=0", "parallelism=zero3", "parallelism.nproc_per_node=2"]
    train_cli(tmp_path / "whole", *common)
    cut = tmp_path / "cut"
    subprocess.run(["cp", "-r", str(tmp_path / "whole"), str(cut)], check=True)
    subprocess.run(["rm", "-rf", str(cut / "checkpoints" / "step-4"), str(cut / "final")],
                   check=True)
    train_cli(cut, *common, "train.resume=true")
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-2")
    assert step_losses(cut) == pytest.approx(step_losses(tmp_path / "whole"), abs=1e-6)


def test_zero_with_gradient_accumulation_matches_ddp_with_it(tmp_path):
    """ZeRO's window ends where dtune says (set_gradient_accumulation_boundary), so one step()
    per window gives DDP's update however many micro-batches the window has."""
    from dtune.parity import Layout, train_layout

    def layout(name):
        return Layout(f"{name} 2 ranks x 2 accum", [f"parallelism={name}",
                                                   "parallelism.nproc_per_node=2",
                                                   "train.micro_batch_size=2",
                                                   "train.grad_accum_steps=2"])

    ddp = train_layout(layout("ddp"), tmp_path, steps=6)
    zero2 = train_layout(layout("zero2"), tmp_path, steps=6)
    assert len(ddp) == len(zero2) == 6 and ddp[-1] < ddp[0]
    assert zero2 == pytest.approx(ddp, abs=1e-4)
