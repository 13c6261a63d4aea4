"""The fine-tuning recipe: config -> model + data -> engine -> loop -> checkpoints, metrics.

Read it top to bottom. `run` is the whole recipe: set up, resume, the loop, finish. Each pass
of the loop is the training step (forward, loss and backward per micro-batch, then the
optimizer step), then maybe an eval, maybe a checkpoint, maybe a stop. The same loop runs one
process, DDP or DeepSpeed ZeRO: the engine hides which, and only rank 0's reporter speaks.
"""
from __future__ import annotations

import contextlib
import dataclasses
from functools import partial
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dtune.checkpoint import (TrainState, checkpoint_folders, load_checkpoint, run_id_of,
                              save_checkpoint, valid_checkpoints)
from dtune.config import Config
from dtune import data
from dtune.data.batching import loss_token_count
from dtune.data.formatting import IGNORE
from dtune.distributed import (Ranks, all_reduce_max, all_reduce_sums, all_reduce_tensor, barrier,
                               die_with_parent, gather, launched_ranks, process_group)
from dtune import grpo, long_context, precision
from dtune.engines import build_engine, run_context, shards_parameters
from dtune.engines.base import Engine
from dtune.engines.base import StepResult, StepStatus, held_here, process_device
from dtune.errors import DtuneError
from dtune.evaluate import HeldOut, check_new_tokens, held_out_figures
from dtune.logs import quiet_libraries
from dtune.families import check_packing
from dtune.files import read_text
from dtune.loss import sequence_logps, summed_token_loss
from dtune.loss_plan import LossPlan, plan_loss
from dtune.methods import apply_method, count_parameters, load_options, method_spec
from dtune.metrics import (TrainingPeakMemory, peak_host_memory_bytes, peak_memory_bytes,
                           peak_reserved_bytes, release_free_heap)
from dtune.load_run import load_base
from dtune.objectives import OBJECTIVES, ObjectiveSpec, objective_spec, pair_loss
from dtune.reference import build_reference
from dtune.rewards import parse_rewards
from dtune.reporter import SilentReporter, create_reporter
from dtune.run_dir import RunDir
from dtune.settle import require_settled
from dtune import sequence_parallel
from dtune.sequence_parallel import SequenceParallel
from dtune.run_start import (all_damaged, changed_settings, claimed, settings_changed,
                             training_settings)
from dtune.signals import StopFlag, slurm_restarted, stop_after_checkpoint
from dtune.tokenizer_setup import template_changed_error

log = logging.getLogger("dtune")


@dataclass
class Recipe:
    """What set-up made, read by every later part."""

    cfg: Config
    run_dir: RunDir
    run_id: str  # whose checkpoints this run resumes and prunes (dtune/run_start.py)
    ranks: Ranks
    engine: Engine
    tokenizer: Any
    stream: data.Batches  # in memory or streamed (dtune/data/__init__.py)
    held: HeldOut  # what evaluation scores (dtune/evaluate.py)
    total_steps: int
    steps_set_by: str  # what set total_steps (planned_steps): it goes in the summary
    loss: LossPlan  # how the loss reads the LM head (dtune/loss_plan.py)
    params: tuple[int, int]  # trainable, total
    model_source: str
    started: float
    resumed_from: Optional[Path] = None
    objective: ObjectiveSpec = OBJECTIVES["sft"]
    reference: Any = None  # DPO's reference log-probs (dtune/reference.py); NoReference else
    data_fingerprint: Optional[str] = None  # the training rows (None: streamed)
    # this process's first step whose loss or gradient was NaN/inf (skipped), for the message
    # that refuses non-finite final weights
    first_nonfinite_step: Optional[int] = None
    # preference pairs truncation made identical (dtune/data/prepare.py); None for SFT
    identical_pairs: Optional[int] = None
    rewards: tuple = ()  # GRPO's reward terms (dtune/rewards.py); () for the others
    # this rank's sequence-parallel group (dtune/sequence_parallel.py); size 1: none
    sequence: SequenceParallel = dataclasses.field(default_factory=SequenceParallel)


@dataclass
class LoopResult:
    seconds: float
    train_peak_memory: int  # apart from loading
    last_step: dict  # the metrics of the last step this process trained ({} if none)


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
    require_settled(cfg)  # once, where launch began (dtune/settle.py): never here again
    with process_group(cfg.parallelism, ranks), run_context(cfg, ranks), \
            this_run(cfg, RunDir(run_dir), ranks) as run_id:
        recipe = set_up(cfg, RunDir(run_dir), run_id, ranks, started)
        reporter, stop = SilentReporter(), StopFlag()
        try:
            state = resume_or_start(recipe)
            if finished_before(recipe, state):
                return RunResult(recipe.run_dir.read_summary(), recipe.engine.module,
                                 recipe.tokenizer)
            reporter = create_reporter(cfg, recipe.run_dir, run_id, ranks.is_main,
                                       state.step if recipe.resumed_from else None)
            if state.step == 0 and state.exact_match_before is None:
                evaluate_before_training(recipe, state, reporter)
            stop.install()
            loop = train_loop(recipe, state, reporter, stop)
            return finish(recipe, state, reporter, loop)
        finally:  # also when a step raises: handlers back, files closed, tracker ended
            stop.restore()
            reporter.close()


