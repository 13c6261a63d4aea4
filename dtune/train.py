"""The fine-tuning recipe: config -> model + data -> engine -> loop -> checkpoints, metrics.

Read it top to bottom: `run` is the whole recipe, and each helper below it does one step.
The same loop runs one process, DDP or DeepSpeed ZeRO; the engine hides which.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dtune.checkpoint import load_checkpoint, save_checkpoint, valid_checkpoints
from dtune.config import Config, loss_chunk_size
from dtune.data.batching import BatchStream, loss_token_count
from dtune.data.loading import load_splits
from dtune.data.prepare import prepare_data
from dtune.distributed import (Ranks, all_reduce_sum, barrier, die_with_parent, gather,
                               init_process_group, launched_ranks)
from dtune.engine import build_engine
from dtune.errors import DtuneError
from dtune.evaluate import eval_loss, exact_match
from dtune.logs import quiet_libraries
from dtune.loss import has_plain_lm_head, summed_token_loss
from dtune.methods import apply_method, count_parameters, is_adapter, load_options
from dtune.metrics import (MetricsLog, TrainingPeakMemory, peak_memory_bytes,
                           release_free_heap)
from dtune.models import load_model_and_tokenizer
from dtune.progress import Progress, summary_table
from dtune.signals import StopFlag, slurm_restarted, stop_after_checkpoint
from dtune.tracking import create_tracker

log = logging.getLogger("dtune")
GIB = 1024**3


@dataclass
class RunResult:
    summary: dict
    model: torch.nn.Module  # the trained model, as `final/` holds it
    tokenizer: object


def run(cfg: Config, run_dir: Path) -> RunResult:
    """Fine-tune as `cfg` says, writing everything into `run_dir`."""
    started = time.perf_counter()
    quiet_libraries()
    ranks = launched_ranks(cfg.parallelism) or Ranks()
    if os.environ.get("DTUNE_DIE_WITH_PARENT") == "1":  # a worker of dtune's own launch
        die_with_parent()
    init_process_group(cfg.parallelism, ranks)
    if not ranks.is_main:
        log.setLevel(logging.WARNING)  # rank 0 alone reports
    run_dir = Path(run_dir)
    if ranks.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)

    # Records first: a bad row is reported before minutes go into loading the model.
    train_records, eval_records = load_splits(cfg.data)
    model, tokenizer, source = load_model_and_tokenizer(cfg.model, load_options(cfg.method))
    check_context_length(cfg, model)
    log.info("Model %s from %s", cfg.model.name_or_path, source)
    train_examples, eval_examples = prepare_data(cfg, tokenizer, ranks, train_records,
                                                 eval_records)

    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = apply_method(model, cfg.method, tokenizer)
    trainable, total = count_parameters(model)
    stream = BatchStream(train_examples, cfg.train.micro_batch_size, cfg.train.seed,
                         tokenizer.pad_token_id, ranks.rank, ranks.world_size,
                         pack_len=cfg.data.max_seq_len if cfg.data.packing else 0)
    total_steps = planned_steps(cfg, stream)
    engine = build_engine(cfg, model, ranks, total_steps)
    chunk_size = loss_chunk_size(cfg.train, cfg.parallelism.zero_stage)
    if cfg.train.loss_chunk_size is None and not has_plain_lm_head(engine.model):
        chunk_size = 0  # the default falls back quietly; an explicit size is an error there
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * ranks.world_size
    log.info(
        "Method %s, %s on %d process(es): %s trainable of %s parameters (%.2f%%); %d training "
        "and %d eval examples; %d steps of %d sequences", cfg.method.name,
        cfg.parallelism.name, ranks.world_size, f"{trainable:,}", f"{total:,}",
        100 * trainable / total, len(train_examples), len(eval_records), total_steps,
        global_batch,
    )

    state = {"step": 0, "trained_tokens": 0, "loss_tokens": 0, "train_seconds": 0.0,
             "skipped_steps": 0, "nonfinite_steps": 0, "exact_match_before": None,
             "data": stream.state_dict(),
             "identity": {"model": cfg.model.name_or_path, "method": cfg.method.name}}
    resumed_from = None
    if cfg.train.resume or slurm_restarted():  # a requeued SLURM job always resumes
        checkpoints = valid_checkpoints(run_dir)
        if checkpoints:
            resumed_from = checkpoints[0]
            state = load_checkpoint(resumed_from, engine, state["identity"])
            stream.load_state_dict(state["data"])
            log.info("Resumed from %s (step %d)", resumed_from, state["step"])
        else:
            log.info("train.resume=true but %s holds no complete checkpoint; starting fresh",
                     run_dir / "checkpoints")
    metrics = MetricsLog(run_dir / "metrics.jsonl",
                         resume_step=state["step"] if resumed_from else None) \
        if ranks.is_main else None
    tracker = create_tracker(cfg, run_dir, resumed=resumed_from is not None,
                             is_main_process=ranks.is_main)

    def evaluate(step: int, with_generation: bool) -> dict:
        """Held-out loss (and exact match): on rank 0, or on every rank under ZeRO-3, whose
        forward passes need all ranks to gather the sharded weights."""
        record = {"step": step, "split": "eval"}
        if ranks.is_main or engine.eval_on_every_rank:
            record.update(run_eval(cfg, engine, tokenizer, eval_records, eval_examples,
                                   with_generation))
        barrier()
        if metrics is not None and len(record) > 2:
            metrics.write(record)
            tracker.log(record)
        return record

    if state["exact_match_before"] is None and state["step"] == 0:
        before = evaluate(0, with_generation=True)
        state["exact_match_before"] = before.get("exact_match")
        if "exact_match" in before:
            log.info("Held-out exact match before training: %.1f%%", 100 * before["exact_match"])

    progress = Progress(total_steps, state["step"], cfg.train.log_every) if ranks.is_main \
        else None
    engine.model.train()
    release_free_heap()
    loop_started = time.perf_counter()
    training_memory = TrainingPeakMemory().start()
    last = {}
    stop = StopFlag().install()
    while state["step"] < total_steps:
        step_started = time.perf_counter()
        window = stream.next_window(cfg.train.grad_accum_steps)
        lr = engine.lr()
        loss_value, window_loss_tokens = accumulate_gradients(engine, window, chunk_size)
        grad_norm, status = engine.step(loss_finite=math.isfinite(loss_value))
        state["skipped_steps"] += int(status == "overflow")
        state["nonfinite_steps"] = state.get("nonfinite_steps", 0) + int(status == "nonfinite")

        state["step"] += 1
        step = state["step"]
        if status == "nonfinite":
            handle_nonfinite(cfg, engine, run_dir, state, loss_value, grad_norm)
        step_seconds = time.perf_counter() - step_started
        real_tokens = int(all_reduce_sum(sum(int(b["attention_mask"].sum()) for b in window)))
        state["trained_tokens"] += real_tokens
        state["loss_tokens"] += window_loss_tokens
        state["train_seconds"] += step_seconds
        state["data"] = stream.state_dict()
        last = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": real_tokens / step_seconds,
                "trained_tokens": state["trained_tokens"], "loss_tokens": state["loss_tokens"],
                "epoch": stream.epoch, "step_time_s": step_seconds,
                "skipped_steps": state["skipped_steps"],
                "nonfinite_steps": state["nonfinite_steps"]}
        if engine.loss_scale is not None:
            last["loss_scale"] = engine.loss_scale
        if metrics is not None and (step % cfg.train.log_every == 0 or step == total_steps):
            metrics.write(last)
            tracker.log(last)
        if progress is not None:
            progress.update(step, loss_value, lr, last["tokens_per_s"],
                            peak_memory_bytes() / GIB)

        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
            result = evaluate(step, with_generation=False)
            if progress is not None and "eval_loss" in result:
                progress.write(f"step {step}: eval_loss {result['eval_loss']:.4f}")
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
            save_checkpoint(run_dir, step, engine, state, cfg.train.keep_checkpoints)
        if stop.requested() and step < total_steps:  # a signal: checkpoint, then requeue/exit
            if progress is not None:
                progress.close()
            if not (cfg.train.save_every and step % cfg.train.save_every == 0):
                save_checkpoint(run_dir, step, engine, state, cfg.train.keep_checkpoints)
            if metrics is not None:
                metrics.close()
            tracker.finish()
            stop_after_checkpoint(stop, run_dir, step, ranks.is_main)
    stop.finishing = True  # handlers stay until the end of run(): see StopFlag._handle
    if progress is not None:
        progress.close()
    loop_seconds = time.perf_counter() - loop_started
    train_peak_memory = training_memory.stop()

    final_eval = evaluate(state["step"], with_generation=True)
    save_checkpoint(run_dir, state["step"], engine, state, cfg.train.keep_checkpoints)
    engine.save_final(run_dir / "final", tokenizer)
    barrier()

    summary = {
        "model": cfg.model.name_or_path,
        "model_source": source,
        "method": cfg.method.name,
        "precision": cfg.precision.name,
        "parallelism": cfg.parallelism.name,
        "world_size": ranks.world_size,
        "final_artifact": "peft_adapter" if is_adapter(engine.module) else "full_model",
        "loss_scale": engine.loss_scale,
        "skipped_steps": state["skipped_steps"],
        "nonfinite_steps": state.get("nonfinite_steps", 0),
        "steps": state["step"],
        "global_batch_size": global_batch,
        "final_loss": last.get("loss"),
        "eval_loss": final_eval.get("eval_loss"),
        "exact_match_before": state["exact_match_before"],
        "exact_match_after": final_eval.get("exact_match"),
        "exact_match_after_by_task": {k.split("/", 1)[1]: v for k, v in final_eval.items()
                                      if k.startswith("exact_match/")},
        "trainable_params": trainable,
        "total_params": total,
        "trained_tokens": state["trained_tokens"],
        "loss_tokens": state["loss_tokens"],
        "tokens_per_s": state["trained_tokens"] / max(state["train_seconds"], 1e-9),
        "train_time_s": state["train_seconds"],
        "wall_time_s": time.perf_counter() - started,
        "loop_time_s": loop_seconds,
        "peak_memory_bytes": peak_memory_bytes(),
        "train_peak_memory_bytes": train_peak_memory,
        "peak_memory_bytes_per_rank": gather(peak_memory_bytes()),
        "train_peak_memory_bytes_per_rank": gather(train_peak_memory),
        "resumed_from": str(resumed_from) if resumed_from else None,
    }
    if ranks.is_main:
        metrics.close()
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        tracker.summary(summary)
        tracker.finish()
        print(summary_table(summary_rows(summary, run_dir), "dtune run summary"), flush=True)
    stop.restore()
    return RunResult(summary, engine.module, tokenizer)


def handle_nonfinite(cfg: Config, engine, run_dir: Path, state: dict, loss: float,
                     grad_norm: float) -> None:
    """A step whose loss or gradient is NaN/inf: skip it, or save and stop with the causes."""
    step = state["step"]
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    causes = ("Likely causes: a learning rate too high for this model and method (train.lr="
              f"{cfg.train.lr}); an fp16 overflow (try precision=bf16 or fp32); or a bad data "
              "row in this step's batch.")
    if engine.can_skip_nonfinite and cfg.train.on_nonfinite == "skip":
        log.warning("Step %d: non-finite %s; the update was skipped (train.on_nonfinite=skip; "
                    "%d such steps so far).", step, what, state["nonfinite_steps"])
        return
    if engine.can_skip_nonfinite:  # the weights are intact: keep them, past the bad batch
        save_checkpoint(run_dir, step, engine, state, cfg.train.keep_checkpoints)
        saved = (f"The weights before this step are saved in {run_dir}/checkpoints/step-{step}; "
                 "resume with train.resume=true once the cause is fixed.")
    else:
        saved = ("DeepSpeed had already applied this update, so nothing was saved; resume "
                 "from the last checkpoint with train.resume=true once the cause is fixed.")
    raise DtuneError(f"training stopped at step {step}: non-finite {what} "
                     f"(train.on_nonfinite={cfg.train.on_nonfinite}). {causes} {saved}")


def run_eval(cfg: Config, engine, tokenizer, eval_records, eval_examples,
             with_generation: bool) -> dict:
    result = {}
    model = engine.module
    if eval_examples:
        result["eval_loss"] = eval_loss(model, eval_examples, cfg.eval.batch_size,
                                        tokenizer.pad_token_id)
    if with_generation and cfg.eval.exact_match_samples:
        em = exact_match(model, tokenizer, eval_records, cfg.data.format,
                         cfg.data.system_prompt, cfg.eval.exact_match_samples,
                         cfg.eval.max_new_tokens, cfg.eval.batch_size,
                         synced_ranks=engine.eval_on_every_rank)
        if em is not None:
            result["exact_match"] = em["exact_match"]
            result.update({f"exact_match/{t}": v for t, v in em["by_task"].items()})
    return result


def accumulate_gradients(engine, window: list[dict], chunk_size: int = 0) -> tuple[float, int]:
    """Backpropagate a window of micro-batches, on every rank, as one batch: the loss is the
    mean over every loss-carrying token in the global window, not a mean of means."""
    window_tokens = int(all_reduce_sum(sum(loss_token_count(b) for b in window)))
    total = 0.0
    for index, batch in enumerate(window):
        with engine.forward_context(last_in_window=index == len(window) - 1):
            loss = summed_token_loss(engine.model, batch, chunk_size) / max(window_tokens, 1)
        engine.backward(loss)
        total += loss.item()
    return all_reduce_sum(total), window_tokens


def enable_gradient_checkpointing(model) -> None:
    """Keep only each layer's input in forward and recompute the rest in backward.

    Non-reentrant checkpointing needs no input that requires grad, so it works under frozen
    bases (LoRA, QLoRA) without `enable_input_require_grads`.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_context_length(cfg: Config, model) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and cfg.data.max_seq_len > limit:
        raise DtuneError(
            f"data.max_seq_len={cfg.data.max_seq_len} is longer than the context of "
            f"{cfg.model.name_or_path} ({limit} positions); set data.max_seq_len<={limit}."
        )


