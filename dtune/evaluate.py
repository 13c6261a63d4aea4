"""Held-out loss and exact match by greedy generation."""
from __future__ import annotations

from collections import defaultdict

import torch

from dtune.data.batching import collate, loss_token_count
from dtune.data.formatting import Example, prompt_and_reference
from dtune.loss import summed_token_loss


@torch.no_grad()
def eval_loss(model, examples: list[Example], batch_size: int, pad_id: int) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        total += float(summed_token_loss(model, batch))
        count += loss_token_count(batch)
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             add_special_tokens: bool, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, synced_ranks: bool = False) -> list[str]:
    """Complete each prompt; returns only the new text, special tokens removed.

    `synced_ranks`: every rank generates together (ZeRO-3 gathers weights in each forward),
    each continuing until all are done."""
    was_training = model.training
    model.eval()
    answers: list[str] = []
    pad_id = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
                   for p in prompts[start : start + batch_size]]
        longest = max(map(len, encoded))
        # Left padding keeps every prompt's last token in the last column, where generation starts.
        input_ids = torch.tensor([[pad_id] * (longest - len(e)) + e for e in encoded])
        attention = torch.tensor([[0] * (longest - len(e)) + [1] * len(e) for e in encoded])
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample \
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        output = model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
            pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, **sampling,
            **({"synced_gpus": True} if synced_ranks else {}),
        )
        for row in output[:, longest:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def exact_match(model, tokenizer, records: list[dict], fmt: str, system_prompt: str | None,
                samples: int, max_new_tokens: int, batch_size: int,
                synced_ranks: bool = False) -> dict | None:
    """Share of held-out records whose greedy answer equals the reference, overall and per task."""
    pairs = [(r, prompt_and_reference(r, fmt, tokenizer, system_prompt)) for r in records[:samples]]
    pairs = [(r, pr) for r, pr in pairs if pr is not None]
    if not pairs:
        return None
    answers = generate(model, tokenizer, [pr[0] for _, pr in pairs], max_new_tokens, batch_size,
                       add_special_tokens=fmt != "chat", synced_ranks=synced_ranks)
    hits: dict[str, list[bool]] = defaultdict(list)
    examples = []
    for (record, (_, reference)), answer in zip(pairs, answers):
        ok = answer == reference.strip()
        hits[record.get("task", "all")].append(ok)
        examples.append({"reference": reference, "answer": answer, "correct": ok})
    flat = [ok for oks in hits.values() for ok in oks]
    return {
        "exact_match": sum(flat) / len(flat),
        "by_task": {task: sum(oks) / len(oks) for task, oks in sorted(hits.items())},
        "n": len(flat),
        "examples": examples,
    }
