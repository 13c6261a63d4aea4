"""Next-token cross-entropy, summed, so callers choose the normaliser."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dtune.data.formatting import IGNORE


def summed_token_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token losses over the tokens that carry a label.

    Summing (not averaging) per micro-batch lets gradient accumulation divide once by the
    token count of the whole window, so 1 x 8 and 8 x 1 give the same update.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    # Prompt tuning prepends virtual tokens to the output; score only the real positions.
    logits = logits[:, -batch["labels"].size(1) : -1].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )
