"""GRPO's pieces (objective=grpo): sampling a group of completions per prompt, scoring them,
group-relative advantages, and the clipped policy-gradient loss with its normalisers.

- GRPO (Shao et al., 2024, DeepSeekMath, eq. 3 and sec. 4.1.2): the advantage of each of the
  G completions of a prompt is its reward minus the group's mean, divided by the group's std;
  the loss is PPO's clipped surrogate, per token, plus beta x KL to a reference (the k3
  estimator: r - log r - 1, r = p_ref / p), averaged over each sequence's tokens, then over
  the sequences (`loss_type=grpo`).
- Dr. GRPO (Liu et al., 2025, "Understanding R1-Zero-like training"): no division by the
  group std (it weighs easy and hard prompts unequally) and no per-sequence length average
  (it biases towards long wrong answers): the token sum divided by a constant, max new
  tokens x sequences (`loss_type=dr_grpo`).
- DAPO (Yu et al., 2025): the token-level loss, summed over every completion token of the
  batch and divided by their count (`loss_type=dapo`), an upper clip `epsilon_high` above the
  lower one (clip-higher), and dynamic sampling: groups whose rewards are all equal carry no
  signal, so they are drawn again (`resample_zero_std_groups`: up to that many more draws of
  the micro-batch, each such group replaced by its first draw with a signal; the same
  prompts, so the data stream and the step count stay as they are) and those still without
  one are dropped from the loss and its normaliser (`skip_zero_std_groups`).

Each loss here is a *sum* over the rows it is given, and `window_normaliser` is the divisor
for the whole window over every rank, found before the first backward: a window of one
micro-batch of G completions and G micro-batches of one give the same loss and gradient, as
the token normaliser does for SFT and the pair normaliser for DPO (dtune/train.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from dtune.data.formatting import IGNORE
from dtune.distributed import all_reduce_max, all_reduce_sums

STD_EPS = 1e-4  # added to the group std: a group of near-equal rewards is not blown up
# The KV cache's name in model outputs and generate's arguments: transformers 5.2x renamed
# past_key_values to cache (the old name still works there, with a warning)
CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} \
    else "past_key_values"


def group_advantages(rewards: torch.Tensor, group: int, scale: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N], zero-std flag per group [N / G]) of rewards [N] laid out in groups of
    `group` consecutive completions of one prompt: reward minus the group mean, divided by
    the group's (sample) std + STD_EPS where `scale` (GRPO, DAPO), not for Dr. GRPO."""
    grouped = rewards.view(-1, group)
    zero = grouped.max(1).values == grouped.min(1).values
    # exactly 0 where the rewards are equal: their float mean may differ from them by an ulp
    centred = torch.where(zero.unsqueeze(1), 0.0, grouped - grouped.mean(1, keepdim=True))
    std = grouped.std(1, keepdim=True) if group > 1 else torch.zeros_like(centred[:, :1])
    advantages = centred / (std + STD_EPS) if scale else centred
    return advantages.reshape(-1), zero


def token_terms(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                epsilon: float, epsilon_high: Optional[float], beta: float = 0.0,
                ref_logps: Optional[torch.Tensor] = None) -> dict:
    """Per-token terms [N, C] of the clipped surrogate: the loss (to be masked and
    normalised), whether the ratio was clipped where it mattered, and the k3 KL estimate."""
    ratio = torch.exp(logps - old_logps)
    high = epsilon if epsilon_high is None else epsilon_high
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    a = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * a, clipped * a)
    loss = -surrogate
    kl = torch.zeros_like(loss)
    if beta and ref_logps is not None:
        log_r = ref_logps - logps
        kl = torch.exp(log_r) - log_r - 1  # k3: unbiased, never negative (Schulman, 2020)
        loss = loss + beta * kl
    was_clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + high) & (a > 0))
    return {"loss": loss, "clipped": was_clipped.float(), "kl": kl.detach()}


def summed_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The numerator of the window's loss over these rows: `grpo` sums each sequence's mean
    token loss; `dr_grpo` and `dapo` sum every token's loss (their divisors differ)."""
    masked = (per_token * mask).sum(1)
    if loss_type == "grpo":
        return (masked / mask.sum(1).clamp(min=1)).sum()
    return masked.sum()


def window_normaliser(loss_type: str, sequences: int, tokens: int, max_new_tokens: int) -> int:
    """The divisor of the window's summed loss, over every micro-batch and rank: sequences
    (`grpo`), max new tokens x sequences (`dr_grpo`), completion tokens (`dapo`)."""
    if loss_type == "grpo":
        return max(sequences, 1)
    if loss_type == "dr_grpo":
        return max(max_new_tokens * sequences, 1)
    return max(tokens, 1)


