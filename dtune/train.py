"""The fine-tuning recipe: config -> model + data -> loop -> checkpoints, metrics, summary.

Read it top to bottom: `run` is the whole recipe, and each helper below it does one step.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dtune.checkpoint import load_checkpoint, save_checkpoint, save_final, valid_checkpoints
from dtune.config import Config
from dtune.data.batching import BatchStream, loss_token_count
from dtune.data.formatting import IGNORE, tokenize
from dtune.data.loading import load_splits
from dtune.errors import DtuneError
from dtune.evaluate import eval_loss, exact_match
from dtune.logs import quiet_libraries
from dtune.loss import summed_token_loss
from dtune.methods import apply_method, count_parameters, is_adapter, load_options
from dtune.metrics import MetricsLog, TrainingPeakMemory, peak_memory_bytes
from dtune.models import load_model_and_tokenizer
from dtune.precision import Precision, setup_precision
from dtune.progress import Progress, summary_table
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
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)

    model, tokenizer, source = load_model_and_tokenizer(cfg.model, load_options(cfg.method))
    check_context_length(cfg, model)
    log.info("Model %s from %s", cfg.model.name_or_path, source)

    train_records, eval_records = load_splits(cfg.data)
    train_examples = tokenize_records(train_records, cfg, tokenizer, "training")
    eval_examples = tokenize_records(eval_records[: cfg.eval.max_loss_samples], cfg, tokenizer,
                                     "eval") if eval_records else []

    model = apply_method(model, cfg.method, tokenizer)
    trainable, total = count_parameters(model)
    precision = setup_precision(cfg.precision, model)
    optimizer = build_optimizer(model, cfg)
    stream = BatchStream(train_examples, cfg.train.micro_batch_size, cfg.train.seed,
                         tokenizer.pad_token_id)
    total_steps = planned_steps(cfg, stream)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    log.info(
        "Method %s: %s trainable of %s parameters (%.2f%%); %d training and %d eval examples; "
        "%d steps of %d sequences", cfg.method.name, f"{trainable:,}", f"{total:,}",
        100 * trainable / total, len(train_examples), len(eval_records), total_steps,
        cfg.train.micro_batch_size * cfg.train.grad_accum_steps,
    )

    state = {"step": 0, "trained_tokens": 0, "loss_tokens": 0, "train_seconds": 0.0,
             "skipped_steps": 0, "exact_match_before": None, "data": stream.state_dict()}
    resumed_from = None
    if cfg.train.resume:
        checkpoints = valid_checkpoints(run_dir)
        if checkpoints:
            resumed_from = checkpoints[0]
            state = load_checkpoint(resumed_from, model, optimizer, scheduler)
            stream.load_state_dict(state["data"])
            if precision.scaler is not None:
                precision.scaler.load_state_dict(state["loss_scaler"])
            log.info("Resumed from %s (step %d)", resumed_from, state["step"])
        else:
            log.info("train.resume=true but %s holds no complete checkpoint; starting fresh",
                     run_dir / "checkpoints")
    metrics = MetricsLog(run_dir / "metrics.jsonl",
                         resume_step=state["step"] if resumed_from else None)
    tracker = create_tracker(cfg, run_dir, resumed=resumed_from is not None)

    def evaluate(step: int, with_generation: bool) -> dict:
        record = {"step": step, "split": "eval"}
        if eval_examples:
            record["eval_loss"] = eval_loss(model, eval_examples, cfg.eval.batch_size,
                                            tokenizer.pad_token_id)
        if with_generation and cfg.eval.exact_match_samples:
            em = exact_match(model, tokenizer, eval_records, cfg.data.format,
                             cfg.data.system_prompt, cfg.eval.exact_match_samples,
                             cfg.eval.max_new_tokens, cfg.eval.batch_size)
            if em is not None:
                record["exact_match"] = em["exact_match"]
                record.update({f"exact_match/{t}": v for t, v in em["by_task"].items()})
        if len(record) > 2:
            metrics.write(record)
            tracker.log(record)
        return record

    if state["exact_match_before"] is None and state["step"] == 0:
        before = evaluate(0, with_generation=True)
        state["exact_match_before"] = before.get("exact_match")
        if "exact_match" in before:
            log.info("Held-out exact match before training: %.1f%%", 100 * before["exact_match"])

    progress = Progress(total_steps, state["step"], cfg.train.log_every)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.train.max_grad_norm or math.inf
    model.train()
    loop_started = time.perf_counter()
    training_memory = TrainingPeakMemory().start()
    last = {}
    while state["step"] < total_steps:
        step_started = time.perf_counter()
        window = [stream.next_batch() for _ in range(cfg.train.grad_accum_steps)]
        loss_value, window_loss_tokens = accumulate_gradients(model, window, precision)
        lr = scheduler.get_last_lr()[0]
        grad_norm, skipped = precision.step(optimizer, params, max_norm)
        if skipped:  # fp16 overflow: the weights did not move, so neither does the schedule
            state["skipped_steps"] += 1
        else:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        state["step"] += 1
        step = state["step"]
        step_seconds = time.perf_counter() - step_started
        real_tokens = sum(int(b["attention_mask"].sum()) for b in window)
        state["trained_tokens"] += real_tokens
        state["loss_tokens"] += window_loss_tokens
        state["train_seconds"] += step_seconds
        state["data"] = stream.state_dict()
        if precision.scaler is not None:
            state["loss_scaler"] = precision.scaler.state_dict()
        last = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": real_tokens / step_seconds,
                "trained_tokens": state["trained_tokens"], "loss_tokens": state["loss_tokens"],
                "epoch": stream.epoch, "step_time_s": step_seconds,
                "skipped_steps": state["skipped_steps"]}
        if precision.loss_scale is not None:
            last["loss_scale"] = precision.loss_scale
        if step % cfg.train.log_every == 0 or step == total_steps:
            metrics.write(last)
            tracker.log(last)
        progress.update(step, loss_value, lr, last["tokens_per_s"], peak_memory_bytes() / GIB)

        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
            result = evaluate(step, with_generation=False)
            if "eval_loss" in result:
                progress.write(f"step {step}: eval_loss {result['eval_loss']:.4f}")
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
            save_checkpoint(run_dir, step, model, optimizer, scheduler, state,
                            cfg.train.keep_checkpoints)
    progress.close()
    loop_seconds = time.perf_counter() - loop_started
    train_peak_memory = training_memory.stop()

    final_eval = evaluate(state["step"], with_generation=True)
    save_checkpoint(run_dir, state["step"], model, optimizer, scheduler, state,
                    cfg.train.keep_checkpoints)
    save_final(model, tokenizer, run_dir / "final")
    metrics.close()

    summary = {
        "model": cfg.model.name_or_path,
        "model_source": source,
        "method": cfg.method.name,
        "precision": cfg.precision.name,
        "parallelism": cfg.parallelism.name,
        "final_artifact": "peft_adapter" if is_adapter(model) else "full_model",
        "loss_scale": precision.loss_scale,
        "skipped_steps": state["skipped_steps"],
        "steps": state["step"],
        "global_batch_size": cfg.train.micro_batch_size * cfg.train.grad_accum_steps,
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
        "resumed_from": str(resumed_from) if resumed_from else None,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    tracker.summary(summary)
    tracker.finish()
    print(summary_table(summary_rows(summary, run_dir), "dtune run summary"), flush=True)
    return RunResult(summary, model, tokenizer)


def accumulate_gradients(model, window: list[dict], precision: Precision) -> tuple[float, int]:
    """Backpropagate a window of micro-batches as one batch: the loss is the mean over every
    loss-carrying token in the window, not a mean of per-micro-batch means."""
    window_tokens = sum(loss_token_count(b) for b in window)
    total = 0.0
    for batch in window:
        with precision.autocast():
            loss = summed_token_loss(model, batch) / max(window_tokens, 1)
        precision.backward(loss)
        total += loss.item()
    return total, window_tokens


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


def tokenize_records(records: list[dict], cfg: Config, tokenizer, split: str) -> list:
    examples, emptied = [], 0
    for record in records:
        example = tokenize(record, cfg.data.format, tokenizer, cfg.data.max_seq_len,
                           cfg.data.train_on_inputs, cfg.data.system_prompt)
        if all(label == IGNORE for label in example.labels[1:]):
            emptied += 1  # truncation cut off the whole response
            continue
        examples.append(example)
    if emptied:
        log.warning("%d of %d %s examples lost their whole response to data.max_seq_len=%d "
                    "and were dropped.", emptied, len(records), split, cfg.data.max_seq_len)
    if records and not examples:
        raise DtuneError(
            f"every {split} example is longer than data.max_seq_len={cfg.data.max_seq_len} "
            "before its response starts, so nothing would be trained; raise data.max_seq_len."
        )
    return examples


def build_optimizer(model, cfg: Config) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            # Norms and biases are not decayed, as in most LLM fine-tuning recipes.
            (no_decay if param.ndim < 2 else decay).append(param)
    t = cfg.train
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr,
                             betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)


def planned_steps(cfg: Config, stream: BatchStream) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    per_epoch = max(stream.batches_per_epoch // cfg.train.grad_accum_steps, 1)
    return per_epoch * cfg.train.epochs


def build_scheduler(optimizer, cfg: Config, total_steps: int):
    t = cfg.train
    warmup = min(t.warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(total_steps - warmup, 1)
        if t.lr_schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def summary_rows(summary: dict, run_dir: Path) -> list[tuple[str, str]]:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def num(x, fmt="{:.4f}"):
        return "n/a" if x is None else fmt.format(x)

    return [
        ("model", summary["model"]),
        ("method / precision", f"{summary['method']} / {summary['precision']}"),
        ("trainable params", f"{summary['trainable_params']:,} of {summary['total_params']:,}"),
        ("steps", str(summary["steps"])),
        ("final train loss", num(summary["final_loss"])),
        ("eval loss", num(summary["eval_loss"])),
        ("exact match before", pct(summary["exact_match_before"])),
        ("exact match after", pct(summary["exact_match_after"])),
        ("tokens/s", num(summary["tokens_per_s"], "{:,.0f}")),
        ("peak memory", f"{summary['peak_memory_bytes'] / GIB:.2f} GiB"),
        ("wall time", f"{summary['wall_time_s']:.0f} s"),
        ("run dir", str(run_dir)),
    ]
