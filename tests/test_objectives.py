"""Preference objectives (DPO, IPO, ORPO, SimPO): the published formulas, per-pair gradient
accumulation, the reference model, refusals, layouts and resume.

Batches are built by hand in the shape the preference collate gives (rows 0..n-1 chosen,
n..2n-1 the rejected responses of the same pairs, `pair_index`), so these tests pin the
objectives whatever the data pipeline does; one runs the built-in pairs through the real
pipeline (data=builtin_preference) and `dtune eval`.
"""
import json
import math
import shutil

import pytest
import torch

from conftest import TINY, compose, one_line
from dtune.data.formatting import IGNORE
from dtune.errors import DtuneError
from dtune.metrics import read_metrics
from dtune.objectives import OBJECTIVES, PAIR_METRICS, pair_loss


PREF = [*TINY, "data.format=preference", "eval.exact_match_samples=0"]


# --- the formulas, against an independent implementation in plain Python -------------------

def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference_losses(name, cfg, c, r, nc, nr, rc, rr):
    """Per-pair losses written straight from the papers."""
    out = []
    for i in range(len(c)):
        if name == "dpo":
            h = (c[i] - rc[i]) - (r[i] - rr[i])
            if cfg.loss_type == "ipo":  # Azar et al. eq. 17
                out.append((h - 1 / (2 * cfg.beta)) ** 2)
            else:  # Rafailov et al.; cDPO with label smoothing
                e = cfg.label_smoothing
                out.append(-(1 - e) * logsig(cfg.beta * h) - e * logsig(-cfg.beta * h))
        elif name == "orpo":  # Hong et al.: NLL of chosen + beta * L_OR, length-averaged
            pc, pr = c[i] / nc[i], r[i] / nr[i]
            odds = (pc - math.log1p(-math.exp(pc))) - (pr - math.log1p(-math.exp(pr)))
            out.append(-pc - cfg.beta * logsig(odds))
        else:  # Meng et al.
            out.append(-logsig(cfg.beta * c[i] / nc[i] - cfg.beta * r[i] / nr[i] - cfg.gamma))
    return out


CASES = [("dpo", []), ("dpo", ["objective.label_smoothing=0.2"]),
         ("dpo", ["objective.loss_type=ipo", "objective.beta=0.5"]),
         ("orpo", []), ("orpo", ["objective.beta=0.5"]), ("simpo", []),
         ("simpo", ["objective.gamma=0.3", "objective.beta=2.5"])]


@pytest.mark.parametrize("name,extra", CASES)
def test_each_loss_is_the_published_formula(name, extra):
    cfg = compose(*PREF, f"objective={name}", *extra).objective
    g = torch.Generator().manual_seed(0)
    n = 6
    tokens = torch.randint(3, 40, (2 * n,), generator=g).double()
    logps = -torch.rand(2 * n, generator=g, dtype=torch.float64) * tokens  # mean in (-1, 0)
    ref = -torch.rand(2 * n, generator=g, dtype=torch.float64) * tokens
    loss, metrics = pair_loss(cfg, logps, tokens, ref if name == "dpo" else None)
    c, r, nc, nr = logps[:n].tolist(), logps[n:].tolist(), tokens[:n].tolist(), tokens[n:].tolist()
    expected = reference_losses(name, cfg, c, r, nc, nr, ref[:n].tolist(), ref[n:].tolist())
    assert float(loss) == pytest.approx(sum(expected), abs=1e-6)  # summed over pairs
    assert set(metrics) == set(OBJECTIVES[name].metrics)
    assert float(metrics["logps/chosen"]) == pytest.approx(sum(c), abs=1e-9)
    if name == "dpo":
        chosen = [cfg.beta * (c[i] - ref[i].item()) for i in range(n)]
        rejected = [cfg.beta * (r[i] - ref[n + i].item()) for i in range(n)]
    else:
        scale = [cfg.beta / nc[i] for i in range(n)], [cfg.beta / nr[i] for i in range(n)]
        chosen = [c[i] * scale[0][i] for i in range(n)]
        rejected = [r[i] * scale[1][i] for i in range(n)]
    assert float(metrics["rewards/chosen"]) == pytest.approx(sum(chosen), abs=1e-9)
    assert float(metrics["rewards/margin"]) == pytest.approx(sum(chosen) - sum(rejected), abs=1e-9)
    assert float(metrics["rewards/accuracy"]) == sum(a > b for a, b in zip(chosen, rejected))
    if name == "orpo":
        assert float(metrics["nll"]) == pytest.approx(-sum(x / m for x, m in zip(c, nc)), abs=1e-9)