# --- prompts, sampling and the rollout ------------------------------------------------------

def prompts_and_answers(batch: dict, tokenizer) -> tuple[list[list[int]], list[Optional[str]]]:
    """Each row's prompt (its tokens before the first labelled one: the chat template's
    generation prompt included) and reference answer (its labelled tokens as text, special
    tokens dropped), from the host copy of an SFT micro-batch."""
    prompts, answers = [], []
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                 batch["attention_mask"].tolist()):
        labelled = [i for i, label in enumerate(labels) if label != IGNORE]
        first = labelled[0] if labelled else sum(mask)
        prompts.append(ids[:first])
        answers.append(tokenizer.decode([ids[i] for i in labelled], skip_special_tokens=True)
                       .strip() if labelled else None)
    return prompts, answers


@dataclass
class Rollout:
    """One micro-batch of prompts with G sampled completions each, on the host. Rows are
    grouped: rows g*G .. g*G+G-1 complete prompt g."""

    input_ids: torch.Tensor  # [N, P + C]: left-padded prompt, then the completion
    attention_mask: torch.Tensor  # [N, P + C]
    position_ids: torch.Tensor  # [N, P + C]: as generation numbered them (left padding)
    completion_mask: torch.Tensor  # [N, C] float: the completion's tokens, its EOS included
    completions: list  # the completions' text
    answers: list  # the reference answer of each row (None where none)
    advantages: Optional[torch.Tensor] = None  # [N]
    rewards: Optional[dict] = None  # reward name -> [N] values; "total": the weighted sum
    keep: Optional[torch.Tensor] = None  # [N] float: 0 for a dropped zero-signal group
    zero_std: Optional[torch.Tensor] = None  # [N / G] bool: the group's rewards all equal
    old_logps: Optional[torch.Tensor] = None  # [N, C] on the device, for num_iterations > 1
    resampled: int = 0  # groups replaced by a later draw of theirs (`refilled`)

    @property
    def width(self) -> int:
        return self.completion_mask.size(1)

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (longest - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows],
                        dtype=torch.long)
    return ids, mask


def completion_mask(completion: torch.Tensor, eos_id) -> torch.Tensor:
    """1 for each generated token up to and including the first EOS; 0 after it (the
    padding generation adds once a row is done, which may be the EOS id itself)."""
    eos_ids = torch.tensor(eos_id if isinstance(eos_id, list) else [eos_id])
    is_eos = torch.isin(completion, eos_ids)
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return (~after_eos).float()


@torch.no_grad()
def sample_seed(train_seed: int, step: int, place: int, draw: int = 0) -> int:
    """The seed of one draw of completions: the run's seed, the step, the micro-batch's place
    in the global window and the draw (0, then each redraw), hashed together. Hashed, not
    laid out in bit fields: torch's CPU generator keeps only a seed's low 32 bits, so seeds
    that differ above them would draw the very same samples."""
    key = f"{train_seed}:{step}:{place}:{draw}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % 2**63


def sample_group(engine, tokenizer, prompts: list[list[int]], answers: list, group: int,
                 max_new_tokens: int, temperature: float, top_p: float, seed: int) -> Rollout:
    """G completions of each prompt, sampled with the KV cache in eval mode, the global
    generators seeded by `seed` (the step and the micro-batch's place in the window), so a
    resumed run draws the samples the uninterrupted one drew. Returns the rollout on the
    host (its text is needed there)."""
    model = engine.module
    was_training = model.training
    model.eval()
    rows = [p for p in prompts for _ in range(group)]
    prompt_ids, prompt_mask = left_pad(rows, tokenizer.pad_token_id)
    torch.manual_seed(seed)  # CPU and every GPU: sampling draws from the global generators
    try:
        with engine.eval_context():
            output = model.generate(
                **engine.to_device({"input_ids": prompt_ids, "attention_mask": prompt_mask}),
                **{CACHE: shared_prompt_cache(engine, prompts, group, tokenizer.pad_token_id)},
                max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                top_p=top_p, top_k=0,  # 0: no top-k cut (the model's config may set one)
                use_cache=True, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **({"synced_gpus": True} if engine.synced_forward else {}))
    finally:
        model.train(was_training)
    completion = output[:, prompt_ids.size(1):].cpu()  # the one read: text is needed here
    mask = completion_mask(completion, tokenizer.eos_token_id)
    attention = torch.cat([prompt_mask, mask.long()], 1)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True).strip()
             for ids, m in zip(completion, mask)]
    return Rollout(torch.cat([prompt_ids, completion], 1), attention, positions, mask, texts,
                   [a for a in answers for _ in range(group)])


