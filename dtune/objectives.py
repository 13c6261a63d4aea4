"""Objectives: one spec each, read by config validation, the training step, `dtune check` and
the README.

`sft` is next-token cross-entropy over response tokens (dtune/loss.py). The preference
objectives train on pairs: a micro-batch holds n chosen responses (rows 0..n-1) and the n
rejected responses of the same prompts (rows n..2n-1), so one forward scores both. Each
preference loss takes the per-sequence summed log-probs (and response token counts, for
length normalisation) and returns the loss and its metrics *summed over the pairs*: the
training step divides once by the pair count of the whole window across every rank, so
gradient accumulation and data parallelism give the update of one big batch (8 x 1 = 1 x 8),
as the token-count normaliser does for SFT. Every term is per pair, ORPO's SFT term included
(the length-averaged NLL of each chosen response, as in Hong et al., eq. 2 and 6), so no term
is a mean of means.

torch is imported inside the functions, deliberately: config validation reads these specs
before anything heavy is loaded (as with dtune/methods.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from dtune.config import ObjectiveConfig

if TYPE_CHECKING:
    import torch

# The metrics every preference objective reports, each a sum over pairs (divided by the
# window's pair count for the step record). rewards/*: the implicit rewards (DPO: beta x the
# log-ratio to the reference; ORPO and SimPO: beta x the length-averaged log-prob);
# logps/*: the policy's summed log-prob of the response.
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
                "logps/chosen", "logps/rejected")


# GRPO's step metrics (train.grpo_step), besides reward/<name>/mean and /std per reward:
# advantage spread, completion length, the share of tokens whose ratio was clipped, the KL
# to the reference (beta > 0), groups with no signal (all rewards equal), the rows the update
# ran on (those with a gradient, grpo.trained_rows), and the time spent generating and training.
GRPO_METRICS = ("reward/mean", "reward/std", "advantage/std", "advantage/abs_mean",
                "completion_length/mean", "completion_length/max", "clip_fraction", "kl",
                "zero_std_groups", "resampled_groups", "groups", "update_rows",
                "generation_time_s", "update_time_s")


@dataclass
class PairLogps:
    """Per-pair sequence log-probs ([n] tensors): the policy's, with grad, and the reference's
    (DPO only), without."""

    chosen: torch.Tensor  # summed log-prob of each chosen response
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor  # response tokens of each (float)
    rejected_tokens: torch.Tensor
    ref_chosen: Optional[torch.Tensor] = None
    ref_rejected: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    what: str  # what it optimises, in words (the README's table)
    fields: frozenset  # the ObjectiveConfig fields it reads
    pairs: bool = True  # trains on chosen/rejected pairs (data.format=preference)
    reference: bool = False  # needs reference log-probs (a reference model)
    # (PairLogps, ObjectiveConfig) -> (loss summed over pairs, {metric: sum over pairs})
    loss: Optional[Callable] = None
    metrics: tuple = ()  # the metric names `loss` returns
    # samples its own completions and learns from their rewards (GRPO: dtune/grpo.py, the
    # step train.grpo_step); trains on prompts with reference answers, not on pairs
    online: bool = False
    # the conf/data group of built-in data it trains on (`dtune check objective=...`)
    builtin_data: str = "builtin_preference"


def reward_metrics(chosen_rewards, rejected_rewards, logps: PairLogps) -> dict:
    """The metrics every preference objective reports, summed over the pairs, detached."""
    rc, rr = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": rc.sum(), "rewards/rejected": rr.sum(),
            "rewards/accuracy": (rc > rr).float().sum(), "rewards/margin": (rc - rr).sum(),
            "logps/chosen": logps.chosen.detach().sum(),
            "logps/rejected": logps.rejected.detach().sum()}


def dpo_loss(logps: PairLogps, cfg: ObjectiveConfig):
    """DPO (Rafailov et al., 2023): -log sigmoid(beta * h), h = the chosen response's log-ratio
    to the reference minus the rejected one's; with label smoothing e (cDPO) the loss is
    -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h). IPO (Azar et al., 2023, eq. 17):
    (h - 1 / (2 beta))^2, on the summed log-probs as in the paper."""
    import torch.nn.functional as F

    chosen_ratio = logps.chosen - logps.ref_chosen
    rejected_ratio = logps.rejected - logps.ref_rejected
    h = chosen_ratio - rejected_ratio
    if cfg.loss_type == "ipo":
        losses = (h - 1 / (2 * cfg.beta)) ** 2
    else:
        e = cfg.label_smoothing
        losses = -(1 - e) * F.logsigmoid(cfg.beta * h) - e * F.logsigmoid(-cfg.beta * h)
    return losses.sum(), reward_metrics(cfg.beta * chosen_ratio, cfg.beta * rejected_ratio,
                                        logps)


def log1mexp(x):
    """log(1 - exp(x)) for x < 0. One branch only: torch.where over two would give NaN
    gradients from the branch it discards. Clamped below 0, where the odds are infinite."""
    import torch

    return torch.log(-torch.expm1(x.clamp(max=-1e-7)))


def orpo_loss(logps: PairLogps, cfg: ObjectiveConfig):
    """ORPO (Hong et al., 2024): the chosen response's NLL (length-averaged, per pair) plus
    beta x -log sigmoid(log odds ratio), the odds taken of the length-averaged
    log-probs: log odds(y) = log p - log(1 - p) with log p the mean token log-prob."""
    import torch.nn.functional as F

    mean_chosen = logps.chosen / logps.chosen_tokens
    mean_rejected = logps.rejected / logps.rejected_tokens
    log_odds = (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))
    nll = -mean_chosen
    losses = nll - cfg.beta * F.logsigmoid(log_odds)
    metrics = reward_metrics(cfg.beta * mean_chosen, cfg.beta * mean_rejected, logps)
    metrics.update({"log_odds_ratio": log_odds.detach().sum(), "nll": nll.detach().sum()})
    return losses.sum(), metrics


def simpo_loss(logps: PairLogps, cfg: ObjectiveConfig):
    """SimPO (Meng et al., 2024): -log sigmoid(beta / |y_w| log p(y_w) - beta / |y_l|
    log p(y_l) - gamma): length-normalised rewards, a target margin, no reference."""
    import torch.nn.functional as F

    chosen_rewards = cfg.beta * logps.chosen / logps.chosen_tokens
    rejected_rewards = cfg.beta * logps.rejected / logps.rejected_tokens
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - cfg.gamma)
    return losses.sum(), reward_metrics(chosen_rewards, rejected_rewards, logps)


OBJECTIVES: dict[str, ObjectiveSpec] = {spec.name: spec for spec in (
    ObjectiveSpec("sft", "next-token cross-entropy on the response tokens", frozenset(),
                  pairs=False, builtin_data="builtin"),
    ObjectiveSpec("dpo", "prefer chosen over rejected relative to a reference model (DPO; "
                  "`loss_type=ipo`: IPO)", frozenset({"beta", "loss_type", "label_smoothing",
                                                      "reference"}),
                  reference=True, loss=dpo_loss, metrics=PAIR_METRICS),
    ObjectiveSpec("orpo", "SFT on chosen plus an odds-ratio penalty on rejected, no reference",
                  frozenset({"beta"}), loss=orpo_loss,
                  metrics=PAIR_METRICS + ("log_odds_ratio", "nll")),
    ObjectiveSpec("simpo", "length-normalised log-prob margin with a target `gamma`, no "
                  "reference", frozenset({"beta", "gamma"}), loss=simpo_loss,
                  metrics=PAIR_METRICS),
    ObjectiveSpec("grpo", "online RL from verifiable rewards: G sampled completions per "
                  "prompt, group-relative advantages, clipped policy gradient (GRPO; "
                  "`loss_type=dr_grpo`: Dr. GRPO; `loss_type=dapo`: DAPO's token loss)",
                  frozenset({"beta", "loss_type", "num_generations", "temperature", "top_p",
                             "max_new_tokens", "num_iterations", "epsilon", "epsilon_high",
                             "rewards", "skip_zero_std_groups",
                             "resample_zero_std_groups"}),
                  pairs=False, metrics=GRPO_METRICS, online=True, builtin_data="builtin_rl"),
)}


def objective_spec(cfg: ObjectiveConfig) -> ObjectiveSpec:
    return OBJECTIVES[cfg.name]


def pair_loss(cfg: ObjectiveConfig, logps, tokens, ref_logps=None):
    """The objective's loss and metrics, summed over the n pairs of a micro-batch, from
    `logps` and `tokens` ([2n]: chosen rows, then rejected) and the reference's `ref_logps`
    ([2n], or None without a reference)."""
    n = logps.shape[0] // 2
    ref = (None, None) if ref_logps is None else (ref_logps[:n], ref_logps[n:])
    pair = PairLogps(logps[:n], logps[n:], tokens[:n], tokens[n:], *ref)
    return OBJECTIVES[cfg.name].loss(pair, cfg)


def resolve_reference(objective: ObjectiveConfig, adapter: bool, streaming: bool
                      ) -> tuple[str, str]:
    """(the reference DPO uses, why): `objective.reference` itself unless `auto`, which
    picks the least memory: an adapter method's own base (adapters disabled, no copy); for
    full fine-tuning, log-probs precomputed in one pass (a stream has no end to pass over:
    a frozen copy then)."""
    if objective.reference != "auto":
        return objective.reference, "objective.reference says so"
    if adapter:
        return "adapter_disabled", ("the method trains adapters, so the base with adapters "
                                    "disabled is the reference, with no second copy")
    if streaming:
        return "frozen_copy", ("full fine-tuning of streamed data (no end to precompute "
                               "over) needs a frozen copy of the starting weights")
    return "precomputed", ("full fine-tuning: reference log-probs computed once before "
                           "training take the least memory (no second copy)")
