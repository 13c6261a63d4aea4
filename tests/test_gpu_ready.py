"""GPU-correct by construction, proven with what a CPU can prove: fake CUDA tensors raise on
mixed devices, spies on the model's inputs, and the dtype of what is held."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, compose, one_line, run_dtune, train
from dtune.errors import DtuneError

# --- every tensor the model sees is on the engine's device ---------------------------------

FAKE_CUDA_LOSS = textwrap.dedent("""
    import sys, torch
    from torch._subclasses.fake_tensor import FakeTensorMode, FakeTensorDeviceMismatchError
    from transformers import AutoModelForCausalLM
    from dtune.config import RandomInitConfig
    from dtune.data.batching import BatchStream
    from dtune.data.formatting import Example
    from dtune.distributed import Ranks
    from dtune.engines.torch_ddp import TorchEngine
    from dtune.loss import summed_token_loss
    from dtune.models import random_model_config
    from dtune.precision import Precision

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(random_model_config(RandomInitConfig()),
                                                 attn_implementation="eager")
    model.requires_grad_(False)
    cuda = torch.device("cuda", 0)
    engine = TorchEngine(model, model, cuda, None, None, Precision("fp32", "cuda"), Ranks(), 1.0)
    examples = [Example([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]), Example([6, 7, 8], [-100, 7, 8])]
    (batch,) = BatchStream(examples, 2, 0, 0, pack_len=int(sys.argv[2])).next_window(1)
    seen = []
    model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: seen.append(str(args[0].device)))
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device=cuda)
        try:
            with torch.no_grad():  # the training step's and the held-out loss's one call
                placed = batch if sys.argv[1] == "host" else engine.to_device(batch)
                summed_token_loss(engine.model, placed, int(sys.argv[3]))
        except FakeTensorDeviceMismatchError as error:
            print("MISMATCH", error)
        except RuntimeError as error:  # a CPU build cannot index fake CUDA tensors
            print("STOPPED", str(error)[:80])
    print("EMBEDDING SAW", seen)
""")


def fake_cuda_loss(batch_from: str, packing: int, chunk: int) -> str:
    done = subprocess.run([sys.executable, "-c", FAKE_CUDA_LOSS, batch_from, str(packing),
                           str(chunk)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "EMBEDDING SAW" in done.stdout, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("packing, chunk", [(0, 0), (32, 0), (0, 1024)])
def test_the_device_helper_puts_collated_batches_where_a_fake_gpu_model_is(packing, chunk):
    """The model on a fake cuda:0, a batch from dtune's own collate path: through the
    engine's device helper it reaches the model on cuda:0. On a CPU build a fake CUDA forward
    then stops at the first indexing op; the host batch itself (what the loss was handed
    before) stops at once, on a device mismatch."""
    through_engine = fake_cuda_loss("engine", packing, chunk)
    assert "MISMATCH" not in through_engine
    assert "EMBEDDING SAW ['cuda:0']" in through_engine
    assert "MISMATCH" in fake_cuda_loss("host", packing, chunk)


class DeviceSpy:
    """Marks every tensor the device helper returns, and checks the model's inputs are those."""

    def __init__(self, monkeypatch):
        import dtune.engines.torch_ddp as torch_ddp
        import dtune.evaluate as evaluate
        from dtune.engines.base import move_batch

        self.placed, self.calls, self.strays = set(), 0, []

        def spied(batch, device):
            moved = move_batch(batch, device)
            self.placed.update(id(v) for v in moved.values() if torch.is_tensor(v))
            return moved

        monkeypatch.setattr(torch_ddp, "move_batch", spied)
        monkeypatch.setattr(evaluate, "move_batch", spied)

    def check(self, kwargs: dict, where: str) -> None:
        self.calls += 1
        self.strays += [f"{where}: {k}" for k, v in kwargs.items()
                        if torch.is_tensor(v) and id(v) not in self.placed]

    def watch(self, model) -> None:
        """Hooks on the forward dtune calls and on generate (whose own inner forwards take
        the tensors transformers makes next to the inputs)."""
        generate = model.generate
        inner = {"active": False}

        def pre_forward(module, args, kwargs):
            if not inner["active"]:
                self.check(kwargs, "forward")

        def spied_generate(**kwargs):
            self.check(kwargs, "generate")
            inner["active"] = True
            try:
                return generate(**kwargs)
            finally:
                inner["active"] = False

        model.register_forward_pre_hook(pre_forward, with_kwargs=True)
        model.generate = spied_generate


def test_the_training_step_held_out_loss_and_generation_take_placed_tensors(tmp_path,
                                                                            monkeypatch):
    import dtune.train as train_module

    spy = DeviceSpy(monkeypatch)
    real_build = train_module.build_engine

    def build_and_watch(*args):
        engine = real_build(*args)
        spy.watch(engine.module)
        return engine

    monkeypatch.setattr(train_module, "build_engine", build_and_watch)
    train(tmp_path, *TINY, "+method=lora", "train.max_steps=2", "train.eval_every=1",
          "eval.exact_match_samples=2", "data.packing=true")
    assert spy.calls > 6 and not spy.strays, spy.strays  # steps, evals, generation


def test_dtune_eval_and_generate_give_the_model_placed_tensors(tiny_lora_run, monkeypatch,
                                                               capsys):
    from dtune import cli
    from dtune.evaluate import Inference

    spy = DeviceSpy(monkeypatch)
    real_place = Inference.place

    def place_and_watch(model):
        spy.watch(model)
        return real_place(model)

    monkeypatch.setattr(Inference, "place", staticmethod(place_and_watch))
    cli.main(["eval", str(tiny_lora_run), "--samples", "2"])
    cli.main(["generate", str(tiny_lora_run), "--prompt", "What is 1 + 2?",
              "--max-new-tokens", "4"])
    assert spy.calls >= 3 and not spy.strays, spy.strays


# --- the dtype of what is held -------------------------------------------------------------

@pytest.mark.parametrize("layout", [[], ["parallelism=zero2", "parallelism.nproc_per_node=1"]],
                         ids=["one-process", "zero2"])
def test_under_bf16_a_lora_base_is_held_in_bf16_and_its_adapters_in_fp32(tmp_path, layout):
    from dtune.plan import plan

    overrides = [*TINY, "+method=lora", "precision=bf16", "train.max_steps=1",
                 "eval.exact_match_samples=0", *layout]
    result = train(tmp_path, *overrides)
    frozen = [p for p in result.model.parameters() if not p.requires_grad]
    trained = [p for p in result.model.parameters() if p.requires_grad]
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
    # one process keeps fp32 master weights for the adapters; DeepSpeed keeps them in its
    # optimizer and the module in bf16
    assert {p.dtype for p in trained} == {torch.float32 if not layout else torch.bfloat16}
    held = sum(p.numel() * p.element_size() for p in result.model.parameters())
    assert result.summary["parameter_bytes"] == held
    assert result.summary["frozen_parameter_bytes"] == sum(
        p.numel() * p.element_size() for p in frozen) == 2 * sum(p.numel() for p in frozen)
    if not layout:  # the planner counts what is held
        cfg = compose(*overrides)
        single = plan(cfg, 1, on_gpu=True)[0]
        assert single.parallelism == "single"
        assert abs(single.weights - held) / held < 0.02, (single.weights, held)


def test_qlora_computes_in_the_precision_and_int8_lora_refuses_a_compute_dtype():
    from dtune.compose import compose_config
    from dtune.settle import Machine, settle

    composed = compose_config([*TINY, "+method=qlora", "precision=bf16"])
    assert composed.method.compute_dtype == "auto"  # until it settles
    on_a_gpu = Machine(1, 80 * 1024 ** 3, True, 1, "a GPU")
    assert settle(composed, on_a_gpu).method.compute_dtype == "bf16"
    with pytest.raises(DtuneError, match="method.compute_dtype='bf16' has no effect"):
        compose(*TINY, "+method=lora_int8", "method.compute_dtype=bf16")
    with pytest.raises(DtuneError, match="method.compute_dtype=fp32"):
        compose(*TINY, "+method=qlora", "precision=bf16", "method.compute_dtype=fp32")