@torch.no_grad()
def shared_prompt_cache(engine, prompts: list[list[int]], group: int, pad_id: int):
    """The KV cache of each prompt's tokens but its last, computed once per prompt and
    repeated for its G rows, for `generate` to go on from: the G completions of a prompt
    share its prefix, so the prompt is read once, not G times (at G=8 the prompt's forward
    is an eighth of what it was). Generation then reads only the last prompt token of each
    row (it needs that position's logits) and decodes. None (generate reads every prompt
    token) where nothing is shared: G=1, one-token prompts, a soft prompt (prompt or prefix
    tuning: PEFT puts its own virtual tokens or prefix cache before the prompt), or a cache
    that cannot repeat."""
    ids, mask = left_pad(prompts, pad_id)
    soft = getattr(getattr(engine.module, "active_peft_config", None), "is_prompt_learning",
                   False)
    if group == 1 or ids.size(1) < 2 or soft:
        return None
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # as generate numbers left-padded rows
    prefix = engine.to_device({"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1],
                               "position_ids": positions[:, :-1]})
    cache = engine.module(**prefix, use_cache=True)[CACHE]
    if not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(group)
    return cache


def score(rollout: Rollout, terms, group: int, max_new_tokens: int, scale: bool,
          skip_zero_std: bool) -> None:
    """Rewards (each term's and their weighted total), advantages and which rows train."""
    lengths = rollout.completion_mask.sum(1).long().tolist()
    rewards = {t.name: torch.tensor(t.score(rollout.completions, rollout.answers, lengths,
                                            max_new_tokens), dtype=torch.float64)
               for t in terms}
    total = sum(t.weight * rewards[t.name] for t in terms)
    rewards["total"] = total
    rollout.rewards = rewards
    rollout.advantages, rollout.zero_std = group_advantages(total, group, scale)
    rollout.keep = (~rollout.zero_std).double().repeat_interleave(group) if skip_zero_std \
        else torch.ones_like(total)


def widened(rollout: Rollout, width: int, pad_id: int) -> Rollout:
    """`rollout` with its completions padded on the right to `width` tokens (masked out, as
    generation's own padding after an EOS is)."""
    extra = width - rollout.width
    if extra == 0:
        return rollout
    ids = torch.cat([rollout.input_ids, rollout.input_ids.new_full(
        (rollout.input_ids.size(0), extra), pad_id)], 1)
    attention = torch.cat([rollout.attention_mask,
                           rollout.attention_mask.new_zeros((ids.size(0), extra))], 1)
    mask = torch.cat([rollout.completion_mask,
                      rollout.completion_mask.new_zeros((ids.size(0), extra))], 1)
    return dataclasses.replace(rollout, input_ids=ids, attention_mask=attention,
                               position_ids=(attention.cumsum(1) - 1).clamp(min=0),
                               completion_mask=mask)


def refilled(rollout: Rollout, fresh: Rollout, group: int, pad_id: int) -> Rollout:
    """`rollout` (scored) with each group that had no signal replaced by the same prompt's
    group in `fresh` (a new draw of the same prompts, scored) where that one has a signal;
    to be scored again. Counts the groups replaced in `resampled`."""
    take = rollout.zero_std & ~fresh.zero_std
    width = max(rollout.width, fresh.width)
    old, new = widened(rollout, width, pad_id), widened(fresh, width, pad_id)
    rows = take.repeat_interleave(group)

    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(rows.view(-1, *[1] * (a.dim() - 1)), b, a)

    return Rollout(pick(old.input_ids, new.input_ids),
                   pick(old.attention_mask, new.attention_mask),
                   pick(old.position_ids, new.position_ids),
                   pick(old.completion_mask, new.completion_mask),
                   [b if r else a for a, b, r in zip(old.completions, new.completions,
                                                      rows.tolist())],
                   old.answers, resampled=rollout.resampled + int(take.sum()))


