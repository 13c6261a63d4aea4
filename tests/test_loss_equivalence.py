"""Speed features that must not change what is learned: packing, gradient checkpointing and
the chunked loss each give the numbers of the plain path."""
import json

import pytest
import torch
import torch.nn.functional as F

from dtune.data.batching import BatchStream, collate, collate_packed, loss_token_count, pack_rows
from dtune.data.formatting import IGNORE, Example, tokenize
from dtune.config import loss_chunk_size
from dtune.engines import shards_parameters
from dtune.errors import DtuneError
from dtune.loss import chunked_lm_loss, summed_token_loss
from dtune.models import load_model_and_tokenizer
from dtune.train import run
from tests.conftest import TINY, compose


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer, _ = load_model_and_tokenizer(compose(*TINY).model)
    return model, tokenizer


@pytest.fixture(scope="module")
def examples(tiny):
    from dtune.data.builtin import generate

    records, _ = generate(["add", "reverse_words", "extract_json", "convert_units"], 12, 0, seed=7)
    found = [tokenize(r, "chat", tiny[1], 256, train_on_inputs=False) for r in records]
    assert len({len(e.input_ids) for e in found}) > 3  # unequal lengths make the tests real
    return found


def per_example_losses(model, batch) -> torch.Tensor:
    """Summed next-token loss of each example in a batch, found by its label positions."""
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE,
                           reduction="none")


# --- packing ------------------------------------------------------------------------------

def test_packed_rows_give_each_example_the_loss_it_has_alone(tiny, examples):
    model, tokenizer = tiny
    model.eval()
    rows = [examples[0:4], examples[4:7], examples[7:12]]
    packed = collate_packed(rows, tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] == 3
    token_losses = per_example_losses(model, packed)
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            n = len(example.input_ids)
            alone = per_example_losses(model, collate([example], tokenizer.pad_token_id))
            mine = token_losses[r, start : start + n - 1]
            torch.testing.assert_close(mine.sum(), alone.sum(), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(mine, alone[0], rtol=1e-4, atol=1e-4)
            start += n


def test_packing_without_restarting_positions_would_mix_examples(tiny, examples):
    """The control for the test above: the same rows as one long sequence give other losses,
    so the equality there is the block-diagonal attention at work, not a coincidence."""
    model, tokenizer = tiny
    model.eval()
    packed = collate_packed([examples[0:4]], tokenizer.pad_token_id)
    plain = dict(packed)
    plain.pop("position_ids")
    second = len(examples[0].input_ids)
    a = per_example_losses(model, packed)[0, second:]
    b = per_example_losses(model, plain)[0, second:]
    assert (a - b).abs().max() > 1e-3


def test_a_packed_batch_has_the_loss_tokens_of_the_padded_batch(tiny, examples):
    pad = tiny[1].pad_token_id
    packed = collate_packed([examples[:6], examples[6:]], pad)
    padded = collate(examples, pad)
    assert loss_token_count(packed) == loss_token_count(padded)
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
    # each example's first token is never a target: it would be predicted from its neighbour
    starts = [0]
    for e in examples[:5]:
        starts.append(starts[-1] + len(e.input_ids))
    assert all(packed["labels"][0, s] == IGNORE for s in starts)
    # the summed loss of the packed batch is the sum of the examples' own losses
    model = tiny[0].eval()
    with torch.no_grad():
        alone = sum(float(summed_token_loss(model, collate([e], pad))) for e in examples)
        assert float(summed_token_loss(model, packed)) == pytest.approx(alone, rel=1e-5)


def test_pack_rows_keeps_order_and_stops_at_the_first_misfit():
    rows, taken = pack_rows([5, 4, 3, 6, 2, 9], rows=2, row_len=10)
    assert rows == [[0, 1], [2, 3]] and taken == 4  # 2 fits no row: stop there
    rows, taken = pack_rows([5, 4, 1, 6, 9], rows=2, row_len=10)
    assert rows == [[0, 1, 2], [3]] and taken == 4


def lengths_stream(lengths, **kwargs):
    examples = [Example(list(range(n)), list(range(n))) for n in lengths]
    return BatchStream(examples, micro_batch_size=2, seed=3, pad_id=0, pack_len=16, **kwargs)


def test_packed_stream_sees_every_example_once_per_epoch_on_any_number_of_ranks():
    lengths = [3 + (7 * i) % 11 for i in range(40)]
    one = lengths_stream(lengths)

    def seen(stream, steps, accum):
        ids = []
        for _ in range(steps):
            for batch in stream.next_window(accum):
                ids.append(int(batch["attention_mask"].sum()))
        return ids

    # 1 rank x 2 micro-batches sees, step by step, what 2 ranks x 1 micro-batch see together
    ranks = [lengths_stream(lengths, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        alone = [int(b["attention_mask"].sum()) for b in one.next_window(2)]
        together = [int(s.next_window(1)[0]["attention_mask"].sum()) for s in ranks]
        assert alone == together
    fresh = lengths_stream(lengths)
    total, batches = 0, 0
    while fresh.cursor < len(lengths):
        (batch,) = fresh.next_window(1)
        total, batches = total + int(batch["attention_mask"].sum()), batches + 1
        assert batch["input_ids"].shape[1] <= 16
    assert total == sum(lengths)  # every token of the epoch, once
    assert batches == fresh.batches_per_epoch


def test_packing_is_refused_with_virtual_tokens():
    with pytest.raises(DtuneError, match="data.packing=true does not work"):
        compose(*TINY, "+method=prompt_tuning", "data.packing=true")


def test_packed_training_runs_and_trains_on_fewer_rows(tmp_path):
    common = (*TINY, "+method=full", "train.max_steps=4", "train.lr=1e-3",
              "eval.exact_match_samples=0", "data.max_seq_len=128")
    plain = run(compose(*common), tmp_path / "plain").summary
    packed = run(compose(*common, "data.packing=true"), tmp_path / "packed").summary
    # 4 rows of 128 tokens hold more examples than 4 padded rows
    assert packed["trained_tokens"] > 2 * plain["trained_tokens"]
    assert packed["final_loss"] < 10 and packed["steps"] == 4


# --- gradient checkpointing ---------------------------------------------------------------

@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_checkpointing_follows_the_same_losses(tmp_path, method):
    common = (*TINY, f"+method={method}", "train.max_steps=3", "train.lr=1e-3",
              "eval.exact_match_samples=0")
    run(compose(*common), tmp_path / "a")
    result = run(compose(*common, "train.gradient_checkpointing=true"), tmp_path / "b")
    assert result.model.is_gradient_checkpointing if method == "full" else \
        result.model.base_model.model.is_gradient_checkpointing

    def losses(d):
        lines = (d / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r.get("split") != "eval"]

    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)


# --- chunked loss -------------------------------------------------------------------------

def test_chunked_loss_equals_the_plain_loss_and_its_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[::5] = IGNORE
    plain = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE, reduction="sum")
    (2 * plain).backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked = chunked_lm_loss(hidden, weight, labels, chunk_size=8)
    (2 * chunked).backward()
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_chunked_loss_through_the_model_matches_the_plain_path(tiny, examples, packed):
    model, tokenizer = tiny
    model.train()
    pad = tokenizer.pad_token_id
    batch = collate_packed([examples[:6], examples[6:]], pad) if packed \
        else collate(examples[:6], pad)

    def loss_and_grads(chunk):
        model.zero_grad()
        loss = summed_token_loss(model, batch, chunk)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = loss_and_grads(0)
    loss_b, grads_b = loss_and_grads(16)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_chunked_loss_trains_lora_to_the_same_losses(tmp_path):
    common = (*TINY, "+method=lora", "train.max_steps=3", "train.lr=1e-3",
              "eval.exact_match_samples=0")
    a = run(compose(*common, "train.loss_chunk_size=0"), tmp_path / "a").summary
    b = run(compose(*common, "train.loss_chunk_size=64"), tmp_path / "b").summary
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-5)


