"""Where a training step's time goes: torch.profiler over dtune's own step on SmolLM2-135M.

    python bench/step_profile.py [--method lora] [--steps 3] [--out NAME] [dtune overrides...]

Builds the run exactly as `python -m dtune` does (same config, model, method, batches, engine)
and profiles `accumulate_gradients` + `engine.step`, the two calls the training loop makes per
step, after one warm-up step. Writes bench/results/profile-<method>.md: time per phase
(forward, loss, backward, optimizer) and the top operators by self CPU time.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dtune.settle import settled_config  # noqa: E402
from dtune.data.batching import BatchStream  # noqa: E402
from dtune.data.loading import load_splits  # noqa: E402
from dtune.data.prepare import prepare_data  # noqa: E402
from dtune.distributed import Ranks, init_process_group  # noqa: E402
from dtune.engines import build_engine, engine_spec  # noqa: E402
from dtune.methods import apply_method, load_options  # noqa: E402
from dtune.models import load_model_and_tokenizer  # noqa: E402
from dtune.train import (accumulate_gradients, enable_gradient_checkpointing,  # noqa: E402
                         window_counts)

RESULTS = ROOT / "bench" / "results"


def build(cfg):
    ranks = Ranks()
    if engine_spec(cfg.parallelism).group_for_one_process:  # DeepSpeed, even for one process
        init_process_group(cfg.parallelism, ranks)
    torch.manual_seed(cfg.train.seed)
    sources = load_splits(cfg.data)
    model, tokenizer, _ = load_model_and_tokenizer(cfg.model, load_options(cfg.method))
    examples = prepare_data(cfg, tokenizer, ranks, sources).train
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = apply_method(model, cfg.method, tokenizer)
    stream = BatchStream(examples, cfg.train.micro_batch_size, cfg.train.seed,
                         tokenizer.pad_token_id, 0, 1,
                         pack_len=cfg.data.max_seq_len if cfg.data.packing else 0)
    engine = build_engine(cfg, model, ranks, cfg.train.max_steps)
    engine.model.train()
    return engine, stream, cfg.settled.loss_chunk_size


def label_phases(model) -> None:
    """Name the forward (the decoder stack) and the loss (LM head + cross-entropy) in the trace:
    hooks on the decoder's first/last call mark where forward ends and the loss begins."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        return
    state = {}

    def start(*_):
        state["fwd"] = record_function("forward")
        state["fwd"].__enter__()

    def end(*_):
        state.pop("fwd").__exit__(None, None, None)

    decoder.register_forward_pre_hook(start)
    decoder.register_forward_hook(end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", help="file stem under bench/results/ (profile-METHOD)")
    parser.add_argument("--memory", action="store_true",
                        help="also rank operators by the memory they allocate")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = [f"+method={args.method}", "model=smollm2-135m", "data.max_seq_len=256",
                 "train.micro_batch_size=4", "data.packing=true",
                 f"train.max_steps={args.steps + 1}", *args.overrides]
    cfg = settled_config(overrides)
    engine, stream, chunk_size = build(cfg)
    label_phases(engine.module)

    backward = engine.backward

    def labelled_backward(loss):
        with record_function("backward"):
            backward(loss)

    engine.backward = labelled_backward

    def step():
        window = stream.next_window(cfg.train.grad_accum_steps)
        counts = window_counts(window)
        with record_function("forward+loss+backward"):
            loss = accumulate_gradients(engine, window, counts.loss_tokens, chunk_size)
        with record_function("optimizer"):
            engine.step(loss)
        return counts.real_tokens

    step()  # warm-up: allocator, kernels, lazy optimizer state
    started = time.perf_counter()
    tokens = 0
    with profile(activities=[ProfilerActivity.CPU], profile_memory=args.memory) as prof:
        for _ in range(args.steps):
            tokens += step()
    seconds = time.perf_counter() - started
    events = prof.key_averages()
    us = {e.key: e.cpu_time_total for e in events}
    phases = {
        "forward: decoder stack": us.get("forward", 0),
        "forward: LM head + loss": us.get("forward+loss+backward", 0) - us.get("forward", 0)
        - us.get("backward", 0),
        "backward": us.get("backward", 0),
        "optimizer step": us.get("optimizer", 0),
    }
    phases["other (batching, bookkeeping)"] = seconds * 1e6 - sum(phases.values())
    lines = [
        f"# Step profile: {args.method}",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"overrides: `{' '.join(overrides)}`.",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"{args.steps} profiled steps, {seconds / args.steps:.2f} s per step (profiler on), "
        f"{tokens / seconds:.0f} real tokens/s.",
        "",
        "| phase | seconds per step | share |",
        "|---|---|---|",
    ]
    for name, micros in phases.items():
        lines.append(f"| {name} | {micros / 1e6 / args.steps:.2f} | "
                     f"{100 * micros / (seconds * 1e6):.0f}% |")
    lines += ["", "Top operators by self CPU time:", "",
              "```", events.table(sort_by="self_cpu_time_total", row_limit=20), "```", ""]
    if args.memory:
        lines += ["Top operators by memory allocated (self, summed over the profiled steps):", "",
                  "```", events.table(sort_by="self_cpu_memory_usage", row_limit=15), "```",
                  ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.out or 'profile-' + args.method}.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