def test_the_loss_has_the_gradient_of_the_formula():
    """Autograd through dtune's loss matches finite differences of the paper's formula."""
    cfg = compose(*PREF, "objective=orpo").objective
    logps = torch.tensor([-5.0, -9.0, -7.0, -6.0], dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([5.0, 6.0, 7.0, 4.0], dtype=torch.float64)
    loss, _ = pair_loss(cfg, logps, tokens)
    loss.backward()
    for i in range(4):
        def f(x):
            v = logps.detach().tolist()
            v[i] = x
            return sum(reference_losses("orpo", cfg, v[:2], v[2:], [5, 6], [7, 4], None, None))
        h = 1e-6
        numeric = (f(logps[i].item() + h) - f(logps[i].item() - h)) / (2 * h)
        assert logps.grad[i].item() == pytest.approx(numeric, abs=1e-6)


# --- batches in the preference collate's shape ----------------------------------------------


@pytest.mark.parametrize("family,method", [("llama", "lora"), ("gemma2", "full")])
def test_response_only_head_scores_as_the_full_logits(family, method):
    """sequence_logps with the LM head on response positions only: the full logits' values
    and gradients (Gemma 2's soft-capped logits included), right padding and a prompt-only
    row's zero alike."""
    from test_families import adapted

    from dtune.loss import sequence_logps

    _, model, _ = adapted(family, method)
    batch = pair_batch(make_pairs(3, seed=4, vocab=120), [0, 1, 2])
    batch["labels"][2] = IGNORE  # a row without a response scores 0 on both paths
    scores = []
    for response_head in (False, True):
        model.zero_grad()
        logps = sequence_logps(model, batch, response_head)
        (logps * torch.arange(1.0, 7.0)).sum().backward()
        scores.append((logps.detach(), [p.grad.clone() for p in model.parameters()
                                        if p.requires_grad]))
    (full, full_grads), (ours, our_grads) = scores
    assert ours[2] == 0 and full[2] == 0 and full.abs().min() < full.abs().max()
    assert torch.allclose(ours, full, atol=1e-5, rtol=0)
    for mine, theirs in zip(our_grads, full_grads):
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-4)


def make_pairs(count: int, seed: int = 0, vocab: int = 512):
    """(prompt, chosen, rejected) token lists of unequal lengths; every chosen response
    repeats one token, so there is something to learn in a few steps."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(count):
        prompt = torch.randint(3, vocab, (int(torch.randint(3, 9, (1,), generator=g)),),
                               generator=g).tolist()
        rejected = torch.randint(3, vocab, (int(torch.randint(2, 7, (1,), generator=g)),),
                                 generator=g).tolist()
        chosen = [7] * (len(rejected) + int(torch.randint(-1, 2, (1,), generator=g)))
        pairs.append((prompt, chosen, rejected))
    return pairs


def pair_batch(pairs, indices, pad_id: int = 0) -> dict:
    """The contract: [2n, L] input_ids/labels/attention_mask, chosen rows first, and
    pair_index [n]."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    longest = max(len(p) + len(y) for p, y in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, (p, y) in enumerate(rows):
        input_ids[i, : len(p) + len(y)] = torch.tensor(p + y)
        labels[i, len(p) : len(p) + len(y)] = torch.tensor(y)
        mask[i, : len(p) + len(y)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
            "pair_index": torch.tensor(indices, dtype=torch.long)}


