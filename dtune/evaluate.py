"""Held-out loss and exact match by greedy generation, shared across the ranks of a run.

Each rank takes its share of the examples and the results are summed over ranks. Under
ZeRO-3 every forward needs every rank (each gathers the sharded weights), so the ranks step
through the same number of batches, a rank without examples left running a discarded one.
The functions take an engine (dtune/engines) or an `Inference` for a model loaded by a tool.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from dtune.data import HeldOut
from dtune.data.batching import collate, loss_token_count
from dtune.data.formatting import prompt_and_reference
from dtune.distributed import Ranks, all_reduce_sum, gather
from dtune.engines.base import move_batch
from dtune.errors import DtuneError
from dtune.loss import sequence_logps, summed_token_loss
from dtune.progress import WorkProgress


@dataclass
class Inference:
    """What evaluation needs of an engine, for a model loaded outside training (`dtune eval`,
    `generate`): the model on this process's device, one rank."""

    module: torch.nn.Module
    device: torch.device
    ranks: Ranks = field(default_factory=Ranks)
    synced_forward: bool = False

    @classmethod
    def place(cls, model) -> "Inference":
        quantized = getattr(model, "is_loaded_in_4bit", False) or \
            getattr(model, "is_loaded_in_8bit", False)
        if torch.cuda.is_available() and not quantized:
            model.to("cuda")
        return cls(model, next(model.parameters()).device)

    @property
    def model(self) -> torch.nn.Module:  # what a training engine calls forward on
        return self.module

    def to_device(self, batch: dict) -> dict:
        return move_batch(batch, self.device)

    def eval_context(self):
        return contextlib.nullcontext()


