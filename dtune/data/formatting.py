"""Turn records into token ids and loss labels.

Loss falls only on responses: the `output` of an alpaca record, and every assistant turn of a
chat (not just the last one). Labels are found through character offsets of the rendered text,
so they follow whatever chat template the tokenizer carries.
"""
from __future__ import annotations

from dataclasses import dataclass

from dtune.errors import DtuneError

IGNORE = -100
# How many characters of a record are rendered and tokenized per token of data.max_seq_len.
# Text averages 3 to 5 characters per token, and the longest entries of common vocabularies
# (runs of spaces or dashes) hold a few dozen, so max_seq_len * 64 characters always reach
# past the max_seq_len-th token: what lies beyond them would be truncated away anyway, and a
# 100 MB row costs no more than a normal one.
CHARS_PER_TOKEN = 64

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken


def alpaca_prompt(record: dict) -> str:
    if record.get("input"):
        return ALPACA_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_NO_INPUT.format(instruction=record["instruction"])


def render(record: dict, fmt: str, tokenizer, system_prompt: str | None = None):
    """Return (text, [(start, end) character spans that carry loss])."""
    if fmt == "text":
        text = record["text"] + (tokenizer.eos_token or "")
        return text, [(0, len(text))]
    if fmt == "alpaca":
        prompt = alpaca_prompt(record)
        text = prompt + record["output"] + (tokenizer.eos_token or "")
        return text, [(len(prompt), len(text))]
    messages = _with_system(record["messages"], system_prompt)
    text = _chat(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = _chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise DtuneError(
                "the tokenizer's chat template does not render conversations prefix by prefix, "
                "so dtune cannot tell which tokens are assistant turns; use data.format=alpaca "
                "or a tokenizer with a standard template."
            )
        spans.append((len(before), len(through)))
    return text, spans


def bound_record(record: dict, fmt: str, max_seq_len: int) -> tuple[dict, bool]:
    """(record with about 2 * max_seq_len * CHARS_PER_TOKEN characters of text, counted in the
    order the fields are rendered, and whether anything was cut). A chat keeps at most
    max_seq_len messages: each renders at least its role marker, one token or more."""
    budget = 2 * max_seq_len * CHARS_PER_TOKEN

    def take(value):
        nonlocal budget
        if not isinstance(value, str):
            return value
        # One character at least: templates branch on whether a field is empty (alpaca's
        # "### Input:"), and that choice shows in the text before the cut.
        kept, budget = value[:max(budget, 1)], budget - len(value)
        return kept

    if fmt == "chat":
        messages = []
        for message in record["messages"][:max_seq_len]:
            if budget <= 0:
                break
            messages.append({**message, "content": take(message.get("content"))})
        return ({**record, "messages": messages},
                budget < 0 or len(messages) < len(record["messages"]))
    columns = ("text",) if fmt == "text" else ("instruction", "input", "output")
    bounded = {**record, **{c: take(record[c]) for c in columns if c in record}}
    return bounded, budget < 0


def tokenize(record: dict, fmt: str, tokenizer, max_seq_len: int, train_on_inputs: bool,
             system_prompt: str | None = None) -> Example:
    record, cut = bound_record(record, fmt, max_seq_len)
    text, spans = render(record, fmt, tokenizer, system_prompt)
    if cut:
        # Keep only a prefix of what the whole record renders to, so that a cut prompt never
        # brings its response, the chat template's closing or the EOS token forward into the
        # window. Fields were cut at twice this length: templates that trim a message's
        # whitespace cannot pull the next field before this point.
        text = text[: max_seq_len * CHARS_PER_TOKEN]
    encoded = tokenizer(
        text, add_special_tokens=fmt != "chat", return_offsets_mapping=True, truncation=False
    )
    ids = encoded["input_ids"][:max_seq_len]
    offsets = encoded["offset_mapping"][:max_seq_len]
    if train_on_inputs:
        labels = list(ids)
    else:
        labels = [
            tid if any(s <= start < e for s, e in spans) and end > start else IGNORE
            for tid, (start, end) in zip(ids, offsets)
        ]
    return Example(input_ids=ids, labels=labels)


def prompt_and_reference(record: dict, fmt: str, tokenizer, system_prompt: str | None = None):
    """The prompt a model answers at eval time and the reference answer, or None for `text`."""
    if fmt == "alpaca":
        return alpaca_prompt(record), record["output"]
    if fmt == "chat":
        messages = _with_system(record["messages"], system_prompt)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = _chat(tokenizer, messages[:last], add_generation_prompt=True)
        return prompt, messages[last]["content"]
    return None


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DtuneError(
            "data.format=chat (and sharegpt) needs a tokenizer with a chat template, and this "
            "model's tokenizer has none (data.chat_template is unset); set one, e.g. "
            "data.chat_template=chatml (bundled: chatml, llama3, zephyr) or the path of a "
            ".jinja file, or use data.format=alpaca."
        )
    if not messages:
        return ""
    return render_chat(tokenizer, messages, add_generation_prompt)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The tokenizer's chat template applied to `messages`. A template that raises (its own
    `raise_exception`, or a Jinja error while rendering) is one paragraph naming the roles of
    the conversation it refused, not a traceback."""
    import jinja2  # transformers renders templates with it

    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (jinja2.TemplateError, TypeError, ValueError) as exc:
        roles = ", ".join(str(m.get("role")) for m in messages[:12]) + \
            (", ..." if len(messages) > 12 else "")
        raise DtuneError(
            f"the tokenizer's chat template (data.chat_template, or the model's own) refused a "
            f"conversation with the roles {roles}: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}. A template raises this for "
            "conversations it does not accept (roles that must alternate, a system message it "
            "does not allow); drop or fix such rows (or data.system_prompt), or choose a "
            "template that accepts them, e.g. data.chat_template=chatml.") from None