def test_fp16_under_zero_on_a_cpu_is_refused_before_anything_loads(tmp_path):
    result = run_dtune(*TINY, "+method=full", "precision=fp16", "parallelism=zero2",
                       "parallelism.nproc_per_node=1", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "precision=fp16 with parallelism=zero2 needs a GPU" in one_line(result.stderr)


def test_on_a_gpu_fp32_matmuls_may_use_tf32():
    from dtune.engines.base import allow_tf32

    before = torch.backends.cuda.matmul.allow_tf32
    try:
        allow_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        allow_tf32(before)


def test_deepspeed_keeps_16_bit_gradients_in_fp32_and_pins_offloaded_memory_on_gpus():
    from dtune.engines.deepspeed_zero import deepspeed_config

    bf16 = deepspeed_config(compose(*TINY, "+method=full", "precision=bf16",
                                    "parallelism=zero3_offload"), 2)
    assert bf16["bf16"]["enabled"] and bf16["data_types"]["grad_accum_dtype"] == "fp32"
    zero = bf16["zero_optimization"]
    assert zero["stage3_gather_16bit_weights_on_model_save"]
    pinned = torch.cuda.is_available()
    assert zero["offload_optimizer"]["pin_memory"] is pinned is zero["offload_param"][
        "pin_memory"]


def test_optimizer_state_loads_to_the_cpu_first(tmp_path, monkeypatch):
    """On several GPUs, state saved from rank 0's GPU would otherwise land on GPU 0 everywhere."""
    train(tmp_path, *TINY, "+method=full", "train.max_steps=2", "train.save_every=1",
          "eval.exact_match_samples=0")
    real_load, seen = torch.load, []

    def spy(path, *args, **kwargs):
        seen.append((Path(path).name, kwargs.get("map_location"), kwargs.get("weights_only")))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    train(tmp_path, *TINY, "+method=full", "train.max_steps=3", "train.resume=true",
          "eval.exact_match_samples=0")
    assert ("optimizer.pt", "cpu", True) in seen and ("scheduler.pt", "cpu", True) in seen


# --- attention kernels and packing ---------------------------------------------------------

@pytest.mark.parametrize("kernel", ["eager", "sdpa", "flex_attention"])
def test_packed_examples_keep_their_own_losses_under_each_attention_kernel(kernel):
    from dtune.data.batching import collate, collate_packed
    from dtune.data.builtin import generate
    from dtune.data.formatting import tokenize
    from dtune.loss import summed_token_loss
    from dtune.models import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(
        compose(*TINY, f"model.attn_implementation={kernel}").model)
    assert model.config._attn_implementation == kernel
    records, _ = generate(["add", "reverse_words", "extract_json"], 6, 0, seed=3)
    examples = [tokenize(r, "chat", tokenizer, 256, False) for r in records]
    pad = tokenizer.pad_token_id
    model.eval()
    with torch.no_grad():
        alone = sum(float(summed_token_loss(model, collate([e], pad))) for e in examples)
        for one_row in (False, True):
            packed = collate_packed([examples[:3], examples[3:]], pad, one_row=one_row)
            assert packed["input_ids"].shape[0] == (1 if one_row else 2)
            together = float(summed_token_loss(model, packed))
            assert together == pytest.approx(alone, rel=1e-5), (kernel, one_row)


def test_flash_attention_without_its_package_or_a_gpu_is_refused():
    from dtune.models import load_model_and_tokenizer

    with pytest.raises(DtuneError, match="flash_attention_2 needs a CUDA GPU and the flash-attn"):
        load_model_and_tokenizer(compose(*TINY,
                                         "model.attn_implementation=flash_attention_2").model)


# --- planning, launching, checking ---------------------------------------------------------

def test_the_gpu_plan_reserves_the_runtime_and_plans_zero3_by_its_loading():
    from dtune.plan import GIB, choose, model_shape, plan

    cfg = compose(*TINY, "+method=full", "precision=bf16")
    on_gpu = {e.parallelism: e for e in plan(cfg, 4, on_gpu=True, shape=model_shape(cfg))}
    assert all(e.runtime >= 2 * GIB for e in on_gpu.values())  # CUDA context, NCCL, slack
    zero3 = on_gpu["zero3"]
    # loading gathers one module beside the shard; training gathers about two
    assert zero3.load_peak > zero3.weights and zero3.gathered > 0
    assert zero3.total == max(zero3.training, zero3.load_peak + zero3.runtime)
    with pytest.raises(DtuneError, match="no option fits"):
        choose(list(on_gpu.values()), int(1.5 * GIB))


def test_a_gpu_partition_asked_for_no_gpu_is_warned_about():
    from dtune.launchers.slurm import gpu_warning

    message = gpu_warning("gpu", {"gpu:h100:8"}, gpus_per_node=0)
    assert "launcher.gpus_per_node=0" in message and "train on the CPU" in message
    assert gpu_warning("gpu", {"gpu:h100:8"}, gpus_per_node=8) is None
    assert gpu_warning("debug", {"(null)"}, gpus_per_node=0) is None


def test_parity_in_bf16_and_fp16_across_layouts(tmp_path):
    """dtune check in 16-bit precisions: DDP against one process, ZeRO-2/3 against DDP,
    each within its precision's stated tolerance (dtune/parity.py's TOLERANCES)."""
    from dtune.parity import TOLERANCES, run_check

    bf16 = run_check(tmp_path, steps=20, precision="bf16",
                     only=["ddp 2 ranks", "zero2 2 ranks", "zero3 2 ranks"])
    fp16 = run_check(tmp_path, steps=20, precision="fp16", only=["ddp 2 ranks"])
    assert len(bf16) == 3 and len(fp16) == 1
    for result in bf16 + fp16:
        assert result.passed, (result.name, result.max_abs_diff, result.tolerance)
    assert {r.tolerance for r in bf16} == {TOLERANCES["bf16"]["ddp"], TOLERANCES["bf16"]["zero"]}


# --- the GPU check, rehearsed ---------------------------------------------------------------

def run_gpu_check(tmp_path, *args):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-dry-run", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def test_the_gpu_check_passes_its_cpu_dry_run(tmp_path):
    """Both device calls as the device runs them, tiny, on the CPU; where a CPU cannot run a
    step (DeepSpeed fp16, flash-attention), dtune's clear refusal is what passes."""
    for call in ("1", "2"):
        done = run_gpu_check(tmp_path, "--call", call)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    results = [json.loads(line) for call in (1, 2)
               for line in (out / f"call{call}.jsonl").read_text().splitlines()]
    steps = {r["step"] for r in results}
    for name in ("lora-bf16", "qlora-bf16", "lora-int8", "dora-bf16", "prompt-tuning-bf16",
                 "full-fp16", "full-fp16-zero2", "full-bf16-zero2", "full-bf16-zero3",
                 "full-bf16-zero2-offload", "full-bf16-fsdp2", "lora-bf16-fsdp2-compile",
                 "qlora-bf16-fsdp2", "full-bf16-long-context", "lora-bf16-packed-flash-attn",
                 "lora-bf16-resume",
                 "eval", "generate", "merge", "matmul-peak", "big-full-bf16", "big-lora-bf16"):
        assert name in steps, name
    assert not any(r["problems"] for r in results)
    assert {r["step"] for r in results if r.get("refused")} == {
        "full-fp16-zero2", "lora-bf16-packed-flash-attn", "qlora-bf16-fsdp2"}
    assert "| big-full-bf16 | ok |" in (out / "call2.md").read_text()


def test_a_broken_step_makes_the_gpu_check_fail_loudly_naming_it(tmp_path, monkeypatch):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out",
                           str(tmp_path), "--cpu-dry-run", "--break-step", "dora-bf16",
                           "--only", "dora-bf16", "prompt-tuning-bf16"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode != 0
    assert "1 step(s) failed: dora-bf16" in done.stderr
    assert "== prompt-tuning-bf16: ok" in done.stdout


def test_zero3_loads_each_rank_a_shard_of_the_weights(tmp_path):
    """Partitioned as they load (HfDeepSpeedConfig held for the run): no rank ever holds the
    whole model, which on GPUs would first land whole on one device."""
    import re

    result = run_dtune(*TINY, "+method=full", "parallelism=zero3",
                       "parallelism.nproc_per_node=2", "train.max_steps=1",
                       "eval.exact_match_samples=0", f"hydra.run.dir={tmp_path}",
                       env={"GLOO_SOCKET_IFNAME": "lo"})
    assert result.returncode == 0, result.stderr[-3000:]
    held, total = re.search(r"Loaded partitioned: rank 0 holds ([\d,]+) of the ([\d,]+)",
                            result.stdout + result.stderr).groups()
    held, total = int(held.replace(",", "")), int(total.replace(",", ""))
    assert total == json.loads((tmp_path / "summary.json").read_text())["total_params"]
    assert 0.45 * total <= held <= 0.55 * total


# --- GPU-only faults found by reading (issue 22) --------------------------------------------

def test_the_chunked_losss_weight_gradient_does_not_overflow_under_fp16_autocast():
    """Its gradients are made inside the forward, where fp16's 65,504 caps a sum over a chunk
    of tokens whatever the loss scale: the weight's gradient is summed in fp32."""
    from dtune.loss import chunked_lm_loss

    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(1024, 64, generator=generator) * 4 + 80).requires_grad_()
    weight = (torch.randn(512, 64, generator=generator) * 0.02).requires_grad_()
    labels = torch.randint(0, 512, (1024,), generator=generator)
    labels[:1000] = 0  # most tokens on one id: its row of the gradient sums them all
    with torch.autocast("cpu", dtype=torch.float16):
        chunked_lm_loss(hidden, weight, labels, 1024).backward()
    assert weight.grad.isfinite().all() and hidden.grad.isfinite().all()
    reference_hidden = hidden.detach().clone().requires_grad_()
    reference_weight = weight.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(reference_hidden @ reference_weight.t(), labels,
                                      reduction="sum").backward()
    assert weight.grad.abs().max() > 65504  # what fp16 could not have held
    torch.testing.assert_close(weight.grad, reference_weight.grad, rtol=2e-2, atol=1.0)


@pytest.mark.parametrize("visible, local_rank, expected", [(8, 3, 3), (1, 3, 0), (2, 3, 1)])
def test_a_process_takes_a_gpu_it_can_see(monkeypatch, visible, local_rank, expected):
    """SLURM's --gpus-per-task=1 shows each process one GPU, as cuda:0."""
    from dtune.distributed import Ranks
    from dtune.engines import base

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(base, "allow_tf32", lambda enabled: None)
    device = base.process_device(Ranks(rank=local_rank, world_size=8, local_rank=local_rank))
    assert device == torch.device("cuda", expected)


@pytest.mark.parametrize("overrides, placed, dtype", [
    (["+method=full"], True, torch.float32), (["precision=bf16"], True, torch.bfloat16),
    (["+method=full", "parallelism=zero2"], True, torch.float32),
    (["+method=full", "parallelism=zero3"], False, torch.float32)])
def test_ranks_load_the_base_straight_onto_their_gpu_in_its_storage_dtype(
        monkeypatch, overrides, placed, dtype):
    """Not through a whole copy in host memory per rank; ZeRO-3 partitions instead."""
    from dtune.distributed import Ranks
    from dtune.engines import base
    from dtune.train import base_load_options

    cfg = compose(*TINY, *overrides)  # settled here, before the GPUs are faked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(base, "allow_tf32", lambda enabled: None)
    options = base_load_options(cfg, Ranks(rank=2, world_size=4, local_rank=2))
    assert options["dtype"] == dtype
    assert options.get("device_map") == ({"": 2} if placed else None)


