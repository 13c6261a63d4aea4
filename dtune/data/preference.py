"""Preference pairs (data.format=preference): one prompt, a chosen and a rejected response,
tokenized as two sequences that share the prompt and carry loss on their response only.

A row gives its prompt as `prompt` (a string) or as chat `messages` ending in a user turn.
With a chat template, the prompt renders as those turns plus the template's assistant header,
and each response as the assistant turn that follows: the template's end-of-turn (and EOS,
where it writes one) belongs to the response, so the model is scored on stopping too.
Without a template the sequence is prompt + response + EOS, joined as written.
"""
from __future__ import annotations

from dataclasses import dataclass

from dtune.data.formatting import CHARS_PER_TOKEN, IGNORE, Example, _chat, _with_system
from dtune.errors import DtuneError

SIDES = ("chosen", "rejected")


@dataclass
class PairExample:
    chosen: Example
    rejected: Example

    @property
    def length(self) -> int:
        """The longer sequence's length: what the pair costs in a padded batch."""
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


def bound_pair(record: dict, max_seq_len: int) -> dict:
    """The record with at most about 2 * max_seq_len * CHARS_PER_TOKEN characters of prompt,
    its end kept, and as many of each response, its start kept. Like formatting.bound_record:
    a 100 MB row costs no more than a normal one, and what is cut lies beyond what truncation
    keeps (so many characters hold more than max_seq_len tokens: a cut response is always cut
    again by tokens, and its template closing or EOS never enters the window)."""
    budget = 2 * max_seq_len * CHARS_PER_TOKEN
    bounded = dict(record)
    if isinstance(record.get("prompt"), str):
        bounded["prompt"] = record["prompt"][-budget:]
    elif record.get("messages"):
        kept, left = [], budget
        # The last messages: the prompt's end is what truncation keeps.
        for message in reversed(record["messages"][-max_seq_len:]):
            if left <= 0:
                break
            content = message.get("content") or ""
            kept.append({**message, "content": content[-max(left, 1):]})
            left -= len(content)
        bounded["messages"] = kept[::-1]
    for side in SIDES:
        bounded[side] = record[side][:budget]
    return bounded


def render_side(record: dict, response: str, tokenizer,
                system_prompt: str | None = None) -> tuple[str, int]:
    """(the text of prompt + `response`, the character where the response starts)."""
    if getattr(tokenizer, "chat_template", None):
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        messages = _with_system(messages, system_prompt)
        before = _chat(tokenizer, messages, add_generation_prompt=True)
        text = _chat(tokenizer, messages + [{"role": "assistant", "content": response}],
                     add_generation_prompt=False)
        if not text.startswith(before):
            raise DtuneError(
                "the tokenizer's chat template renders the assistant turn without the prompt "
                "it renders for generation in front of it, so dtune cannot tell the response "
                "tokens of a preference pair; use a tokenizer with a standard template (e.g. "
                "data.chat_template=chatml) or give plain `prompt` strings without a template.")
        return text, len(before)
    if record.get("messages"):
        raise DtuneError(
            "data.format=preference: the rows give their prompt as chat `messages`, which need "
            "a chat template, and this model's tokenizer has none (data.chat_template is "
            "unset); set one, e.g. data.chat_template=chatml (bundled: chatml, llama3, zephyr), "
            "or give each prompt as a `prompt` string.")
    return record["prompt"] + response + (tokenizer.eos_token or ""), len(record["prompt"])


def _split(tokenizer, text: str, boundary: int, plain: bool) -> tuple[list, list, list, bool]:
    """(prompt ids, response ids, response labels, whether the first id is a special token
    the tokenizer added, such as BOS) of `text`, split where the response's text starts."""
    encoded = tokenizer(text, add_special_tokens=plain, return_offsets_mapping=True,
                        truncation=False)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    # A token that straddles the boundary belongs to the prompt: it was not all response.
    first = next((i for i, (s, e) in enumerate(offsets) if s >= boundary and e > s), len(ids))
    labels = [t if e > s else IGNORE for t, (s, e) in zip(ids[first:], offsets[first:])]
    added = bool(ids) and offsets[0][0] == offsets[0][1] == 0 and first > 0
    return ids[:first], ids[first:], labels, added


def tokenize_pair(record: dict, tokenizer, max_seq_len: int,
                  system_prompt: str | None = None) -> PairExample | None:
    """The pair as two examples that share the prompt, loss on response tokens only; None
    when a response keeps no loss-carrying token.

    A pair longer than data.max_seq_len (its prompt plus its longer response) is cut in two
    steps: first the prompt loses tokens from its start, keeping its end (the part the
    responses follow), down to half of data.max_seq_len; then, if the pair is still too long,
    both responses lose tokens from their end. A BOS token the tokenizer adds stays first.
    """
    record = bound_pair(record, max_seq_len)
    plain = not getattr(tokenizer, "chat_template", None)
    sides = {}
    for side in SIDES:
        text, boundary = render_side(record, record[side], tokenizer, system_prompt)
        sides[side] = _split(tokenizer, text, boundary, plain)
    longest = max(len(response) for _, response, _, _ in sides.values())
    examples = {}
    for side, (prompt, response, labels, added) in sides.items():
        keep = min(len(prompt), max(max_seq_len - longest, max_seq_len // 2))
        if keep < len(prompt):
            prompt = prompt[:1] + prompt[len(prompt) - keep + 1:] if added \
                else prompt[len(prompt) - keep:]
        room = max_seq_len - len(prompt)
        example = Example(prompt + response[:room], [IGNORE] * len(prompt) + labels[:room])
        if all(label == IGNORE for label in example.labels[1:]):
            return None
        examples[side] = example
    return PairExample(examples["chosen"], examples["rejected"])