def my_batches(count: int, batch_size: int, ranks: Ranks, lockstep: bool) -> list[list[int]]:
    """This rank's batches of item indices (rank r takes items r, r + world, ...). With
    `lockstep` every rank gets the same number of batches, some possibly empty."""
    mine = list(range(ranks.rank, count, ranks.world_size))
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    if lockstep:
        per_rank = -(-count // ranks.world_size)
        batches += [[] for _ in range(-(-per_rank // batch_size) - len(batches))]
    return batches


@torch.no_grad()
def eval_loss_sum(engine, examples, batch_size: int, pad_id: int) -> tuple[float, int]:
    """(summed next-token loss, loss-carrying tokens) of `examples`, over every rank: several
    eval sets (a mixture's sources) combine into one mean by adding these."""
    model = engine.module
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for indices in my_batches(len(examples), batch_size, engine.ranks, engine.synced_forward):
        batch = collate([examples[i] for i in (indices or [0])], pad_id)
        tokens = loss_token_count(batch) if indices else 0  # counted on the host copy
        with engine.eval_context():
            loss = summed_token_loss(model, engine.to_device(batch))
        if indices:
            total, count = total + float(loss), count + tokens
    model.train(was_training)
    return all_reduce_sum(total), int(all_reduce_sum(count))


def check_new_tokens(value: int, setting: str, model, name) -> None:
    """Refuse a generation length beyond the model's context (`max_position_embeddings`): no
    answer can be longer, and generating toward it would run for hours."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and value > limit:
        raise DtuneError(
            f"{setting}={value} is longer than the context of {name} ({limit} positions): no "
            "answer can be that long, and generating toward it would run until killed. Set "
            f"{setting}<={limit} (an exact-match answer needs a few dozen tokens).")


@torch.no_grad()
def generate(engine, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             add_special_tokens: bool, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0) -> list[str]:
    """Complete each prompt; returns only the new text, special tokens removed. Under ZeRO-3
    every rank generates together (`synced_gpus`), each continuing until all are done."""
    model = engine.module
    was_training = model.training
    model.eval()
    answers: list[str] = []
    pad_id = tokenizer.pad_token_id
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
                   for p in prompts[start : start + batch_size]]
        longest = max(map(len, encoded))
        # Left padding keeps every prompt's last token in the last column, where generation starts.
        batch = engine.to_device({
            "input_ids": torch.tensor([[pad_id] * (longest - len(e)) + e for e in encoded]),
            "attention_mask": torch.tensor([[0] * (longest - len(e)) + [1] * len(e)
                                            for e in encoded])})
        with engine.eval_context():
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id, **sampling,
                **({"synced_gpus": True} if engine.synced_forward else {}))
        for row in output[:, longest:].cpu():
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def exact_match(engine, tokenizer, records: list[dict], fmt: str, system_prompt: str | None,
                samples: int, max_new_tokens: int, batch_size: int,
                what: str = "Exact match") -> dict | None:
    """Share of held-out records whose greedy answer equals the reference, overall and per task.
    `examples` holds every record's reference and verdict, and the answer where this rank
    generated it (None for another rank's). Rank 0 shows the prompts answered as `what`."""
    pairs = [(r, prompt_and_reference(r, fmt, tokenizer, system_prompt)) for r in records[:samples]]
    pairs = [(r, pr) for r, pr in pairs if pr is not None]
    if not pairs:
        return None
    answers: dict[int, str] = {}
    # minutes on a real model with nothing else to show; rank 0's share stands for every rank's
    world = engine.ranks.world_size
    progress = WorkProgress(what, len(pairs), "prompts", show=engine.ranks.is_main,
                            step=batch_size * world)
    try:
        for indices in my_batches(len(pairs), batch_size, engine.ranks, engine.synced_forward):
            prompts = [pairs[i][1][0] for i in (indices or [0])]
            answers.update(zip(indices, generate(engine, tokenizer, prompts, max_new_tokens,
                                                 batch_size, add_special_tokens=fmt != "chat")))
            progress.advance(len(indices) * world)
        progress.advance(len(pairs))  # every rank's share is done
    finally:
        progress.close()
    # Each rank scores its own answers; only (index, correct) numbers cross between ranks.
    mine = torch.tensor([(i, answer == pairs[i][1][1].strip()) for i, answer in answers.items()],
                        dtype=torch.float64).reshape(-1, 2)
    hits: dict[str, list[bool]] = defaultdict(list)
    examples = []
    for index, ok in sorted((int(i), bool(ok)) for part in gather(mine) for i, ok in part.tolist()):
        record, (_, reference) = pairs[index]
        hits[record.get("task", "all")].append(ok)
        # another rank's answer text stays on that rank
        examples.append({"reference": reference, "answer": answers.get(index), "correct": ok})
    flat = [ok for oks in hits.values() for ok in oks]
    return {
        "exact_match": sum(flat) / len(flat),
        "by_task": {task: sum(oks) / len(oks) for task, oks in sorted(hits.items())},
        "n": len(flat),
        "examples": examples,
    }


@torch.no_grad()
def pair_logps(engine, stream, response_head: bool = False) -> torch.Tensor:
    """[pairs, 2] float64: the summed log-prob of every pair's chosen and rejected response
    under the model as it is now (eval mode), row i for example index i, over every rank.

    One epoch of `stream` (a preference batch stream: rows 0..n-1 chosen, n..2n-1 rejected,
    `pair_index` naming each pair), drawn from its start and put back where it was. Every
    rank steps through the same number of micro-batches (ZeRO-3 needs each in every forward);
    a pair the last window draws twice is kept once, so nothing is counted twice."""
    model = engine.module
    was_training = model.training
    model.eval()
    saved = stream.state_dict()
    stream.load_state_dict({**saved, "epoch": 0, "cursor": 0})
    rows = [torch.zeros((0, 3), dtype=torch.float64)]
    for _ in range(-(-stream.batches_per_epoch // stream.world_size)):
        for batch in stream.next_window(1):
            with engine.eval_context():
                logps = sequence_logps(model, engine.to_device(batch), response_head).double().cpu()
            n = len(batch["pair_index"])
            rows.append(torch.stack([batch["pair_index"].double(), logps[:n], logps[n:]], 1))
    stream.load_state_dict(saved)
    model.train(was_training)
    table = torch.full((len(stream.examples), 2), float("nan"), dtype=torch.float64)
    for part in reversed(gather(torch.cat(rows))):  # where two ranks scored a pair, rank 0's
        table[part[:, 0].long()] = part[:, 1:]
    return table


def preference_accuracy(engine, streams: list, response_head: bool = False) -> float | None:
    """Held-out preference accuracy: the share of eval pairs whose chosen response has a
    higher summed log-prob under the policy than the rejected one. The policy's own
    likelihoods, not DPO's implicit reward: it needs no reference (so it means the same for
    every objective) and is not a tie at step 0, where the policy is its own reference.
    `response_head`: see dtune.loss.sequence_logps."""
    tables = [pair_logps(engine, s, response_head) for s in streams]
    table = torch.cat(tables) if tables else torch.zeros((0, 2), dtype=torch.float64)
    table = table[~torch.isnan(table[:, 0])]
    return float((table[:, 0] > table[:, 1]).double().mean()) if len(table) else None


def held_out_figures(engine, tokenizer, held: HeldOut, response_head: bool, batch_size: int,
                     system_prompt: str | None, exact_match_samples: int, max_new_tokens: int,
                     what: str = "Exact match") -> tuple[dict, int]:
    """The held-out figures of the model `engine` holds, as training records them and
    `dtune eval` writes them (one path, so the two cannot drift), and how many prompts or
    pairs were scored: preference accuracy for pairs; else the loss (one mean over every
    eval token, and per set for several) and exact match of the first
    `exact_match_samples` records. Shared across every rank."""
    if held.pairs is not None:  # pairs have no exact match or token loss: their accuracy
        accuracy = preference_accuracy(engine, held.pairs, response_head)
        scored = sum(len(stream.examples) for stream in held.pairs)
        return ({} if accuracy is None else {"preference_accuracy": accuracy}), scored
    pad_id, record = tokenizer.pad_token_id, {}
    sums = {name: eval_loss_sum(engine, examples, batch_size, pad_id)
            for name, examples in held.examples.items() if len(examples)}
    if sums:
        record["eval_loss"] = sum(t for t, _ in sums.values()) / \
            max(sum(c for _, c in sums.values()), 1)
    if len(held.examples) > 1:
        record.update({f"eval_loss/{name}": t / max(c, 1) for name, (t, c) in sums.items()})
    em = exact_match(engine, tokenizer, held.records, held.fmt, system_prompt,
                     exact_match_samples, max_new_tokens, batch_size, what=what) \
        if exact_match_samples else None
    if em is None:
        return record, 0
    record["exact_match"] = em["exact_match"]
    record.update({f"exact_match/{t}": v for t, v in em["by_task"].items()})
    return record, em["n"]