def test_the_chunked_loss_is_the_default_except_under_zero3():
    assert loss_chunk_size(compose(*TINY).train, False) == 1024
    assert loss_chunk_size(compose(*TINY, "train.loss_chunk_size=0").train, False) == 0
    zero3 = compose(*TINY, "parallelism=zero3")  # the default is not refused, it steps aside
    assert shards_parameters(zero3.parallelism)  # the engine spec's answer, ZeRO-3's alone
    assert loss_chunk_size(zero3.train, shards_parameters(zero3.parallelism)) == 0
    zero2 = compose(*TINY, "parallelism=zero2")
    assert loss_chunk_size(zero2.train, shards_parameters(zero2.parallelism)) == 1024


def test_chunked_loss_is_refused_under_zero3():
    with pytest.raises(DtuneError, match="it shards the LM head"):
        compose(*TINY, "parallelism=zero3", "train.loss_chunk_size=1024")


def test_a_head_the_chunked_loss_cannot_read_falls_back_by_default_and_errs_when_asked(tmp_path):
    """A trained copy of the LM head (modules_to_save) is a wrapper, not a plain Linear."""
    common = (*TINY, "+method=lora", "method.modules_to_save=[lm_head]", "train.max_steps=2",
              "eval.exact_match_samples=0")
    assert run(compose(*common), tmp_path / "a").summary["steps"] == 2
    with pytest.raises(DtuneError, match="train.loss_chunk_size needs a plain bias-free linear"):
        run(compose(*common, "train.loss_chunk_size=256"), tmp_path / "b")