def planned_steps(cfg: Config, stream: BatchStream) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    per_step = cfg.train.grad_accum_steps * stream.world_size
    return max(stream.batches_per_epoch // per_step, 1) * cfg.train.epochs


def summary_rows(summary: dict, run_dir: Path) -> list[tuple[str, str]]:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def num(x, fmt="{:.4f}"):
        return "n/a" if x is None else fmt.format(x)

    return [
        ("model", summary["model"]),
        ("method / precision", f"{summary['method']} / {summary['precision']}"),
        ("parallelism", f"{summary['parallelism']} x {summary['world_size']} process(es)"),
        ("trainable params", f"{summary['trainable_params']:,} of {summary['total_params']:,}"),
        ("steps x global batch", f"{summary['steps']} x {summary['global_batch_size']}"),
        ("final train loss", num(summary["final_loss"])),
        ("eval loss", num(summary["eval_loss"])),
        ("exact match before", pct(summary["exact_match_before"])),
        ("exact match after", pct(summary["exact_match_after"])),
        ("tokens/s", num(summary["tokens_per_s"], "{:,.0f}")),
        ("peak memory", f"{summary['peak_memory_bytes'] / GIB:.2f} GiB"),
        ("wall time", f"{summary['wall_time_s']:.0f} s"),
        ("run dir", str(run_dir)),
    ]