@contextlib.contextmanager
def this_run(cfg: Config, run_dir: RunDir, ranks: Ranks):
    """The run's id on every rank. Rank 0 holds the directory for the run (its lock, fresh or
    resumed: dtune/run_start.py), unless the process that started it does and handed it the
    id (DTUNE_RUN_ID)."""
    if not ranks.is_main or "DTUNE_RUN_ID" in os.environ:
        owned = contextlib.nullcontext(os.environ.get("DTUNE_RUN_ID", "0") if ranks.is_main
                                       else "0")
    else:
        owned = claimed(cfg, run_dir, world_size=ranks.world_size)
    with owned as run_id:
        # 48 bits (12 hex digits) are exact in float64: a tensor collective carries them
        yield f"{int(all_reduce_max(float(int(run_id, 16)))):012x}"


def set_up(cfg: Config, run_dir: RunDir, run_id: str, ranks: Ranks, started: float) -> Recipe:
    """Data, model and method, batch stream and engine, in the order that fails fastest."""
    if not ranks.is_main:
        log.setLevel(logging.WARNING)  # rank 0 alone reports
    seed_everything(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    records = data.read(cfg, ranks)  # first: a bad row is reported before the model loads
    # the base, or with model.init_from an earlier run's final model (SFT, then GRPO)
    model, tokenizer, source = load_base(cfg, base_load_options(cfg, ranks))
    check_context_length(cfg, model)
    check_packing(cfg, model)  # before minutes go into tokenizing
    # its groups, and attention that spans them; the batch stream then counts groups
    sequence = sequence_parallel.set_up(model, cfg.parallelism.sequence_parallel, ranks,
                                        cfg.data.packing, tokenizer.pad_token_id,
                                        cfg.model.name_or_path)
    log.info("Model %s from %s", cfg.model.name_or_path, source)
    if any(hasattr(p, "ds_numel") for p in model.parameters()):  # ZeRO-3 loads partitioned
        held = sum(p.ds_tensor.numel() for p in model.parameters())
        log.info("Loaded partitioned: rank %d holds %s of the %s weight values", ranks.rank,
                 f"{held:,}", f"{sum(p.ds_numel for p in model.parameters()):,}")
    objective = objective_spec(cfg.objective)
    prepared = data.build(cfg, tokenizer, sequence_parallel.data_ranks(ranks, sequence.size),
                          records, pairs=objective.pairs)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    long_context.tile_mlp(model, cfg.train.mlp_tiles, cfg.model.name_or_path)
    if not cfg.model.continues_adapter:  # else init_from's adapter is the one trained
        model = apply_method(model, cfg.method, tokenizer)
    precision.keep_trainable_fp32(model, cfg)
    trainable, total = count_parameters(model)
    total_steps, steps_set_by = planned_steps(cfg, prepared.epoch_batches,
                                              ranks.world_size // sequence.size)
    # GRPO updates num_iterations times a step: the schedule spans every update
    updates = cfg.objective.num_iterations if objective.online else 1
    engine = build_engine(cfg, model, ranks, total_steps * updates)
    loss = plan_loss(cfg, engine, tokenizer)
    log.info(
        "Method %s, %s on %d process(es): %s trainable of %s parameters (%.2f%%); %s training "
        "and %d eval examples; %d steps (%s) of %d %s", cfg.method.name,
        cfg.parallelism.name, ranks.world_size, f"{trainable:,}", f"{total:,}",
        100 * trainable / total, prepared.described,
        sum(map(len, prepared.held_out.examples.values())), total_steps,
        steps_set_by, global_batch_size(cfg, ranks), "pairs" if objective.pairs else "sequences")
    # Before any checkpoint loads: the reference is the starting model (dtune/reference.py).
    reference = build_reference(cfg, engine, prepared.batches, tokenizer, run_dir,
                                resuming=cfg.train.resume or slurm_restarted(),
                                response_head=loss.response_head)
    return Recipe(cfg, run_dir, run_id, ranks, engine, tokenizer, prepared.batches,
                  prepared.held_out, total_steps, steps_set_by, loss, (trainable, total), source,
                  started, objective=objective, reference=reference,
                  data_fingerprint=prepared.fingerprint, identical_pairs=prepared.identical_pairs,
                  rewards=tuple(parse_rewards(cfg.objective.rewards)) if objective.online else (),
                  sequence=sequence)


def base_load_options(cfg: Config, ranks: Ranks) -> dict:
    """from_pretrained's options for the base: the method's quantization, the dtype it is
    stored in, and on a GPU this rank's device, which the weights load straight onto (eight
    ranks each holding a 7B model in host memory first would need 224 GB of it). ZeRO-3
    places nothing: it partitions the weights as they load (engines.run_context)."""
    device = None if shards_parameters(cfg.parallelism) else process_device(ranks)
    return {**load_options(cfg.method, device), "dtype": precision.base_dtype(cfg)}


def resume_or_start(recipe: Recipe) -> TrainState:
    """A fresh state, or the newest complete checkpoint of this run when resuming, once its
    settings, training rows and chat template are found to be this run's."""
    cfg, run_dir = recipe.cfg, recipe.run_dir
    template = recipe.tokenizer.chat_template
    state = TrainState(data=recipe.stream.state_dict(), run_id=recipe.run_id,
                       total_steps=recipe.total_steps,
                       settings=training_settings(cfg, recipe.ranks.world_size),
                       data_fingerprint=recipe.data_fingerprint, chat_template=template)
    if not (cfg.train.resume or slurm_restarted()):  # a requeued SLURM job always resumes
        return state
    checkpoints = valid_checkpoints(run_dir.path, run_id=recipe.run_id)
    if not checkpoints:
        mine = [folder for _, folder in checkpoint_folders(run_dir.path)
                if run_id_of(folder) in (recipe.run_id, None)]
        if mine:  # every one of them altered since its save
            raise all_damaged(run_dir, [(folder, "its files do not match the SHA-256 of "
                                         "their manifest") for folder in mine])
        log.info("train.resume=true but %s holds no checkpoint of this run yet; starting fresh",
                 run_dir.checkpoints)
        return state
    saved = TrainState.from_json(read_text(checkpoints[0] / "trainer_state.json"))
    changed = changed_settings(saved.settings, state.settings)
    if None not in (saved.data_fingerprint, state.data_fingerprint) \
            and saved.data_fingerprint != state.data_fingerprint:
        changed.append(("the training rows (their content, or the tokenizer)",
                        saved.data_fingerprint, state.data_fingerprint))
    if changed:
        raise settings_changed(checkpoints[0], changed)
    changed_template = template_changed_error(checkpoints[0], saved.chat_template, template)
    if changed_template:
        raise changed_template
    recipe.resumed_from = checkpoints[0]
    loaded = load_checkpoint(checkpoints[0], recipe.engine)
    loaded.chat_template = template  # a checkpoint written before templates were saved: None
    loaded.settings, loaded.data_fingerprint = state.settings, state.data_fingerprint
    if loaded.total_steps and loaded.total_steps != recipe.total_steps:
        log.warning("The run planned %d steps when %s was saved and plans %d now (%s): the "
                    "learning-rate schedule, whose warmup and decay span the planned steps, "
                    "changes from step %d on.", loaded.total_steps, checkpoints[0].name,
                    recipe.total_steps, recipe.steps_set_by, loaded.step + 1)
    loaded.total_steps = recipe.total_steps
    recipe.stream.load_state_dict(loaded.data)
    log.info("Resumed from %s (step %d)", checkpoints[0], loaded.step)
    return loaded


def finished_before(recipe: Recipe, state: TrainState) -> bool:
    """A resume of a run that had already finished (its last step, summary.json and final/
    written): nothing to train, and nothing it wrote is written again."""
    run_dir = recipe.run_dir
    if recipe.resumed_from is None or state.step < recipe.total_steps \
            or not run_dir.summary_file.exists() or not run_dir.final.is_dir():
        return False
    log.warning("The run in %s finished at step %d (%s): nothing to train, and its summary.json, "
                "metrics and final/ are left as they are. To train on, resume with more steps "
                "(a larger train.max_steps or train.epochs).", run_dir.path, state.step,
                recipe.steps_set_by)
    return True


def evaluate_before_training(recipe: Recipe, state: TrainState, reporter) -> None:
    """The baseline the run is judged against: held-out loss and exact match at step 0."""
    announce_eval(recipe, "the starting model")
    before = evaluate_now(recipe, step=0, with_generation=True)
    reporter.log_eval(before)
    state.exact_match_before = before.get("exact_match")
    state.preference_accuracy_before = before.get("preference_accuracy")
    if "exact_match" in before:
        log.info("Held-out exact match before training: %.1f%%", 100 * before["exact_match"])
    if "preference_accuracy" in before:
        log.info("Held-out preference accuracy before training: %.1f%%",
                 100 * before["preference_accuracy"])


def train_loop(recipe: Recipe, state: TrainState, reporter, stop: StopFlag) -> LoopResult:
    """The loop: a step, then maybe eval, save and stop."""
    cfg, total = recipe.cfg, recipe.total_steps
    reporter.training_started(total, state.step)
    recipe.engine.model.train()
    release_free_heap()
    started, memory, record = time.perf_counter(), TrainingPeakMemory().start(), {}
    saved = recipe.resumed_from is not None  # nothing trained since the checkpoint resumed
    while state.step < total:
        window = recipe.stream.next_window(cfg.train.grad_accum_steps)
        window = recipe.sequence.shard_window(window)  # its shard of each row, if split
        counts = window_counts(window, stop, recipe.objective.pairs)
        if counts.stop:  # a signal on any rank: checkpoint here, then requeue or explain
            if not saved:
                save_checkpoint(recipe.run_dir.path, state, recipe.engine,
                                cfg.train.keep_checkpoints)
            reporter.close()
            stop_after_checkpoint(stop, recipe.run_dir.path, state.step, recipe.ranks.is_main)
        record = train_step(recipe, state, window, counts)
        reporter.log_step(record, last_step=state.step == total)
        if state.step == total:
            break
        if due(state.step, cfg.train.eval_every):
            reporter.log_eval(evaluate_now(recipe, state.step, with_generation=False))
        saved = due(state.step, cfg.train.save_every)
        if saved:
            save_checkpoint(recipe.run_dir.path, state, recipe.engine, cfg.train.keep_checkpoints)
    stop.finishing = True  # handlers stay until run() ends: see StopFlag._handle
    reporter.training_finished()
    return LoopResult(time.perf_counter() - started, memory.stop(), record)


@dataclass(frozen=True)
class WindowCounts:
    """What a window holds over every rank, and whether any rank was asked to stop: counted
    on the host copies and summed in one collective, read back once."""

    loss_tokens: int  # tokens that carry loss: SFT's normaliser
    real_tokens: int  # tokens that are not padding: throughput
    pairs: int  # preference pairs: a pair objective's normaliser
    stop: bool


def window_counts(window: list[dict], stop: Optional[StopFlag] = None,
                  pairs: bool = False) -> WindowCounts:
    local = [sum(loss_token_count(b) for b in window),
             sum(int(b["attention_mask"].sum()) for b in window),
             sum(len(b["pair_index"]) for b in window) if pairs else 0,
             float(stop is not None and stop.signum is not None)]
    loss_tokens, real_tokens, pair_count, stopping = all_reduce_sums(local)
    if stopping and stop is not None and stop.signum is None:
        stop.signum = signal.SIGTERM  # another rank got a signal: act alike
    return WindowCounts(int(loss_tokens), int(real_tokens), int(pair_count), bool(stopping))


def train_step(recipe: Recipe, state: TrainState, window: list[dict],
               counts: WindowCounts) -> dict:
    """One optimizer step over a window of micro-batches; returns its metrics record. The
    loss (and a pair objective's metrics) are summed over ranks where they lie and read
    once, with the gradient norm, by the engine's step."""
    engine = recipe.engine
    started = time.perf_counter()
    lr = engine.lr()
    if recipe.objective.online:  # sampled completions and their rewards (dtune/grpo.py)
        result, pair_metrics, counts = grpo_step(recipe, state, window, counts)
    elif recipe.objective.pairs:  # per pair: the mean over every pair of the global window
        sums = accumulate_pair_gradients(engine, window, counts.pairs, recipe.cfg.objective,
                                         recipe.reference, recipe.loss.response_head)
        result = engine.step(sums[0])
        names = objective_spec(recipe.cfg.objective).metrics
        pair_metrics = {**dict(zip(names, sums[1:].tolist())), "pairs": counts.pairs}
    else:  # per token: the mean over every loss-carrying token of the global window
        result = engine.step(accumulate_gradients(engine, window, counts.loss_tokens,
                                                  recipe.loss.chunk_size,
                                                  recipe.cfg.train.offload_activations))
        pair_metrics = {}
    state.step += 1
    state.skipped_steps += result.status is StepStatus.OVERFLOW
    state.nonfinite_steps += result.status is StepStatus.NONFINITE
    if result.status is StepStatus.NONFINITE:
        if recipe.first_nonfinite_step is None:
            recipe.first_nonfinite_step = state.step
        handle_nonfinite(recipe, state, result.loss, result.grad_norm)
    seconds = time.perf_counter() - started
    state.trained_tokens += counts.real_tokens
    state.loss_tokens += counts.loss_tokens
    state.train_seconds += seconds
    state.data = recipe.stream.state_dict()
    record = {"step": state.step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
              "tokens_per_s": counts.real_tokens / seconds,
              "trained_tokens": state.trained_tokens, "loss_tokens": state.loss_tokens,
              "epoch": recipe.stream.epoch, "step_time_s": seconds,
              "skipped_steps": state.skipped_steps, "nonfinite_steps": state.nonfinite_steps}
    # a mixture's examples and tokens per source so far: {"examples/<source>": n, ...}
    record.update(recipe.stream.source_totals())
    record.update(pair_metrics)
    if engine.loss_scale is not None:
        record["loss_scale"] = engine.loss_scale
    return record


def accumulate_gradients(engine: Engine, window: list[dict], window_tokens: int,
                         chunk_size: int = 0, offload: bool = False) -> torch.Tensor:
    """Forward, loss and backward for each micro-batch of a window, on every rank, as one
    batch: the loss is the mean over every loss-carrying token of the global window
    (`window_tokens`, from `window_counts`), not a mean of means. Returns that mean, summed
    over ranks where it lies (float64), not yet read."""
    total = torch.zeros((), dtype=torch.float64, device=engine.device)
    for index, batch in enumerate(window):
        batch = engine.to_device(batch)
        with engine.forward_context(last_in_window=index == len(window) - 1), \
                long_context.saved_activations(offload, engine.device):
            loss = summed_token_loss(engine.model, batch, chunk_size) / max(window_tokens, 1)
        engine.backward(loss)
        total += loss.detach().double()
    return all_reduce_tensor(total)


def accumulate_pair_gradients(engine: Engine, window: list[dict], window_pairs: int,
                              objective, reference, response_head: bool = False
                              ) -> torch.Tensor:
    """A preference objective's forward, loss and backward for each micro-batch of a window
    (chosen and rejected rows of n pairs in one forward), on every rank, as one batch: the
    loss and each metric are means over every pair of the global window (`window_pairs`),
    not means of per-micro-batch means. Returns [loss, *the objective's metrics], summed over
    ranks where they lie (float64), not yet read. The reference log-probs (DPO) come first,
    without grad."""
    names = ("loss", *objective_spec(objective).metrics)
    totals = torch.zeros(len(names), dtype=torch.float64, device=engine.device)
    for index, batch in enumerate(window):
        tokens = (batch["labels"][:, 1:] != IGNORE).sum(1).float()  # on the host: no sync
        on_device = engine.to_device({**batch, "response_tokens": tokens})
        ref_logps = reference.logps(engine, batch, on_device)
        with engine.forward_context(last_in_window=index == len(window) - 1):
            logps = sequence_logps(engine.model, on_device, response_head)
            loss, metrics = pair_loss(objective, logps, on_device["response_tokens"], ref_logps)
        engine.backward(loss / max(window_pairs, 1))
        totals += torch.stack([loss.detach(), *(metrics[k] for k in names[1:])]).double()
    return all_reduce_tensor(totals / max(window_pairs, 1))


def grpo_step(recipe: Recipe, state: TrainState, window: list[dict], counts: WindowCounts
              ) -> tuple[StepResult, dict, WindowCounts]:
    """GRPO's step: G completions of each prompt of the window, sampled (eval mode, KV cache,
    seeded by the step and the micro-batch's place in the global window, so a resume draws
    the same, and so do 2 ranks x 1 micro-batch and 1 rank x 2) and scored; then
    `num_iterations` updates on them, each loss divided by the whole window's normaliser
    over every rank. Returns the last update's result, the step's metrics, and `counts` with
    the rollouts' tokens (prompts and completions) and the trained ones (kept completions')."""
    cfg, engine, o = recipe.cfg, recipe.engine, recipe.cfg.objective
    started = time.perf_counter()
    rollouts = []
    for index, batch in enumerate(window):
        prompts, answers = grpo.prompts_and_answers(batch, recipe.tokenizer)
        # rank r holds the global window's micro-batches r x accum ... (data.batching)
        place = recipe.ranks.rank * len(window) + index
        seed = partial(grpo.sample_seed, cfg.train.seed, state.step, place)
        rollout = sample_and_score(recipe, prompts, answers, seed(0))
        for draw in range(1, o.resample_zero_std_groups + 1):  # groups without a signal
            if not any_rank(bool(rollout.zero_std.any()), engine.synced_forward):
                break
            fresh = sample_and_score(recipe, prompts, answers, seed(draw))
            rollout = grpo.refilled(rollout, fresh, o.num_generations,
                                    recipe.tokenizer.pad_token_id)
            score_rollout(recipe, rollout)
        rollouts.append(rollout)
    trained = [grpo.trained_rows(rollout, o.beta) for rollout in rollouts]
    found = grpo.window_counts(rollouts, trained)  # every rank's, before the first backward
    divisor = grpo.window_normaliser(o.loss_type, found["sequences"], found["tokens"],
                                     o.max_new_tokens)
    generated = time.perf_counter()
    if o.num_iterations > 1:  # the sampling policy's log-probs, before the first update
        for rollout in trained:
            with torch.no_grad(), engine.eval_context():
                rollout.old_logps = grpo.completion_logps(
                    engine.module, engine.to_device(rollout.model_inputs()), rollout.width,
                    o.temperature)
    sums, statuses = 0, []
    for _ in range(o.num_iterations):
        update = accumulate_grpo_gradients(engine, trained, divisor, found["tokens"], o,
                                           recipe.reference)
        result = engine.step(update[0])
        statuses.append(result.status)
        sums = sums + update
    result = StepResult(result.grad_norm, next((s for s in statuses if s is not
                                                StepStatus.APPLIED), StepStatus.APPLIED),
                        result.loss)
    means = (sums / o.num_iterations).tolist()  # read once, after the last update
    metrics = {**found["metrics"], "clip_fraction": means[1], "kl": means[2],
               "generation_time_s": generated - started,
               "update_time_s": time.perf_counter() - generated}
    return result, metrics, dataclasses.replace(counts, real_tokens=found["rollout_tokens"],
                                                loss_tokens=found["tokens"])


def sample_and_score(recipe: Recipe, prompts: list, answers: list, seed: int) -> grpo.Rollout:
    o = recipe.cfg.objective
    rollout = grpo.sample_group(recipe.engine, recipe.tokenizer, prompts, answers,
                                o.num_generations, o.max_new_tokens, o.temperature, o.top_p,
                                seed)
    score_rollout(recipe, rollout)
    return rollout


def score_rollout(recipe: Recipe, rollout: grpo.Rollout) -> None:
    o = recipe.cfg.objective
    grpo.score(rollout, recipe.rewards, o.num_generations, o.max_new_tokens,
               scale=o.loss_type != "dr_grpo", skip_zero_std=o.skip_zero_std_groups)


def any_rank(flag: bool, synced: bool) -> bool:
    """`flag` on this rank, or on any rank where every rank must join each forward (ZeRO-3,
    FSDP2: a rank that generates alone would wait for the others' weights forever)."""
    return all_reduce_max(float(flag)) > 0 if synced else flag


def accumulate_grpo_gradients(engine: Engine, rollouts: list, divisor: int, tokens: int,
                              objective, reference) -> torch.Tensor:
    """GRPO's forward, loss and backward for each rollout of a window (its rows with a
    gradient, `grpo.trained_rows`): the clipped surrogate (plus beta x KL to the reference)
    per completion token, summed as `objective.loss_type` says and divided by the window's
    `divisor` (dtune/grpo.py), so the window is one batch whatever its split over
    micro-batches and ranks. Returns [loss, clip fraction, KL] (the last two per kept
    completion token), summed over ranks, not yet read."""
    totals = torch.zeros(3, dtype=torch.float64, device=engine.device)
    for index, rollout in enumerate(rollouts):
        inputs = engine.to_device(rollout.model_inputs())
        weights = engine.to_device({  # fp32, as the log-probs are
            "mask": rollout.completion_mask * rollout.keep.float().unsqueeze(1),
            "advantages": rollout.advantages.float()})
        ref = reference.token_logps(engine, inputs, rollout.width, objective.temperature) \
            if objective.beta else None
        with engine.forward_context(last_in_window=index == len(rollouts) - 1):
            logps = grpo.completion_logps(engine.model, inputs, rollout.width,
                                          objective.temperature)
            old = logps.detach() if rollout.old_logps is None else rollout.old_logps
            terms = grpo.token_terms(logps, old, weights["advantages"], objective.epsilon,
                                     objective.epsilon_high, objective.beta, ref)
            loss = grpo.summed_loss(terms["loss"], weights["mask"], objective.loss_type)
        engine.backward(loss / divisor)
        mask = weights["mask"]
        totals += torch.stack([loss.detach() / divisor,
                               (terms["clipped"] * mask).sum() / max(tokens, 1),
                               (terms["kl"] * mask).sum() / max(tokens, 1)]).double()
    return all_reduce_tensor(totals)


def handle_nonfinite(recipe: Recipe, state: TrainState, loss: float, grad_norm: float) -> None:
    """A step whose loss or gradient was NaN/inf, and whose update was skipped: go on, or
    save the untouched weights and stop with the likely causes."""
    cfg, step = recipe.cfg, state.step
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    if cfg.train.on_nonfinite == "skip":
        log.warning("Step %d: non-finite %s; the update was skipped (train.on_nonfinite=skip; "
                    "%d such steps so far).", step, what, state.nonfinite_steps)
        return
    save_checkpoint(recipe.run_dir.path, state, recipe.engine, cfg.train.keep_checkpoints)
    raise DtuneError(
        f"training stopped at step {step}: non-finite {what} (train.on_nonfinite=stop). Likely "
        f"causes: a learning rate too high for this model and method (train.lr={cfg.train.lr}); "
        "an fp16 overflow (try precision=bf16 or fp32); or a bad data row in this step's batch."
        f" The weights before this step are saved in {recipe.run_dir.checkpoints}/step-{step};"
        " resume with train.resume=true once the cause is fixed.")


def check_final_weights(recipe: Recipe, state: TrainState) -> None:
    """Refuse to write final/ from weights holding NaN or infinity: a skipped step keeps its
    update out, but an update can still overflow (a learning rate far too high), and such
    weights would be served as the run's result. Every rank agrees: a ZeRO-3 or FSDP2 rank
    checks its own shards."""
    trained = [(name, held_here(p)) for name, p in
               recipe.engine.module.named_parameters() if p.requires_grad]
    finite = torch.stack([torch.isfinite(t).all() for _, t in trained]).cpu() if trained \
        else torch.ones(0, dtype=torch.bool)  # one sync; every rank joins the reduce below
    if not all_reduce_max(float((~finite).sum())):
        return
    bad = [name for (name, _), ok in zip(trained, finite.tolist()) if not ok]
    where = f" (this rank's first: {bad[0]})" if bad else " (on another rank)"
    raise DtuneError(
        f"the trained weights hold NaN or infinite values after step {state.step}{where}; "
        f"{nonfinite_origin(recipe.first_nonfinite_step, state.step)}. "
        f"{recipe.run_dir.final} was not written. Likely causes: a learning rate too high for "
        f"this model and method (train.lr={recipe.cfg.train.lr}); an fp16 overflow (try "
        "precision=bf16 or fp32); or a bad data row. No checkpoint of these weights was saved at "
        "the end, so the earlier checkpoints are as they were: fix the cause and train again "
        "in a new run directory (or with train.overwrite=true).")


def nonfinite_origin(first: Optional[int], last: int) -> str:
    """Which step to look at, for the message above."""
    if first is None:
        return (f"no step's loss or gradient was non-finite, so the last update (step {last}) "
                "made them so, or an update to weights the loss does not read")
    return (f"step {first} was this run's first step with a non-finite loss or gradient (its "
            "update was skipped): look at it and the updates just before it")


def evaluate_now(recipe: Recipe, step: int, with_generation: bool) -> dict:
    """Held-out loss, and with `with_generation` exact match, shared across every rank."""
    cfg = recipe.cfg
    figures, _ = held_out_figures(
        recipe.engine, recipe.tokenizer, recipe.held, recipe.loss.response_head,
        cfg.eval.batch_size, cfg.data.system_prompt,
        cfg.eval.exact_match_samples if with_generation else 0, cfg.eval.max_new_tokens,
        what="Exact match " + ("before" if step == 0 else "after") + " training")
    return {"step": step, "split": "eval", **figures}


def announce_eval(recipe: Recipe, model: str) -> None:
    """Say what the eval with generation is about to do: minutes on a real model."""
    cfg = recipe.cfg
    if recipe.objective.pairs:
        pairs = sum(len(s.examples) for s in recipe.held.pairs)
        if pairs:
            log.info("Evaluating %s: preference accuracy on %d held-out pairs", model, pairs)
        return
    losses = sum(map(len, recipe.held.examples.values()))
    prompts = min(len(recipe.held.records), cfg.eval.exact_match_samples)
    parts = ([f"held-out loss on {losses} examples"] if losses else []) + \
        ([f"exact match on {prompts} prompts (greedy, up to {cfg.eval.max_new_tokens} new "
          "tokens each)"] if prompts else [])
    if parts:
        log.info("Evaluating %s: %s", model, ", then ".join(parts))


def finish(recipe: Recipe, state: TrainState, reporter, loop: LoopResult) -> RunResult:
    """The final eval, checkpoint and Hugging Face artifact, then the summary."""
    cfg, engine = recipe.cfg, recipe.engine
    announce_eval(recipe, "the trained model")
    final_eval = evaluate_now(recipe, state.step, with_generation=True)
    reporter.log_eval(final_eval)
    # before the final checkpoint, whose pruning would otherwise drop an earlier, finite one
    check_final_weights(recipe, state)
    if cfg.train.save_final:
        save_checkpoint(recipe.run_dir.path, state, engine, cfg.train.keep_checkpoints)
        engine.save_final(recipe.run_dir.final, recipe.tokenizer)
    barrier()
    summary = {
        "model": cfg.model.name_or_path, "model_source": recipe.model_source,
        "method": cfg.method.name, "precision": cfg.precision.name,
        "parallelism": cfg.parallelism.name, "world_size": recipe.ranks.world_size,
        "final_artifact": None if not cfg.train.save_final else
        "peft_adapter" if method_spec(cfg.method).adapter else "full_model",
        "loss_scale": engine.loss_scale, "skipped_steps": state.skipped_steps,
        "nonfinite_steps": state.nonfinite_steps, "steps": state.step,
        "steps_set_by": recipe.steps_set_by,
        "global_batch_size": global_batch_size(cfg, recipe.ranks),
        "final_loss": loop.last_step.get("loss"),
        "eval_loss": final_eval.get("eval_loss"),
        **source_summary(recipe, final_eval),
        "exact_match_before": state.exact_match_before,
        "exact_match_after": final_eval.get("exact_match"),
        "exact_match_after_by_task": {k.split("/", 1)[1]: v for k, v in final_eval.items()
                                      if k.startswith("exact_match/")},
        **objective_summary(recipe, state, loop, final_eval),
        "trainable_params": recipe.params[0], "total_params": recipe.params[1],
        "trained_tokens": state.trained_tokens, "loss_tokens": state.loss_tokens,
        "tokens_per_s": state.trained_tokens / max(state.train_seconds, 1e-9),
        "train_time_s": state.train_seconds, "wall_time_s": time.perf_counter() - recipe.started,
        "loop_time_s": loop.seconds, "peak_memory_bytes": peak_memory_bytes(),
        "train_peak_memory_bytes": loop.train_peak_memory,
        "peak_memory_bytes_per_rank": gather(peak_memory_bytes()),
        "train_peak_memory_bytes_per_rank": gather(loop.train_peak_memory),
        "peak_memory_reserved_bytes": peak_reserved_bytes(),
        "parameter_bytes": parameter_bytes(engine.module),
        "frozen_parameter_bytes": parameter_bytes(engine.module, frozen=True),
        "peak_host_memory_bytes": peak_host_memory_bytes(),
        "resumed_from": str(recipe.resumed_from) if recipe.resumed_from else None,
    }
    reporter.finish(summary)
    return RunResult(summary, engine.module, recipe.tokenizer)


def objective_summary(recipe: Recipe, state: TrainState, loop: LoopResult,
                      final_eval: dict) -> dict:
    """A preference objective's: its name, DPO's reference, held-out preference accuracy
    before and after, the last step's rewards ({} for SFT, whose summary stays as it was)."""
    if recipe.objective.online:  # GRPO: the last step's rewards and figures
        return {"objective": recipe.objective.name, "reference": recipe.reference.kind,
                **{f"final_{k}": v for k, v in loop.last_step.items()
                   if k in recipe.objective.metrics or k.startswith("reward/")}}
    if not recipe.objective.pairs:
        return {}
    return {"objective": recipe.objective.name, "reference": recipe.reference.kind,
            "preference_accuracy_before": state.preference_accuracy_before,
            "preference_accuracy_after": final_eval.get("preference_accuracy"),
            "pairs_identical_after_truncation": recipe.identical_pairs,
            **{f"final_{k}": v for k, v in loop.last_step.items()
               if k in recipe.objective.metrics}}


def source_summary(recipe: Recipe, final_eval: dict) -> dict:
    """A mixture's examples, tokens and final eval loss per source ({} for one source)."""
    totals = recipe.stream.source_totals()
    if not totals:
        return {}
    per = {kind: {k.split("/", 1)[1]: v for k, v in totals.items() if k.startswith(kind + "/")}
           for kind in ("examples", "tokens")}
    return {"examples_per_source": per["examples"], "tokens_per_source": per["tokens"],
            "eval_loss_per_source": {k.split("/", 1)[1]: v for k, v in final_eval.items()
                                     if k.startswith("eval_loss/")}}


def parameter_bytes(model, frozen: bool = False) -> int:
    """What this rank's parameters hold (a ZeRO-3 or FSDP2 rank: its shards); with `frozen`,
    only those that do not train (a base in bf16 holds 2 bytes a parameter)."""
    return sum(held_here(p).numel() * p.element_size()
               for p in model.parameters() if not (frozen and p.requires_grad))


def due(step: int, every: int) -> bool:
    return bool(every) and step % every == 0


def global_batch_size(cfg: Config, ranks: Ranks) -> int:
    """Rows per optimizer step: the ranks of a sequence-parallel group share theirs."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * ranks.world_size \
        // cfg.parallelism.sequence_parallel


def enable_gradient_checkpointing(model) -> None:
    """Keep only each layer's input in forward and recompute the rest in backward.

    Non-reentrant checkpointing needs no input that requires grad, so it works under frozen
    bases (LoRA, QLoRA) without `enable_input_require_grads`.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' name from 5.25 on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # the GPU image's transformers 5.17 has only the old name
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_context_length(cfg: Config, model) -> None:
    """data.max_seq_len within the model's positions, or model.rope_scaling's factor times
    them."""
    limit = getattr(model.config, "max_position_embeddings", None)
    scaling = cfg.model.rope_scaling
    if limit and scaling and cfg.data.max_seq_len > limit * scaling["factor"]:
        raise DtuneError(
            f"data.max_seq_len={cfg.data.max_seq_len} is longer than "
            f"model.rope_scaling's factor ({scaling['factor']}) times the "
            f"{limit} positions of {cfg.model.name_or_path}; raise the factor or set "
            f"data.max_seq_len<={int(limit * scaling['factor'])}.")
    if limit and not scaling and cfg.data.max_seq_len > limit:
        raise DtuneError(
            f"data.max_seq_len={cfg.data.max_seq_len} is longer than the context of "
            f"{cfg.model.name_or_path} ({limit} positions); set data.max_seq_len<={limit}, or "
            "stretch its positions with RoPE scaling, e.g. model.rope_scaling={rope_type:"
            f"linear,factor:{-(-cfg.data.max_seq_len // limit)}}}."
        )
    check_new_tokens(cfg.eval.max_new_tokens, "eval.max_new_tokens", model,
                     cfg.model.name_or_path)


def planned_steps(cfg: Config, epoch_batches: Optional[int],
                  world_size: int) -> tuple[int, str]:
    """The run's optimizer steps, and what set them: train.max_steps, train.epochs, or with
    both set the one that ends first (one epoch when neither is). `epoch_batches`: the
    micro-batches of one pass (a stream has none: it needs train.max_steps alone)."""
    t = cfg.train
    if t.epochs is None and t.max_steps > 0:
        return t.max_steps, f"train.max_steps={t.max_steps}"
    epochs = t.epochs or 1
    by_epochs = max(epoch_batches // (t.grad_accum_steps * world_size), 1) * epochs
    if 0 < t.max_steps < by_epochs:
        return t.max_steps, (f"train.max_steps={t.max_steps}, before train.epochs={epochs} "
                             f"({by_epochs} steps)")
    return by_epochs, f"train.epochs={epochs}" + (
        f", before train.max_steps={t.max_steps}" if t.max_steps > 0 else "")
