"""One exception type for every problem the user can fix, and how the entry points show it."""
from __future__ import annotations

import os
import reprlib
import sys
import textwrap

MASK = "***"
# Secret values typed on this command line (dtune/redaction.py adds them): masked in every
# error printed, whatever message they got into.
SEEN_SECRETS: set[str] = set()


class DtuneError(Exception):
    """A problem with the user's input or environment, explained in words they can act on.

    The message names the field or file, the value found, and the fix. Entry points print it
    without a traceback unless HYDRA_FULL_ERROR=1 (or DTUNE_TRACEBACK=1) is set.
    """


def excerpt(value, limit: int = 200) -> str:
    """`repr(value)` cut to about `limit` characters, for quoting user data in a message: a
    2 MB field shows as its start and its length, and the whole repr is never built."""
    shorten = reprlib.Repr()
    shorten.maxstring = shorten.maxother = max(limit, 12)
    shorten.maxlevel = 3  # nested lists and objects: three levels, then `[...]`
    shorten.maxlist = shorten.maxtuple = shorten.maxdict = shorten.maxset = 8
    text = shorten.repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if isinstance(value, (str, bytes)) and len(value) > limit:
        text += f" ({len(value):,} {'characters' if isinstance(value, str) else 'bytes'})"
    return text


def show_tracebacks() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("DTUNE_TRACEBACK") == "1"


class JobFailed(float):
    """What a sweep job returns when dtune refused it, so that the sweep goes on to its next
    job: NaN, which a sweeper that minimises counts as a failed trial, carrying the paragraph
    for the sweep's results table."""

    message: str

    def __new__(cls, message: str = ""):
        value = super().__new__(cls, "nan")
        value.message = message
        return value


def exit_with(error: DtuneError, code: int = 2) -> None:
    """Print a DtuneError as one wrapped paragraph on stderr and exit non-zero."""
    print_error(error)
    sys.exit(code)


def print_error(error: DtuneError) -> None:
    """A DtuneError as one wrapped paragraph on stderr (raised, with HYDRA_FULL_ERROR=1)."""
    if show_tracebacks():
        raise error
    text = " ".join(str(error).split())
    for secret in sorted(SEEN_SECRETS, key=len, reverse=True):
        text = text.replace(secret, MASK)
    # Paths and commands stay whole on one line, so that they can be copied.
    lines = textwrap.wrap(f"dtune: error: {text}", width=100, break_on_hyphens=False,
                          break_long_words=False)
    print("\n".join(lines), file=sys.stderr)
    print("(set HYDRA_FULL_ERROR=1 to see the traceback)", file=sys.stderr)
