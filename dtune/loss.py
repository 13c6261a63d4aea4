"""Next-token cross-entropy, summed, so callers choose the normaliser."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from dtune.data.batching import label_positions
from dtune.data.formatting import IGNORE
from dtune.errors import DtuneError


def _positions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's label positions, found on the host when it was collated
    (`data.batching.label_positions`), or here for a batch made another way."""
    return batch if "label_positions" in batch else label_positions(batch["labels"])


def summed_token_loss(model, batch: dict[str, torch.Tensor], chunk_size: int = 0) -> torch.Tensor:
    """Sum of next-token losses over the tokens that carry a label.

    Summing (not averaging) per micro-batch lets gradient accumulation divide once by the
    token count of the whole window, so 1 x 8 and 8 x 1 give the same update.

    A packed batch (one with `position_ids`) goes in without a 2-D attention mask, so the
    model builds a block-diagonal mask from the restarting positions. `use_cache=False` is
    required for that: with a cache, transformers skips the packed-sequence detection and
    attention silently crosses example boundaries.

    With `chunk_size` > 0 the model returns its final hidden states and the LM head plus
    cross-entropy run `chunk_size` tokens at a time (`chunked_lm_loss`): the full
    [tokens x vocabulary] fp32 logits never exist at once. What the model does to its logits
    after the head (`logit_transform`) is applied there too; `chunked_loss_mismatch` says
    when a model does something else, and the run then takes this plain path.
    """
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    if chunk_size > 0:
        # logits_to_keep=1: the model computes a single position's logits, not all of them.
        out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
        hidden = scored_positions(out.hidden_states[-1], batch)
        head = _output_layer(model)
        return chunked_lm_loss(hidden.reshape(-1, hidden.size(-1)), head.weight,
                               batch["labels"][:, 1:].reshape(-1), chunk_size,
                               logit_transform(model), _positions(batch)["label_positions"])
    logits = scored_positions(model(**inputs).logits, batch).float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )


def scored_positions(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The positions of `outputs` ([rows, positions, ...]) whose next-token targets are
    `labels[:, 1:]`: one per label after the first, from the first real token. Prompt tuning
    puts its virtual tokens in front of the real ones; a sequence-parallel shard's labels are
    one column wider than its tokens (dtune/sequence_parallel.py), so all of its positions
    are scored, the last one against the next shard's first label."""
    start = outputs.size(1) - batch["input_ids"].size(1)
    return outputs[:, start:start + batch["labels"].size(1) - 1]


def sequence_logps(model, batch: dict[str, torch.Tensor],
                   response_head: bool = False) -> torch.Tensor:
    """The summed log-probability of each row's labelled tokens: a [rows] fp32 tensor, with
    grad when the model has it (the preference objectives' per-sequence score).

    With `response_head` (a plain LM head that `chunked_loss_mismatch` has checked, and not
    partitioned by ZeRO-3) the head and log-softmax run on the labelled positions only: a
    pair's prompt and padding are most of its positions, and the [positions x vocabulary]
    fp32 logits are the largest tensor of the step. Without it, the model's full logits. The
    chunked loss is not used: it computes its gradients inside its forward, for a plain sum
    of token losses, while a preference loss weighs each sequence by a factor known only
    once both of a pair are scored.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "use_cache": False}
    labels = batch["labels"][:, 1:]
    if response_head:
        # logits_to_keep=1: the model computes a single position's logits, not all of them.
        out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
        hidden = scored_positions(out.hidden_states[-1], batch)
        where = _positions(batch)
        labelled = hidden.reshape(-1, hidden.size(-1)).index_select(0,
                                                                     where["label_positions"])
        logits = logit_transform(model)(_output_layer(model)(labelled).float())
        token_logps = -F.cross_entropy(
            logits, labels.reshape(-1).index_select(0, where["label_positions"]),
            reduction="none")
        return token_logps.new_zeros(labels.size(0)).index_add(0, where["label_rows"],
                                                               token_logps)
    logits = scored_positions(model(**inputs).logits, batch).float()
    token_logps = -F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                   ignore_index=IGNORE, reduction="none")
    return token_logps.view(labels.shape).sum(1)


def require_plain_lm_head(model) -> None:
    """Raise the DtuneError saying why an explicit train.loss_chunk_size cannot be used."""
    _output_layer(model)


def has_plain_lm_head(model) -> bool:
    """Whether the chunked loss can read the LM head directly (see `_output_layer`)."""
    try:
        _output_layer(model)
        return True
    except DtuneError:
        return False


def _unwrap(model):
    return getattr(model, "module", model)  # DDP / DeepSpeed wrappers


def _output_layer_problem(model) -> Optional[str]:
    head = _unwrap(model).get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return (f"train.loss_chunk_size needs a plain bias-free linear LM head, but this "
                f"model's is {type(head).__name__} (an adapter on lm_head, or modules_to_save?)")
    return None


def _output_layer(model) -> torch.nn.Linear:
    problem = _output_layer_problem(model)
    if problem:
        raise DtuneError(f"{problem}; set train.loss_chunk_size=0.")
    return _unwrap(model).get_output_embeddings()


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to `hidden @ head.T` before its loss:
    logits = softcap * tanh(scale * x / softcap), or scale * x without a soft cap."""

    scale: float = 1.0
    softcap: Optional[float] = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_transform(model) -> LogitTransform:
    """The transforms transformers' causal LMs apply after the LM head, read from the config:
    Gemma 2/3's final_logit_softcapping, Cohere's logit_scale (a factor), Granite's
    logits_scaling (a divisor). The same field name means different things elsewhere
    (HyperCLOVA X multiplies by its logits_scaling), so only these model types are trusted;
    `chunked_loss_mismatch` catches the rest."""
    config = _unwrap(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", "")
    scale = 1.0
    if model_type.startswith("cohere") and getattr(config, "logit_scale", None):
        scale = float(config.logit_scale)
    elif model_type.startswith("granite") and getattr(config, "logits_scaling", None):
        scale = 1.0 / float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(scale, float(softcap) if softcap else None)


@torch.no_grad()
def chunked_loss_mismatch(model, input_ids: torch.Tensor) -> Optional[str]:
    """Why the chunked loss would not reproduce this model's own logits, or None when it does.

    One short forward: the model's logits at the last position against the LM head and
    `logit_transform` applied to its final hidden state, so any step of a forward dtune does
    not know about (a scale, a cap, a bias) is seen before training, never a silent mismatch."""
    problem = _output_layer_problem(model)
    if problem:
        return problem
    out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True,
                logits_to_keep=1)
    theirs = out.logits[:, -1].float()
    head = _output_layer(model)
    ours = logit_transform(model)((out.hidden_states[-1][:, -1] @ head.weight.t()).float())
    # fp32 agrees to rounding; 16-bit weights or autocast can reduce in another order
    exact = head.weight.dtype == out.hidden_states[-1].dtype == torch.float32 and not any(
        torch.is_autocast_enabled(device) for device in ("cpu", "cuda"))
    tol = 1e-5 if exact else 1e-2
    diff = (ours - theirs).abs().max().item()
    if diff > tol * max(1.0, theirs.abs().max().item()):
        config = _unwrap(model).config
        return (f"this {getattr(config, 'model_type', type(model).__name__)} model's forward "
                f"changes its logits after the LM head in a way dtune's chunked loss does not "
                f"reproduce (they differ by up to {diff:.3g})")
    return None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    chunk_size: int, transform: LogitTransform = LogitTransform(),
                    rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum(cross_entropy(transform(hidden @ weight.T), labels)), `chunk_size` rows at a time;
    `rows`: the rows whose label carries loss (`label_positions`), else found here."""
    if rows is None:
        rows = (labels != IGNORE).nonzero().squeeze(1)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, rows, chunk_size, transform)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """LM head + cross-entropy whose gradients are computed during the forward pass, chunk by
    chunk, so that only one chunk of fp32 logits is alive at a time and nothing is recomputed
    in backward (the idea of Liger's fused linear cross-entropy).

    The gradient matmuls run outside autocast. Under fp16 autocast the weight's gradient, a
    sum over every token of a chunk, passes fp16's 65,504 on real activations whatever the
    loss scale (which multiplies only afterwards), and every step would be skipped: it is
    computed in fp32. The hidden states' gradient is bounded by twice the largest weight
    (softmax minus one-hot sums to zero), so it stays in the weight's dtype, and a 16-bit
    LM head is never copied to fp32 whole."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, rows, chunk_size, transform):
        # only the `rows` whose tokens carry loss need logits at all
        grad_hidden = torch.zeros_like(hidden)
        need_weight_grad = weight.requires_grad
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_weight_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            index = rows[start : start + chunk_size]
            h = hidden.index_select(0, index)
            target = labels.index_select(0, index)
            logits = transform((h @ weight.t()).float())
            log_z = torch.logsumexp(logits, dim=-1)
            total += (log_z - logits.gather(1, target[:, None]).squeeze(1)).sum()
            # d(sum CE)/d logits = softmax - one_hot
            grad_logits = torch.exp(logits - log_z[:, None])
            grad_logits[torch.arange(index.numel(), device=index.device), target] -= 1
            if transform.softcap:  # d(c tanh(z / c))/dz = 1 - tanh^2 = 1 - (logits / c)^2
                grad_logits *= 1 - (logits / transform.softcap) ** 2
            if transform.scale != 1.0:
                grad_logits *= transform.scale
            with torch.autocast(hidden.device.type, enabled=False):
                grad_hidden.index_copy_(0, index, (grad_logits.to(weight.dtype) @ weight)
                                        .to(hidden.dtype))
                if need_weight_grad:
                    grad_weight += grad_logits.t() @ h.float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_w = None if grad_weight is None else (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden * grad_output.to(grad_hidden.dtype), grad_w, None, None, None, None