def test_deepspeed_kernels_build_under_dtunes_lock_on_a_gpu_machine_too(monkeypatch, tmp_path):
    """CPU Adam (offload) compiles on GPU machines as well: a build killed there must not leave
    every later run waiting on torch's bare lock file."""
    from dtune import deepspeed_ops

    assert [b.name for b in deepspeed_ops._builders(offload=True, on_gpu=True)] == ["cpu_adam"]
    assert deepspeed_ops._builders(offload=False, on_gpu=True) == []
    loaded = []

    class Builder:
        name = "cpu_adam"

        def load(self, verbose):
            loaded.append(not (tmp_path / "cpu_adam" / "lock").exists())

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(deepspeed_ops, "_builders", lambda offload, on_gpu: [Builder()])
    monkeypatch.setattr(deepspeed_ops, "extensions_folder", lambda: (tmp_path, True))
    (tmp_path / "cpu_adam").mkdir()
    (tmp_path / "cpu_adam" / "lock").touch()  # left by a build that was killed
    deepspeed_ops.load_deepspeed_ops(offload=True)
    assert loaded == [True]


def test_adamw_is_fused_on_a_gpu_and_as_recorded_on_the_cpu():
    from dtune.engines.base import adamw

    cfg = compose(*TINY, "+method=full")
    params = [torch.nn.Parameter(torch.ones(4))]
    assert adamw(cfg, [{"params": params}], torch.device("cuda", 0)).defaults["fused"]
    assert not adamw(cfg, [{"params": params}], torch.device("cpu")).defaults["fused"]


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts what makes the host wait on a GPU: nonzero, and indexing with a boolean mask."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.nonzero.default or (
                func is torch.ops.aten.index.Tensor
                and any(t is not None and t.dtype == torch.bool for t in args[1])):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_losses_index_labels_by_positions_found_on_the_host():
    from dtune.data.batching import collate
    from dtune.data.formatting import Example
    from dtune.loss import sequence_logps, summed_token_loss
    from dtune.models import load_model_and_tokenizer

    model, _, _ = load_model_and_tokenizer(compose(*TINY).model)
    examples = [Example([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9]), Example([5, 6, 7], [-100, 6, 7])]
    batch = collate(examples, 0)  # the host work happens here
    with OpCounter() as counter:
        chunked = summed_token_loss(model, batch, chunk_size=2)
        logps = sequence_logps(model, batch, response_head=True)
    assert counter.syncs == []
    plain = summed_token_loss(model, batch)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logps.sum(), -plain, rtol=1e-5, atol=1e-5)


