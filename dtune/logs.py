"""Keep the terminal for dtune's own words: the library warnings and log lines that tell a
user nothing they can act on are filtered where they arise, by message and module.

`filter_library_noise` runs when the dtune package is imported, so once in every process
(each rank, each worker, the tests), before any library has had a chance to warn. Anything
not listed here still shows: dtune's own warnings, and a library's that may be a real
problem. `python -W default` (or PYTHONWARNINGS) shows every library warning again.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings

# (module the warning is attributed to, category, start of its message): why no user can act.
LIBRARY_WARNINGS = (
    # peft's PeftModel reads transformers' old property name, on every adapter run and rank
    ("transformers.modeling_utils", FutureWarning, "`is_gradient_checkpointing` is deprecated"),
    # DeepSpeed ZeRO calls torch's renamed collectives: two lines per rank per step
    ("torch.distributed.c10d_logger", FutureWarning,
     "`torch.distributed.all_gather_into_tensor` is deprecated"),
    ("torch.distributed.c10d_logger", FutureWarning,
     "`torch.distributed.reduce_scatter_tensor` is deprecated"),
    # peft's prefix tuning passes its prefixes under transformers' old keyword (attributed to
    # torch's Module.__call__, which calls the model's forward)
    ("torch.nn.modules.module", FutureWarning, "`past_key_values` is deprecated"),
    ("torch.nn.modules.module", FutureWarning, "Both `past_key_values` and `cache` are set"),
    # bitsandbytes compiles a kernel when imported (peft imports it), and torch's compiler
    # imports a module of torch's that still uses script_method (a user's Python hides a
    # library's DeprecationWarning; pytest shows it)
    ("torch.jit._script", DeprecationWarning, "`torch.jit.script_method` is deprecated"),
    # transformers builds flex attention's block mask with an argument torch now deprecates
    ("transformers.masking_utils", DeprecationWarning, "_compile flag on create_block_mask"),
    # generate() hands a soft prompt the positions of its left-padded prompts; peft drops them
    ("peft.peft_model", UserWarning,
     "Position ids are not supported for parameter efficient tuning"),
    # dtune's tools read an FSDP2 checkpoint's shards in one process, on purpose (no_dist)
    ("torch.distributed.checkpoint.utils", UserWarning,
     "torch.distributed is disabled, unavailable or uninitialized"),
)

# logger name -> starts of the messages it logs that are dropped
LIBRARY_LOG_LINES = {
    # bitsandbytes loads an optional CPU kernel from the hub when imported; offline (where it
    # is cached, or bitsandbytes falls back) kernels says so at WARNING, on every run
    "kernels._internals.hf_hub": ("Skipping publisher trust check for ",),
}

# logger name -> the level below which its records are dropped
LIBRARY_LOG_LEVELS = {
    # bitsandbytes warns when imported (peft imports it) about an optional CPU kernel package
    "bitsandbytes": logging.ERROR,
    # setuptools' C compiler logs each command it runs at INFO, and Hydra shows the root
    # logger's INFO: importing DeepSpeed compiles probes (is libaio there?) as "gcc ..." lines
    "compilers.C": logging.WARNING,
}

# What libraries print() (not a warning, not a logger), dropped by `without_printed_lines`.
DEEPSPEED_PRINTS = (re.compile(r"DeepSpeed \S+ built successfully$"),)


class DropLines(logging.Filter):
    """Drops a library logger's records whose message starts with one of `starts`."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def filter_library_noise() -> None:
    """Install the filters above. Idempotent: pytest's per-test warning capture puts the
    process's filters back after each test, so tests/conftest.py calls this for every test."""
    if not sys.warnoptions:  # python -W / PYTHONWARNINGS: the user asked to see warnings
        for module, category, message in LIBRARY_WARNINGS:
            # filterwarnings drops an identical earlier entry: the list does not grow
            warnings.filterwarnings("ignore", message=re.escape(message), category=category,
                                    module=re.escape(module) + r"\Z")
    for name, level in LIBRARY_LOG_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    for name, starts in LIBRARY_LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropLines) for f in logger.filters):
            logger.addFilter(DropLines(starts))


@contextlib.contextmanager
def without_printed_lines(patterns=DEEPSPEED_PRINTS):
    """Around a library call that print()s status lines a user cannot act on: those matching
    `patterns` are dropped, every other line is passed on to stdout when the call ends."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        kept = [line for line in captured.getvalue().splitlines()
                if not any(p.match(line) for p in patterns)]
        if kept:
            print("\n".join(kept), flush=True)


def quiet_libraries() -> None:
    import torch
    from transformers.utils import logging as hf_logging

    filter_library_noise()
    if not torch.cuda.is_available():
        # Without this DeepSpeed warns on import that it "was unable to detect" a GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    hf_logging.disable_progress_bar()  # per-shard "Loading weights" bars
