"""The loss plan: how a run's loss reads the LM head, decided once, from the settings and the
model as loaded, by training (train.set_up) and by `dtune eval` alike, so the two score alike.

- `chunk_size` (SFT): the chunked loss takes the LM head and cross-entropy this many
  loss-carrying tokens at a time, computing its gradients in the same pass; 0 is the plain
  loss from the model's full logits.
- `response_head` (preference objectives): each response's log-probs come from the LM head
  applied at its labelled positions only (dtune.loss.sequence_logps), not from full logits.

Both need what the model's own forward computes to be reproducible outside it: a plain LM
head, not sharded (ZeRO-3), whose logits a start-up probe matches.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from dtune.config import DEFAULT_LOSS_CHUNK_SIZE, Config, loss_chunk_size
from dtune.engines import shards_parameters
from dtune.loss import chunked_loss_mismatch, has_plain_lm_head, require_plain_lm_head
from dtune.objectives import objective_spec

log = logging.getLogger("dtune")


@dataclass(frozen=True)
class LossPlan:
    chunk_size: int = 0  # SFT's chunked loss; 0: the model's full logits
    response_head: bool = False  # pairs: the LM head on labelled positions only


def planned_loss(cfg: Config) -> tuple[int, bool]:
    """(chunk size, response head) as the settings decide them, before any model exists
    (dtune/settle.py records them in `settled`): the chunk size as train.loss_chunk_size or
    its default gives it for the engine; a preference objective reads the head at labelled
    positions where a chunked loss could, and has no chunked token sum."""
    chunk = loss_chunk_size(cfg.train, shards_parameters(cfg.parallelism))
    if objective_spec(cfg.objective).pairs:
        return 0, chunk > 0
    return chunk, False


def plan_loss(cfg: Config, engine, tokenizer) -> LossPlan:
    """The settled plan, for `engine`'s model as loaded: a model whose LM head the loss cannot
    read outside its forward pass falls back to full logits, quietly for the default chunk
    size and with an error for one the user set."""
    settled = cfg.settled
    wanted = settled.loss_chunk_size or (DEFAULT_LOSS_CHUNK_SIZE if settled.response_head
                                         else 0)
    if not wanted:
        return LossPlan()
    if cfg.train.loss_chunk_size is None and not has_plain_lm_head(engine.model):
        return LossPlan()
    require_plain_lm_head(engine.model)
    if not checked_chunk_size(engine, tokenizer, wanted):
        return LossPlan()
    return LossPlan(settled.loss_chunk_size, settled.response_head)


def checked_chunk_size(engine, tokenizer, chunk_size: int) -> int:
    """`chunk_size`, or 0 (the plain loss, from the model's own logits) for a model whose
    forward does something to its logits the chunked loss does not reproduce; said once."""
    if not chunk_size:
        return 0
    probe = tokenizer("dtune checks its loss against the model's own logits.",
                      return_tensors="pt")["input_ids"]
    with engine.eval_context():
        # the unwrapped module: a no-grad probe, and `dtune eval`'s Inference has no wrapper
        why = chunked_loss_mismatch(engine.module, engine.to_device({"input_ids": probe})
                                    ["input_ids"])
    if why:
        log.warning("train.loss_chunk_size=%d is not used: %s. The loss comes from the model's "
                    "full logits instead (more memory, the same result).", chunk_size, why)
        return 0
    return chunk_size
