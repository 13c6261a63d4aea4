"""Keep the terminal for dtune's own progress: mute library chatter that tells the user nothing."""
from __future__ import annotations

import os

import torch
from transformers.utils import logging as hf_logging


def quiet_libraries() -> None:
    if not torch.cuda.is_available():
        # Without this DeepSpeed warns on import that it "was unable to detect" a GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    hf_logging.disable_progress_bar()  # per-shard "Loading weights" bars

