"""The chat template and pad token a tokenizer trains with.

`data.chat_template` names a template bundled in dtune/chat_templates/ or a .jinja file. It is
set on the tokenizer right after loading, before the tokenization cache is fingerprinted, and
`save_pretrained` writes it into `final/` (chat_template.jinja), so `dtune eval`, `generate`
and `merge` render prompts as training did.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dtune.errors import DtuneError

log = logging.getLogger("dtune")

TEMPLATE_DIR = Path(__file__).resolve().parent / "chat_templates"


@dataclass(frozen=True)
class BundledTemplate:
    # markers the template writes that must be single tokens of the vocabulary
    tokens: tuple[str, ...]
    # the token that closes an assistant turn, which generation must stop at (None: eos)
    end_of_turn: Optional[str]


# Each renders conversations prefix by prefix, as dtune/data/formatting.py needs
# (tests/test_chat_templates.py checks every one).
BUNDLED = {
    "chatml": BundledTemplate(("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    "llama3": BundledTemplate(("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                              "<|eot_id|>"),
    # <|user|> and the like are plain text in Zephyr's own vocabulary; a turn ends with eos,
    # so it fits any tokenizer that has an eos token.
    "zephyr": BundledTemplate((), None),
}


def set_up_tokenizer(tokenizer, chat_template: Optional[str] = None) -> None:
    """Give `tokenizer` the template `data.chat_template` names (if any), then a pad token."""
    if chat_template:
        tokenizer.chat_template, end_of_turn = read_template(chat_template, tokenizer)
        if end_of_turn and tokenizer.eos_token != end_of_turn:
            # Generation stops at eos (dtune/evaluate.py, and tools reading final/): a base
            # model's eos (<|endoftext|>) never follows an answer in this template.
            log.info("data.chat_template=%s: the tokenizer's eos becomes %s (was %s), the "
                     "token that ends an assistant turn", chat_template, end_of_turn,
                     tokenizer.eos_token)
            tokenizer.eos_token = end_of_turn
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = choose_pad_token(tokenizer)


def read_template(value: str, tokenizer) -> tuple[str, Optional[str]]:
    """(the template's text, its end-of-turn token or None) for a bundled name or a path."""
    if value in BUNDLED:
        bundled = BUNDLED[value]
        missing = [t for t in bundled.tokens if t not in tokenizer.get_vocab()]
        if missing:
            raise missing_tokens_error(value, missing, tokenizer)
        return (TEMPLATE_DIR / f"{value}.jinja").read_text(encoding="utf-8"), bundled.end_of_turn
    path = Path(value).expanduser()
    if path.suffix != ".jinja" or not path.is_file():
        what = "no such file" if path.suffix == ".jinja" else "neither a bundled name nor a " \
            ".jinja file"
        raise DtuneError(
            f"data.chat_template={value!r} is {what}. Give one of the bundled templates "
            f"({', '.join(BUNDLED)}), e.g. data.chat_template=chatml, or the path of a .jinja "
            "file (relative paths are taken from the directory you ran dtune in).")
    text = path.read_text(encoding="utf-8")
    check_syntax(value, text)
    return text, None


def missing_tokens_error(name: str, missing: list[str], tokenizer) -> DtuneError:
    # Not added: new tokens would resize the embeddings, and a LoRA-family method never trains
    # the new rows (they stay random in the base that eval, generate and merge load again).
    fits = [n for n, b in BUNDLED.items() if all(t in tokenizer.get_vocab() for t in b.tokens)]
    return DtuneError(
        f"data.chat_template={name} writes the marker(s) {', '.join(missing)}, which this "
        "tokenizer's vocabulary does not hold as tokens; dtune does not add them (that would "
        "resize the embeddings, whose new rows a LoRA-family method never trains). Use a "
        f"bundled template the vocabulary fits ({', '.join(fits) or 'none'}), or a .jinja file "
        "written with the model's own special tokens.")


def check_syntax(value: str, text: str) -> None:
    import jinja2  # transformers renders templates with it

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise DtuneError(
            f"data.chat_template={value!r}: line {exc.lineno} is not valid Jinja ({exc.message})"
            "; fix the file, or use a bundled template: " + ", ".join(BUNDLED) + ".") from None


# Names that mark a token as reserved for padding, or unused by any text.
PAD_NAME = re.compile(r"pad", re.IGNORECASE)
RESERVED_NAME = re.compile(r"reserved|unused", re.IGNORECASE)


def choose_pad_token(tokenizer) -> str:
    """A pad token from the vocabulary as it is, so the embeddings never resize.

    In order: a special token named for padding, a reserved or unused special token, unk,
    then eos. Any of them is safe inside dtune: labels come from character spans and padding
    is masked by position (dtune/data/batching.py), never by `input_ids == pad_token_id`, so
    an eos inside an example keeps its label, and generation left-pads under an attention
    mask. eos comes last because final/ carries the choice to other tools, and collators that
    mask labels where input_ids equal the pad id would then never train the model to stop.
    """
    used = {tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token}
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    specials = [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items())
                if t.special and t.content not in used and t.content not in template]
    for pattern in (PAD_NAME, RESERVED_NAME):
        found = next((t for t in specials if pattern.search(t)), None)
        if found:
            return found
    if tokenizer.unk_token is not None:
        return tokenizer.unk_token
    if tokenizer.eos_token is None:
        raise DtuneError(
            "the tokenizer has no pad, unk or eos token to pad batches with; use a tokenizer "
            "that defines an eos token (every causal LM's does).")
    return tokenizer.eos_token


def template_changed_error(folder: Path, saved: str, now: Optional[str]) -> Optional[DtuneError]:
    """A resume that would train on with another chat template than the checkpoint's."""
    if saved is None or saved == now:
        return None
    return DtuneError(
        f"the checkpoint {folder} was trained with another chat template than this run's "
        "tokenizer has (data.chat_template or the model changed); resume with the settings "
        "that wrote it, or start a new run dir (or set train.resume=false).")