def test_a_step_reduces_its_scalars_in_one_collective_before_and_one_after(tmp_path, monkeypatch):
    """The window's counts and the stop flag in one all-reduce, the loss in another: not one
    collective (and one host read) per number."""
    import torch.distributed as dist

    import dtune.train as train_module

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    calls, inside = [], []
    real_all_reduce, real_loop = dist.all_reduce, train_module.train_loop

    def counted(tensor, *args, **kwargs):
        if inside:
            calls.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    def loop(*args):
        inside.append(True)
        try:
            return real_loop(*args)
        finally:
            inside.clear()

    monkeypatch.setattr(dist, "all_reduce", counted)
    monkeypatch.setattr(train_module, "train_loop", loop)
    try:
        result = train(tmp_path / "run", *TINY, "+method=full", "train.max_steps=3",
                       "eval.exact_match_samples=0")
    finally:
        dist.destroy_process_group()
    assert result.summary["steps"] == 3
    assert calls == [4, 1] * 3  # per step: counts and stop flag; the loss


def test_workers_share_the_cores_the_launcher_owns(monkeypatch):
    """Not one thread each (torchrun's default): CPU Adam in an offload run steps on the
    host, with the threads of its worker."""
    from dtune import launch

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert launch.threads_per_worker(8) == 2 and launch.threads_per_worker(32) == 1