def trained_rows(rollout: Rollout, beta: float) -> Rollout:
    """The rows of a scored `rollout` whose loss has a gradient, cut to the columns they use,
    for the update's forward and backward to skip the rest. A dropped group's rows (keep 0)
    never train; without the KL term (beta 0) neither does a row whose advantage is 0 (its
    surrogate is ratio x 0, in every iteration), which is each row of a group whose rewards
    were all equal. Skipping them changes neither the loss nor the gradient (the window's
    normalisers count them before, from the whole rollouts), only the work: at most steps
    most groups have no signal. One row stays where none trains, so every rank runs the
    same forwards and backwards (DDP reduces gradients in the last backward; ZeRO-3 and
    FSDP2 gather weights in each forward)."""
    live = rollout.keep > 0
    if not beta:
        live &= rollout.advantages != 0
    rows = live.nonzero().flatten() if bool(live.any()) else torch.tensor([0])
    mask = rollout.completion_mask[rows]
    width = int(mask.nonzero()[:, 1].max()) + 1 if bool(mask.any()) else 1
    attention = rollout.attention_mask[rows]
    first = int(attention.any(0).nonzero()[0])  # the columns left of it are all padding
    end = attention.size(1) - rollout.width + width
    pick = rows.tolist()
    return dataclasses.replace(
        rollout, input_ids=rollout.input_ids[rows, first:end],
        attention_mask=attention[:, first:end],
        position_ids=rollout.position_ids[rows, first:end], completion_mask=mask[:, :width],
        completions=[rollout.completions[i] for i in pick],
        answers=[rollout.answers[i] for i in pick],
        advantages=rollout.advantages[rows], keep=rollout.keep[rows],
        rewards={k: v[rows] for k, v in rollout.rewards.items()},
        zero_std=None, old_logps=None)


def window_counts(rollouts: list[Rollout], trained: list[Rollout]) -> dict:
    """What the window's rollouts hold over every rank, from their host copies in one
    collective (and one for the longest completion): the completions and completion tokens
    that train (the normalisers), every token of the rollouts (prompts and completions),
    the rows the update runs on (`trained`, their `trained_rows`), and the step's reward,
    advantage and length figures."""
    names = list(rollouts[0].rewards)
    rewards = {n: torch.cat([r.rewards[n] for r in rollouts]) for n in names}
    advantages = torch.cat([r.advantages for r in rollouts])
    lengths = torch.cat([r.completion_mask.sum(1).double() for r in rollouts])
    keep = torch.cat([r.keep for r in rollouts])
    zero = torch.cat([r.zero_std for r in rollouts])
    local = [float(keep.sum()), float((lengths * keep).sum()), float(len(zero)),
             float(zero.sum()), float(len(lengths)), float(lengths.sum()),
             float(advantages.pow(2).sum()), float(advantages.abs().sum()),
             float(sum(int(r.attention_mask.sum()) for r in rollouts)),
             float(sum(r.resampled for r in rollouts)),
             float(sum(len(t.advantages) for t in trained))]
    for n in names:
        local += [float(rewards[n].sum()), float(rewards[n].pow(2).sum())]
    summed = all_reduce_sums(local)
    kept, tokens, groups, zero_groups, rows, length_sum, adv_sq, adv_abs, seen, resampled, \
        updated = summed[:11]
    metrics = {"groups": groups, "zero_std_groups": zero_groups, "resampled_groups": resampled,
               "update_rows": updated,
               "completion_length/mean": length_sum / rows,
               "completion_length/max": all_reduce_max(float(lengths.max())),
               "advantage/std": math.sqrt(adv_sq / rows), "advantage/abs_mean": adv_abs / rows}
    for i, n in enumerate(names):
        total, squares = summed[11 + 2 * i], summed[12 + 2 * i]
        key = "reward" if n == "total" else f"reward/{n}"
        mean = total / rows
        metrics[f"{key}/mean"] = mean
        metrics[f"{key}/std"] = math.sqrt(max(squares / rows - mean * mean, 0.0))
    return {"sequences": int(kept), "tokens": int(tokens), "rollout_tokens": int(seen),
            "metrics": metrics}


def completion_logps(model, inputs: dict, width: int, temperature: float = 1.0) -> torch.Tensor:
    """[N, C] fp32 log-prob of each completion token under `model` at the sampling
    `temperature` (the policy the completions were drawn from, so the ratio to it is 1 before
    an update). Only the last C + 1 positions' logits are computed (`logits_to_keep`): the
    prompt's are never needed."""
    out = model(**inputs, use_cache=False, logits_to_keep=width + 1)
    logits = out.logits[:, -width - 1:-1].float() / temperature
    targets = inputs["input_ids"][:, -width:]
    return -F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                            reduction="none").view(targets.shape)