class PairStream:
    """A stand-in for the preference BatchStream: seeded order, windows split by rank,
    resumable position."""

    def __init__(self, examples, micro_batch_size, seed, pad_id, rank=0, world_size=1, **_):
        self.examples, self.micro_batch_size, self.seed = examples, micro_batch_size, seed
        self.pad_id, self.rank, self.world_size = pad_id, rank, world_size
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch):
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    @property
    def batches_per_epoch(self):
        return -(-len(self.examples) // self.micro_batch_size)

    def next_window(self, accum):
        mine = []
        for index in range(accum * self.world_size):
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            picked = self._order[self.cursor : self.cursor + self.micro_batch_size]
            self.cursor += len(picked)
            if index // accum == self.rank:
                mine.append(pair_batch([self.examples[i] for i in picked], picked,
                                          self.pad_id))
        return mine

    def source_totals(self):
        return {}

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state):
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)


@pytest.fixture
def pair_data(monkeypatch):
    """Runs train on hand-made pairs: 64 training and 16 held-out."""
    return use_pair_data(monkeypatch)


def use_pair_data(monkeypatch):
    """Through the recipe's one data entry point (dtune.data.read and build)."""
    import dtune.data
    from dtune.data import HeldOut, Records, TrainingData

    train_pairs, eval_pairs = make_pairs(64, seed=1), make_pairs(16, seed=2)

    def build(cfg, tokenizer, ranks, records, pairs):
        stream = PairStream(train_pairs, cfg.train.micro_batch_size, cfg.train.seed,
                            tokenizer.pad_token_id, ranks.rank, ranks.world_size)
        held = PairStream(eval_pairs, cfg.eval.batch_size, cfg.train.seed,
                          tokenizer.pad_token_id, ranks.rank, ranks.world_size)
        return TrainingData(stream, HeldOut({"eval": eval_pairs}, [], "preference", [held]),
                            "64", stream.batches_per_epoch)

    monkeypatch.setattr(dtune.data, "read", lambda *a, **k: Records())
    monkeypatch.setattr(dtune.data, "build", build)
    return train_pairs


def steps(run_dir):
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


def train(run_dir, *overrides):
    from dtune.train import run

    return run(compose(*PREF, *overrides), run_dir)


# --- gradient accumulation: per pair, across micro-batches ----------------------------------

@pytest.mark.parametrize("name", ["dpo", "orpo", "simpo"])
def test_eight_by_one_equals_one_by_eight_in_loss_metrics_and_gradient(name):
    from dtune.distributed import Ranks
    from dtune.engines import build_engine
    from dtune.loss import sequence_logps
    from dtune.models import load_model_and_tokenizer
    from dtune.reference import NoReference, Precomputed
    from dtune.objectives import objective_spec
    from dtune.train import accumulate_pair_gradients, window_counts

    cfg = compose(*PREF, "+method=full", f"objective={name}")
    model, _, _ = load_model_and_tokenizer(cfg.model)
    engine = build_engine(cfg, model, Ranks(), total_steps=1)
    pairs = make_pairs(8, seed=3)
    # a fixed reference table, for DPO: the loss then depends on the reference per pair
    table = -torch.rand(8, 2, generator=torch.Generator().manual_seed(4)) * 10
    reference = Precomputed(table) if name == "dpo" else NoReference()

    def grads(window):
        model.zero_grad()
        sums = accumulate_pair_gradients(engine, window, window_counts(window, pairs=True).pairs,
                                         cfg.objective, reference).tolist()
        metrics = {**dict(zip(objective_spec(cfg.objective).metrics, sums[1:])),
                   "pairs": window_counts(window, pairs=True).pairs}
        return sums[0], metrics, [p.grad.clone() for p in model.parameters()]

    one_by_eight = grads([pair_batch([pairs[i]], [i]) for i in range(8)])
    eight_by_one = grads([pair_batch(pairs, list(range(8)))])
    # and both are the gradient of the mean over the 8 pairs of the formula's loss (not a
    # per-token mean, not a mean of micro-batch means)
    model.zero_grad()
    whole = pair_batch(pairs, list(range(8)))
    tokens = (whole["labels"][:, 1:] != IGNORE).sum(1).float()
    ref = torch.cat([table[:, 0], table[:, 1]]) if name == "dpo" else None
    mean_loss = pair_loss(cfg.objective, sequence_logps(model, whole), tokens, ref)[0] / 8
    mean_loss.backward()
    assert eight_by_one[0] == pytest.approx(float(mean_loss.detach()), abs=1e-6)
    for g_a, p in zip(eight_by_one[2], model.parameters()):
        torch.testing.assert_close(g_a, p.grad, rtol=1e-4, atol=1e-7)
    uneven = grads([pair_batch(pairs[:3], [0, 1, 2]), pair_batch(pairs[3:], [3, 4, 5, 6, 7])])
    for loss, metrics, gradients in (one_by_eight, uneven):
        assert loss == pytest.approx(eight_by_one[0], abs=1e-5)
        assert metrics["pairs"] == 8
        for key in OBJECTIVES[name].metrics:
            assert metrics[key] == pytest.approx(eight_by_one[1][key], abs=1e-5), key
        for g_a, g_b in zip(gradients, eight_by_one[2]):
            torch.testing.assert_close(g_a, g_b, rtol=1e-4, atol=1e-7)


def test_eight_by_one_and_one_by_eight_runs_follow_the_same_losses(tmp_path, pair_data):
    common = ["+method=full", "objective=dpo", "train.max_steps=3", "train.lr=3e-3"]
    train(tmp_path / "a", *common, "train.micro_batch_size=1", "train.grad_accum_steps=8")
    train(tmp_path / "b", *common, "train.micro_batch_size=8", "train.grad_accum_steps=1")
    a, b = steps(tmp_path / "a"), steps(tmp_path / "b")
    for key in ("loss", *PAIR_METRICS):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], abs=1e-5), key
    assert a[-1]["loss"] != pytest.approx(a[0]["loss"], abs=1e-3)  # it trained


# --- training runs: every objective with LoRA and full fine-tuning --------------------------

@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("name", ["dpo", "orpo", "simpo"])
def test_every_objective_trains_with_lora_and_full(tmp_path, pair_data, name, method):
    result = train(tmp_path, f"+method={method}", f"objective={name}", "train.max_steps=4",
                   "train.lr=3e-3")
    records = steps(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "pairs", *OBJECTIVES[name].metrics):
        assert all(math.isfinite(r[key]) for r in records), key
    assert all(r["pairs"] == 4 for r in records)  # micro_batch_size=4 pairs, 8 rows
    if name == "dpo":  # step 1: the policy is its reference, every log-ratio 0, loss log 2
        assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert records[0]["rewards/margin"] == pytest.approx(0, abs=1e-5)
        # later the policy has moved and its reference has not (a reference that followed
        # the policy would keep every log-ratio 0 and the loss at log 2)
        assert max(abs(r["rewards/margin"]) for r in records[1:]) > 1e-3
        assert result.summary["reference"] == ("adapter_disabled" if method == "lora"
                                               else "precomputed")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 <= summary["preference_accuracy_before"] <= 1
    assert 0 <= summary["preference_accuracy_after"] <= 1
    assert summary["objective"] == name and "final_rewards/accuracy" in summary
    evals = [m for m in read_metrics(tmp_path / "metrics.jsonl") if m.get("split") == "eval"]
    assert [e["step"] for e in evals] == [0, 4] and "preference_accuracy" in evals[0]


def test_dpo_with_a_frozen_copy_starts_at_log_two(tmp_path, pair_data):
    train(tmp_path, "+method=full", "objective=dpo", "objective.reference=frozen_copy",
          "train.max_steps=2", "train.lr=3e-3")
    records = steps(tmp_path)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert records[1]["loss"] != pytest.approx(math.log(2), abs=1e-4)  # the policy moved
    assert not (tmp_path / "reference_logps.safetensors").exists()


def test_dpo_lifts_held_out_preference_accuracy(tmp_path, pair_data):
    """The chosen responses repeat one token: learnable in a few steps."""
    result = train(tmp_path, "+method=full", "objective=dpo", "train.max_steps=12",
                   "train.lr=3e-3", "objective.beta=0.5")
    before, after = (result.summary[f"preference_accuracy_{k}"] for k in ("before", "after"))
    assert after >= before + 0.25, (before, after)
    from dtune.report import write_report  # and the dashboard shows both

    page = write_report([tmp_path], tmp_path / "report").read_text()
    assert "<th>preference accuracy before</th>" in page
    assert f"{100 * before:.1f}%" in page and f"{100 * after:.1f}%" in page


def test_dtune_check_adds_each_objectives_built_in_data():
    from dtune.parity import BASE, objective_overrides

    assert objective_overrides([]) == []
    assert objective_overrides(["objective=dpo"]) == ["data=builtin_preference", "objective=dpo"]
    assert objective_overrides(["objective=simpo", "data=file"]) == ["objective=simpo",
                                                                     "data=file"]
    cfg = compose(*BASE, *objective_overrides(["objective=dpo"]))  # what each layout runs
    assert cfg.data.format == "preference" and cfg.objective.name == "dpo"
    # GRPO: the built-in prompt set, short completions; the user's own settings still win
    grpo = objective_overrides(["objective=grpo", "objective.max_new_tokens=8"])
    assert grpo[0] == "data=builtin_rl" and grpo[-1] == "objective.max_new_tokens=8"
    cfg = compose(*BASE, *grpo)
    assert cfg.data.format == "chat" and cfg.objective.name == "grpo"
    assert cfg.objective.max_new_tokens == 8 and cfg.objective.num_generations == 2


def test_dtune_check_leaves_out_the_sequence_split_for_objectives_it_cannot_train(
        tmp_path, monkeypatch):
    """Sequence parallelism trains SFT alone: `dtune check objective=grpo` (or dpo) compares
    every other layout, rather than failing on the split's refusal."""
    import dtune.parity as parity

    trained = []
    monkeypatch.setattr(parity, "train_layout", lambda layout, *a, **k:
                        trained.append(layout.name) or [1.0, 0.5])
    for objective, split in (["objective=grpo"], False), (["objective=dpo"], False), ([], True):
        trained.clear()
        results = parity.run_check(tmp_path, steps=2, overrides=tuple(objective))
        assert ("ddp 2 ranks, sequences split in 2" in trained) == split, objective
        assert all(r.passed for r in results) and len(results) == 6 + split


# --- resume: bitwise, with the precomputed reference read back ------------------------------

@pytest.mark.parametrize("method,reference", [("full", "precomputed"),
                                              ("lora", "adapter_disabled")])
def test_resumed_dpo_run_gives_bitwise_the_same_losses(tmp_path, pair_data, method, reference):
    common = [f"+method={method}", "objective=dpo", f"objective.reference={reference}",
              "train.max_steps=6", "train.save_every=3", "train.lr=3e-3"]
    train(tmp_path / "whole", *common)
    stored = tmp_path / "whole" / "reference_logps.safetensors"
    assert stored.is_file() == (reference == "precomputed")
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    shutil.rmtree(cut / "checkpoints" / "step-6")
    shutil.rmtree(cut / "final")
    (cut / "checkpoints" / "latest").write_text("step-3")
    stamp = stored.stat().st_mtime_ns if stored.is_file() else None
    result = train(cut, *common, "train.resume=true")
    assert result.summary["resumed_from"].endswith("step-3")
    if stamp is not None:  # read back, not recomputed
        assert (cut / "reference_logps.safetensors").stat().st_mtime_ns == stamp
    whole, resumed = steps(tmp_path / "whole"), steps(cut)
    assert [m["step"] for m in resumed] == list(range(1, 7))
    for key in ("loss", "grad_norm", *PAIR_METRICS):
        assert [m[key] for m in resumed] == [m[key] for m in whole], key  # bitwise
    assert result.summary["preference_accuracy_before"] == json.loads(
        (tmp_path / "whole" / "summary.json").read_text())["preference_accuracy_before"]


def test_resume_refuses_a_reference_file_of_other_data(tmp_path, pair_data):
    """Other data settings are named before the stored reference is read or replaced."""
    common = ["+method=full", "objective=dpo", "train.max_steps=2", "train.save_every=1"]
    train(tmp_path, *common)
    stamp = (tmp_path / "reference_logps.safetensors").stat().st_mtime_ns
    with pytest.raises(DtuneError, match="data.max_seq_len: 256 in the checkpoint, 128 now"):
        train(tmp_path, *common, "train.resume=true", "data.max_seq_len=128")
    assert (tmp_path / "reference_logps.safetensors").stat().st_mtime_ns == stamp


# --- refused before anything loads ----------------------------------------------------------

REFUSED = [
    (["objective=dpo", "data.format=chat"], "Set data.format=preference"),
    (["data.format=preference"], "SFT would train on the rejected responses"),
    (["objective=dpo", "+method=full", "objective.reference=adapter_disabled"],
     "full fine-tuning has no adapters to disable"),
    (["objective=dpo", "+method=lora", "objective.reference=frozen_copy"],
     "Use objective.reference=adapter_disabled"),
    (["objective=dpo", "+method=full", "objective.reference=frozen_copy", "parallelism=zero3"],
     "does not shard a second model"),
    (["objective=dpo", "+method=full", "data.streaming=true", "parallelism=zero3"],
     "auto picks it for streamed data"),
    (["objective=dpo", "+method=full", "objective.reference=precomputed",
      "data.streaming=true"], "a stream has no end to precompute"),
    (["objective=dpo", "objective.loss_type=ipo", "objective.label_smoothing=0.1"],
     "label smoothing (cDPO) is a form of the sigmoid loss"),
    (["objective=orpo", "+method=prompt_tuning"], "virtual tokens"),
    (["objective=simpo", "+method=prefix_tuning"], "virtual tokens"),
    (["objective=simpo", "data.packing=true"], "Set data.packing=false"),
    (["objective=dpo", "train.loss_chunk_size=512"], "Remove train.loss_chunk_size"),
    (["objective=orpo", "objective.reference=precomputed"],
     "objective.reference='precomputed' has no effect with objective=orpo; it applies to dpo"),
    (["objective=dpo", "objective.gamma=1.0"], "it applies to simpo"),
    (["objective.beta=0.5"], "has no effect with objective=sft"),
    (["objective=kto"], "there is no config 'objective/kto'"),
]


@pytest.mark.parametrize("overrides,words", REFUSED)
def test_combinations_that_cannot_work_are_refused_in_words(overrides, words):
    own_format = any(o.startswith("data.format=") for o in overrides)
    base = [o for o in PREF if not (own_format and o.startswith("data.format="))]
    with pytest.raises(DtuneError) as refused:
        compose(*base, *overrides)
    assert words in one_line(str(refused.value))


@pytest.mark.parametrize("overrides", [
    ["objective=dpo", "+method=qlora"], ["objective=dpo", "+method=full", "parallelism=zero3"],
    ["objective=dpo", "+method=ia3", "precision=bf16"], ["objective=simpo", "+method=dora"],
    ["objective=orpo", "+method=full", "precision=bf16_pure"],
    ["objective=dpo", "+method=full", "data.streaming=true"],
    ["objective=dpo", "objective.loss_type=ipo"]])
def test_other_combinations_compose(overrides):
    compose(*PREF, *overrides)


# --- layouts: DDP = one process, ZeRO-2/3 = DDP -------------------------------------------

def run_layout(rank, world, overrides, run_dir, store):
    """A rank of a run on the hand-made pairs (a torch.multiprocessing.spawn target)."""
    import os

    # DTUNE_DIE_WITH_PARENT: leave as a worker of dtune's own launch does, without the
    # gloo/DeepSpeed teardown that can abort under load after a good run (dtune/distributed.py;
    # CI saw "terminate called without an active exception" after ZeRO-2's summary)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      DTUNE_STORE_FILE=store, GLOO_SOCKET_IFNAME="lo", DTUNE_DIE_WITH_PARENT="1")
    use_pair_data(pytest.MonkeyPatch())
    from dtune.train import run

    run(compose(*PREF, *overrides), run_dir)


LAYOUT = ["+method=full", "objective=dpo", "train.max_steps=4", "train.lr=3e-3",
          "train.micro_batch_size=2"]


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    """Each layout's step records, run once for the tests below. The global batch is 4 pairs:
    1 process x 2 micro-batches, or 2 ranks x 1 (DDP, ZeRO-2, ZeRO-3), the DPO reference
    precomputed by both ranks together."""
    import torch.multiprocessing as mp

    work, runs = tmp_path_factory.mktemp("layouts"), {}

    def records(layout):
        if layout not in runs:
            if layout == "single":
                patch = pytest.MonkeyPatch()
                use_pair_data(patch)
                try:
                    train(work / layout, *LAYOUT, "train.grad_accum_steps=2")
                finally:
                    patch.undo()
            else:
                overrides = [*LAYOUT, f"parallelism={layout}", "parallelism.nproc_per_node=2"]
                mp.spawn(run_layout, nprocs=2, args=(2, overrides, work / layout,
                                                     str(work / f"{layout}.store")))
            runs[layout] = steps(work / layout)
        return runs[layout]

    return records


@pytest.mark.parametrize("layout,reference,tolerance", [
    ("ddp", "single", 1e-5), ("zero2", "ddp", 1e-4), ("zero3", "ddp", 1e-4)])
def test_a_layout_trains_as_its_reference_layout(layout_runs, layout, reference, tolerance):
    ours, theirs = layout_runs(layout), layout_runs(reference)
    assert len(ours) == len(theirs) == 4
    for key in ("loss", "rewards/margin", "rewards/accuracy", "logps/chosen"):
        assert [m[key] for m in ours] == pytest.approx([m[key] for m in theirs],
                                                       abs=tolerance), key
    assert all(m["pairs"] == 4 for m in ours)
    single = layout_runs("single")
    assert single[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert single[-1]["loss"] < single[0]["loss"]


def test_built_in_pairs_train_end_to_end_and_dtune_eval_measures_the_same(tmp_path):
    """The real pipeline (data=builtin_preference), then `dtune eval` on the run directory."""
    import conftest

    result = conftest.train(tmp_path, *TINY, "objective=dpo", "data=builtin_preference",
                            "data.builtin.train_size=32", "data.builtin.eval_size=8",
                            "train.max_steps=2", "eval.exact_match_samples=0")
    assert result.summary["reference"] == "adapter_disabled"
    done = conftest.run_dtune("eval", str(tmp_path), module=False)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads((tmp_path / "eval.json").read_text())
    assert measured["n"] == 8
    assert measured["preference_accuracy"] == result.summary["preference_accuracy_after"]
    # --samples takes the first N pairs, as it takes N prompts for exact match
    assert conftest.run_dtune("eval", str(tmp_path), "--samples", "3",
                              module=False).returncode == 0
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 3
