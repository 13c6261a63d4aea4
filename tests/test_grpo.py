"""GRPO (objective=grpo): the losses against an independent implementation written from the
papers, accumulation invariance, the rewards and their refusals, and a tiny run.

The reference below is deliberately plain Python: loops over groups, sequences and tokens,
in float64 (Python floats), straight from the papers' formulas:
- GRPO (Shao et al., 2024, eq. 3): 1/G sum_i 1/|o_i| sum_t [min(r A, clip(r, 1-e, 1+e) A)
  - beta KL], A_i = (R_i - mean R) / std R, KL the k3 estimate p_ref/p - log(p_ref/p) - 1;
- Dr. GRPO (Liu et al., 2025): A_i = R_i - mean R; the token sum over a constant
  (max completion length x sequences);
- DAPO (Yu et al., 2025, eq. 8): clip to [1-e_low, 1+e_high], the token sum over the batch's
  completion tokens.
"""
import dataclasses
import math
import random

import pytest
import torch

from conftest import TINY, compose
from dtune.errors import DtuneError
from dtune.grpo import (STD_EPS, completion_mask, group_advantages, summed_loss, token_terms,
                        window_normaliser)
from dtune.rewards import parse_rewards


def reference_advantages(rewards, group, scale):
    out = []
    for start in range(0, len(rewards), group):
        chunk = rewards[start:start + group]
        mean = sum(chunk) / group
        var = sum((x - mean) ** 2 for x in chunk) / (group - 1)  # the sample std (as torch)
        for x in chunk:
            out.append((x - mean) / (math.sqrt(var) + STD_EPS) if scale else x - mean)
    return out


def reference_loss(loss_type, logp, old, ref, adv, mask, eps, eps_high, beta, max_new):
    """The objective to minimise, from the papers, one token at a time."""
    high = eps if eps_high is None else eps_high
    per_seq, tokens, total = [], 0, 0.0
    for i in range(len(logp)):
        seq_sum, n = 0.0, 0
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - eps), 1 + high)
            term = -min(ratio * adv[i], clipped * adv[i])
            if beta:
                d = ref[i][t] - logp[i][t]
                term += beta * (math.exp(d) - d - 1)
            seq_sum, n = seq_sum + term, n + 1
        per_seq.append(seq_sum / max(n, 1))
        tokens += n
        total += seq_sum
    if loss_type == "grpo":
        return sum(per_seq) / len(per_seq)
    if loss_type == "dr_grpo":
        return total / (max_new * len(logp))
    return total / tokens


def random_batch(seed, n=6, width=5):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, width, generator=g, dtype=torch.float64) * 3
    old = logp + (torch.rand(n, width, generator=g, dtype=torch.float64) - 0.5) * 0.8
    ref = logp + (torch.rand(n, width, generator=g, dtype=torch.float64) - 0.5)
    mask = torch.ones(n, width, dtype=torch.float64)
    for i in range(n):  # ragged completions: each ends somewhere
        mask[i, 1 + (i * 7 + seed) % width:] = 0
    return logp, old, ref, mask


def ours(loss_type, logp, old, ref, adv, mask, eps, eps_high, beta, max_new):
    terms = token_terms(logp, old, adv, eps, eps_high, beta, ref)
    divisor = window_normaliser(loss_type, len(logp), int(mask.sum()), max_new)
    return summed_loss(terms["loss"], mask, loss_type) / divisor


LOSSES = [("grpo", 0.2, None, 0.0), ("grpo", 0.2, None, 0.04), ("dr_grpo", 0.2, None, 0.0),
          ("dr_grpo", 0.1, None, 0.1), ("dapo", 0.2, 0.28, 0.0), ("dapo", 0.2, None, 0.05)]


@pytest.mark.parametrize("loss_type,eps,eps_high,beta", LOSSES)
def test_each_loss_is_the_published_formula(loss_type, eps, eps_high, beta):
    for seed in range(3):
        logp, old, ref, mask = random_batch(seed)
        rewards = [random.Random(seed * 10 + i).choice([0.0, 0.5, 1.0]) for i in range(6)]
        adv = reference_advantages(rewards, 3, scale=loss_type != "dr_grpo")
        got = ours(loss_type, logp, old, ref, torch.tensor(adv, dtype=torch.float64), mask,
                   eps, eps_high, beta, 5)
        want = reference_loss(loss_type, logp.tolist(), old.tolist(), ref.tolist(), adv,
                              mask.tolist(), eps, eps_high, beta, 5)
        assert float(got) == pytest.approx(want, abs=1e-6, rel=1e-6)


def test_group_advantages_and_zero_signal_groups():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, 3.0]
    for scale in (True, False):
        adv, zero = group_advantages(torch.tensor(rewards, dtype=torch.float64), 4, scale)
        assert adv.tolist() == pytest.approx(reference_advantages(rewards, 4, scale), abs=1e-9)
        assert zero.tolist() == [False, True, False]  # the all-0.5 group has no signal
    adv, _ = group_advantages(torch.tensor(rewards, dtype=torch.float64), 4, True)
    assert adv[4:8].abs().max() == 0  # no NaN from a zero std


def test_the_gradient_matches_the_reference():
    """d loss / d logp by autograd equals a finite difference of the plain reference."""
    logp, old, ref, mask = random_batch(1, n=4, width=3)
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2], dtype=torch.float64)
    x = logp.clone().requires_grad_(True)
    ours("dapo", x, old, ref, adv, mask, 0.2, 0.28, 0.05, 3).backward()
    h = 1e-6
    for i, t in [(0, 0), (1, 0), (2, 1), (3, 0)]:
        up, down = logp.tolist(), logp.tolist()
        up[i][t] += h
        down[i][t] -= h
        args = (old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, 0.05, 3)
        numeric = (reference_loss("dapo", up, *args) - reference_loss("dapo", down, *args)) / (2 * h)
        assert float(x.grad[i, t]) == pytest.approx(numeric, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_one_micro_batch_of_g_equals_g_micro_batches_of_one(loss_type):
    """The window normaliser is fixed before any backward: splitting the G completions over
    micro-batches (or ranks) changes neither the loss nor the gradient."""
    logp, old, ref, mask = random_batch(4, n=4, width=6)
    adv = torch.tensor([1.2, -0.3, -0.4, -0.5], dtype=torch.float64)
    divisor = window_normaliser(loss_type, 4, int(mask.sum()), 6)

    def run(chunks):
        x = logp.clone().requires_grad_(True)
        total = 0.0
        for rows in chunks:
            terms = token_terms(x[rows], old[rows], adv[rows], 0.2, 0.28, 0.04, ref[rows])
            loss = summed_loss(terms["loss"], mask[rows], loss_type) / divisor
            loss.backward()
            total += float(loss.detach())
        return total, x.grad

    whole, grad_whole = run([slice(0, 4)])
    split, grad_split = run([slice(i, i + 1) for i in range(4)])
    assert split == pytest.approx(whole, abs=1e-12)
    assert torch.allclose(grad_whole, grad_split, atol=1e-12)


def test_the_g_completions_of_a_prompt_share_its_prompt_cache():
    """shared_prompt_cache: each prompt is read once for its G rows (the forward sees the
    unique prompts), and generating on from that cache draws the very completions generating
    from the repeated prompts draws, with the same seed (left padding included)."""
    from dtune.grpo import CACHE, left_pad, shared_prompt_cache

    model = tiny_double_llama().eval()
    seen = []
    model.model.register_forward_hook(lambda m, args, kwargs, out: seen.append(
        tuple(kwargs["input_ids"].shape)) if kwargs.get("input_ids") is not None else None,
        with_kwargs=True)

    class Engine:
        module = model

        def to_device(self, batch):
            return batch

    prompts, group = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], 3
    ids, mask = left_pad([p for p in prompts for _ in range(group)], 0)
    outputs = []
    for cache in (None, shared_prompt_cache(Engine(), prompts, group, 0)):
        torch.manual_seed(1)
        outputs.append(model.generate(input_ids=ids, attention_mask=mask, **{CACHE: cache},
                                      max_new_tokens=6, do_sample=True, top_k=0,
                                      pad_token_id=0, eos_token_id=1))
    assert torch.equal(outputs[0], outputs[1])
    assert (3, 4) in seen  # the shared prefix: 3 prompts, their tokens but the last
    assert shared_prompt_cache(Engine(), prompts, 1, 0) is None  # G=1: nothing to share
    from peft import PromptTuningConfig, get_peft_model
    Engine.module = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM",
                                                             num_virtual_tokens=2))
    assert shared_prompt_cache(Engine(), prompts, group, 0) is None  # PEFT's own prefix


def test_the_completion_ends_at_its_first_eos():
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 9], [5, 6, 7, 8, 9]])
    assert completion_mask(ids, 2).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0],
                                                [1, 1, 1, 1, 1]]
    assert completion_mask(ids, [7, 2]).tolist()[1] == [1, 1, 0, 0, 0]


def test_skipped_zero_signal_groups_leave_the_loss_and_its_normalisers():
    """skip_zero_std_groups: a group whose rewards are all equal trains nothing and is not
    counted in the window's completions or tokens; without it, it is counted (advantage 0)."""
    from dtune.grpo import Rollout, score, window_counts

    terms = parse_rewards([{"name": "exact_match", "weight": 1.0}])
    for skip, sequences, tokens in ((True, 2, 5), (False, 4, 9)):
        mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.float)
        rollout = Rollout(torch.zeros(4, 5, dtype=torch.long), torch.ones(4, 5, dtype=torch.long),
                          torch.zeros(4, 5, dtype=torch.long), mask, ["7", "8", "x", "y"],
                          ["7", "7", "1", "1"])
        score(rollout, terms, group=2, max_new_tokens=3, scale=True, skip_zero_std=skip)
        counts = window_counts([rollout], [rollout])
        assert rollout.zero_std.tolist() == [False, True]  # the second group: both wrong
        assert rollout.keep.tolist() == ([1, 1, 0, 0] if skip else [1, 1, 1, 1])
        assert (counts["sequences"], counts["tokens"]) == (sequences, tokens)
        assert counts["metrics"]["zero_std_groups"] == 1 and counts["metrics"]["groups"] == 2
        assert counts["metrics"]["reward/exact_match/mean"] == 0.25


# --- rewards --------------------------------------------------------------------------------

def brevity(completions, answers, lengths, limit=3):
    """A user reward for the _target_ test."""
    return [1.0 if n <= limit else 0.0 for n in lengths]


def test_a_group_without_signal_is_replaced_by_its_next_draw_with_one():
    """Dynamic sampling (objective.resample_zero_std_groups): a group whose rewards were all
    equal takes the same prompt's group from a new draw when that one has a signal; a group
    with a signal keeps its own; completions of another width are padded and masked out."""
    from dtune.grpo import Rollout, refilled, score
    from dtune.rewards import parse_rewards

    terms = parse_rewards([{"name": "exact_match", "weight": 1.0}])

    def rollout(completions, width):
        prompt = torch.tensor([[0, 7, 8]] * 2 + [[9, 10, 11]] * 2)  # 2 prompts x G=2
        tokens = torch.arange(4 * width).view(4, width) + 20
        mask = torch.ones(4, width)
        attention = torch.cat([torch.tensor([[0, 1, 1]] * 2 + [[1, 1, 1]] * 2), mask.long()], 1)
        made = Rollout(torch.cat([prompt, tokens], 1), attention,
                       (attention.cumsum(1) - 1).clamp(min=0), mask, completions,
                       ["a", "a", "b", "b"])
        score(made, terms, 2, 8, scale=True, skip_zero_std=True)
        return made

    first = rollout(["x", "y", "b", "c"], 2)  # prompt 0: no signal; prompt 1: a signal
    fresh = rollout(["a", "z", "x", "y"], 3)  # prompt 0: a signal; prompt 1: none
    assert first.zero_std.tolist() == [True, False] and fresh.zero_std.tolist() == [False, True]
    merged = refilled(first, fresh, 2, pad_id=0)
    score(merged, terms, 2, 8, scale=True, skip_zero_std=True)
    assert merged.completions == ["a", "z", "b", "c"] and merged.resampled == 1
    assert merged.zero_std.tolist() == [False, False] and merged.keep.tolist() == [1, 1, 1, 1]
    assert merged.width == 3
    assert torch.equal(merged.input_ids[:2], fresh.input_ids[:2])  # prompt 0: fresh's rows
    assert merged.input_ids[2:, :5].tolist() == first.input_ids[2:].tolist()
    assert merged.input_ids[2:, 5].tolist() == [0, 0]  # widened with padding ...
    assert merged.completion_mask[2:].tolist() == [[1, 1, 0], [1, 1, 0]]  # ... masked out
    assert merged.attention_mask[2:, 5].tolist() == [0, 0]
    assert merged.position_ids[2:, :5].tolist() == first.position_ids[2:].tolist()
    # a group that has no signal in either draw stays as it was, counted as without one
    again = refilled(first, rollout(["x", "y", "x", "y"], 2), 2, pad_id=0)
    assert again.completions == first.completions and again.resampled == 0


def test_each_draw_has_a_seed_of_its_own():
    """The seeds of the step, micro-batch and redraw differ where torch's CPU generator reads
    them (the low 32 bits): a redraw that drew the very same samples would never refill a
    group (it did, when the draw was added above bit 32)."""
    from dtune.grpo import sample_seed

    seeds = {sample_seed(0, step, place, draw) for step in range(50) for place in range(8)
             for draw in range(3)}
    assert len({s % 2**32 for s in seeds}) == 50 * 8 * 3
    assert sample_seed(0, 3, 1, 1) == sample_seed(0, 3, 1, 1)  # a resume draws the same
    draws = []
    for draw in (0, 1):
        torch.manual_seed(sample_seed(0, 3, 1, draw))
        draws.append(torch.rand(4))
    assert not torch.equal(*draws)


def test_built_in_and_user_rewards_score_completions():
    terms = parse_rewards({"exact_match": 1.0, "json_valid": 0.5,
                           "format": {"weight": 0.2, "pattern": r"\d+"},
                           "length_penalty": 0.1,
                           "mine": {"weight": 2.0, "_target_": "test_grpo.brevity", "limit": 2}})
    completions, answers, lengths = ["42", '{"a": 1}', "no"], ["42", "x", None], [1, 4, 2]
    got = {t.name: t.score(completions, answers, lengths, 8) for t in terms}
    assert got == {"exact_match": [1.0, 0.0, 0.0], "json_valid": [1.0, 1.0, 0.0],
                   "format": [1.0, 0.0, 0.0], "length_penalty": [-0.125, -0.5, -0.25],
                   "mine": [1.0, 0.0, 1.0]}
    assert [t.weight for t in terms] == [1.0, 0.5, 0.2, 0.1, 2.0]


@pytest.mark.parametrize("rewards,expect", [
    ("[{name:exact_matc,weight:1.0}]", ["objective.rewards[0].name='exact_matc'", "exact_match"]),
    ("[{name:format,weight:1.0,pattern:'(ab'}]", ["pattern='(ab'", "not a valid regular"]),
    ("[{name:format,weight:1.0}]", ["lacks pattern", "Add pattern"]),
    ("[{name:mine,_target_:nowhere.at_all}]", ["_target_='nowhere.at_all'", "importing nowhere"]),
    ("[{name:exact_match,weight:x}]", ["weight='x'", "finite number"]),
    ("[]", ["objective.rewards is empty"]),
    ("[{name:exact_match},{name:exact_match}]", ["more than once"]),
])
def test_a_bad_reward_config_is_refused_before_anything_loads(rewards, expect):
    with pytest.raises(DtuneError) as err:
        compose(*TINY, "objective=grpo", f"objective.rewards={rewards}")
    assert "\n" not in str(err.value)
    for fragment in expect:
        assert fragment in str(err.value)


def test_grpo_settings_are_refused_with_other_objectives_and_vice_versa():
    with pytest.raises(DtuneError, match="objective.num_generations=8 has no effect"):
        compose(*TINY, "objective=sft", "objective.num_generations=8")
    with pytest.raises(DtuneError, match="is a DPO loss"):
        compose(*TINY, "objective=grpo", "objective.loss_type=sigmoid")
    with pytest.raises(DtuneError, match="is a GRPO normalisation"):
        compose(*TINY, "data=builtin_preference", "objective=dpo", "objective.loss_type=dapo")
    with pytest.raises(DtuneError, match="data.format=preference"):
        compose(*TINY, "data=builtin_preference", "objective=grpo")
    with pytest.raises(DtuneError, match="objective.resample_zero_std_groups=-1 is out of"):
        compose(*TINY, "objective=grpo", "objective.resample_zero_std_groups=-1")
    # the KL term under sharded weights: a frozen copy refused, the adapters-off model fine
    sharded = [*TINY, "objective=grpo", "objective.beta=0.05", "parallelism=zero3",
               "parallelism.nproc_per_node=2"]
    with pytest.raises(DtuneError, match="objective.beta=0.05 with .method=full and "
                                         "parallelism=zero3"):
        compose(*sharded, "+method=full")
    assert compose(*sharded).method.name == "lora"


# --- a tiny run: it samples, scores, trains, logs, and a resume draws the same samples ------

def distinct_characters(completions, answers, lengths):
    """A reward a random model's samples differ on, so the tiny run has a signal to learn."""
    return [len(set(c)) / 10 for c in completions]


GRPO_RUN = [*TINY, "objective=grpo", "objective.num_generations=2", "objective.max_new_tokens=6",
            "train.micro_batch_size=2", "train.grad_accum_steps=2", "eval.exact_match_samples=2",
            "eval.max_new_tokens=6", "data.builtin.train_size=32", "data.builtin.eval_size=4",
            "objective.rewards=[{name:exact_match,weight:1.0},{name:chars,weight:1.0,"
            "_target_:test_grpo.distinct_characters}]", "objective.num_iterations=2",
            "objective.beta=0.05", "train.lr=3e-3", "train.max_steps=3", "train.save_every=2",
            "objective.resample_zero_std_groups=1"]


def test_a_tiny_grpo_run_trains_logs_its_metrics_and_resumes_bitwise(tmp_path, tiny_lora_run):
    """GRPO on top of an SFT run (model.init_from: its LoRA adapter merged into the base)."""
    import shutil

    from conftest import train
    from dtune.metrics import read_metrics
    from dtune.objectives import GRPO_METRICS

    whole = tmp_path / "whole"
    start = f"model.init_from={tiny_lora_run}"
    result = train(whole, *GRPO_RUN, start)
    assert result.summary["model_source"] == f"init_from {tiny_lora_run / 'final'}"
    steps = [m for m in read_metrics(whole / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert set(GRPO_METRICS) <= set(m)
        assert {"reward/exact_match/mean", "reward/chars/mean", "reward/chars/std"} <= set(m)
        assert m["groups"] == 4  # 2 micro-batches x 2 prompts
        assert 1 <= m["completion_length/mean"] <= 6
    assert any(m["grad_norm"] > 0 for m in steps)  # the reward's signal reached the weights
    assert any(m["kl"] > 0 for m in steps[1:])  # the policy moved from its reference
    assert result.summary["objective"] == "grpo" and "final_reward/mean" in result.summary
    assert result.summary["reference"] == "adapter_disabled"
    # the tools read final/ (this run's adapter) onto the merged SFT model it trained on
    from dtune.load_run import load_final_model
    reread, _, _ = load_final_model(whole)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        assert torch.allclose(reread(input_ids=ids).logits,
                              result.model.eval()(input_ids=ids).logits, atol=1e-5)

    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step-3")
    shutil.rmtree(cut / "final")
    (cut / "checkpoints" / "latest").write_text("step-2")
    resumed = train(cut, *GRPO_RUN, start, "train.resume=true")
    assert resumed.summary["resumed_from"].endswith("step-2")
    again = [m for m in read_metrics(cut / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in again] == [1, 2, 3]
    for key in ("loss", "grad_norm", "reward/mean", "reward/chars/mean",
                "completion_length/mean", "clip_fraction", "kl"):
        assert [m[key] for m in again] == [m[key] for m in steps], key  # bitwise


# --- the recipe's step: one micro-batch of G rows and G micro-batches of one, same gradient --

class HostEngine:
    """What accumulate_grpo_gradients asks of an engine, for a bare model on the CPU."""

    def __init__(self, model):
        self.model = self.module = model
        self.device = torch.device("cpu")

    def to_device(self, batch):
        return dict(batch)

    def forward_context(self, last_in_window):
        import contextlib
        return contextlib.nullcontext()

    eval_context = forward_context

    def backward(self, loss):
        loss.backward()


PROMPTS, COMPLETIONS = [[5, 6, 7], [8, 9], [5, 6, 7], [10]], [[11, 12, 2], [13, 2, 0],
                                                             [14, 15, 16], [2, 0, 0]]


def tiny_double_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, pad_token_id=0)).double()


def rollout_of(rows, advantages, keep=None):
    """A Rollout of PROMPTS/COMPLETIONS' `rows`, left-padded as sample_group lays it out."""
    from dtune.grpo import Rollout, left_pad

    ids, mask = left_pad([PROMPTS[i] for i in rows], 0)
    done = torch.tensor([COMPLETIONS[i] for i in rows])
    cmask = completion_mask(done, 2)
    attention = torch.cat([mask, cmask.long()], 1)
    keep = torch.ones(len(rows), dtype=torch.float64) if keep is None else keep[rows]
    return Rollout(torch.cat([ids, done], 1), attention, (attention.cumsum(1) - 1).clamp(min=0),
                   cmask.double(), [str(i) for i in rows], [None] * len(rows),
                   advantages[rows], keep=keep,
                   rewards={"total": advantages[rows].clone()})


def loss_and_grads(model, rollouts, divisor, tokens, objective, reference=None):
    from dtune.train import accumulate_grpo_gradients

    model.zero_grad()
    totals = accumulate_grpo_gradients(HostEngine(model), rollouts, divisor, tokens, objective,
                                       reference)
    return totals, [p.grad.clone() for p in model.parameters()]


def test_the_recipe_step_gives_one_update_however_the_window_is_split():
    """accumulate_grpo_gradients over one rollout of 4 completions equals it over 4 rollouts
    of one (their own padding), for each normaliser: the divisor is the window's."""
    model = tiny_double_llama()
    advantages = torch.tensor([0.8, -0.8, 1.1, -1.1], dtype=torch.float64)
    tokens = int(sum(completion_mask(torch.tensor(COMPLETIONS), 2).sum(1)))
    objective = compose(*TINY, "objective=grpo", "objective.max_new_tokens=3").objective
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        divisor = window_normaliser(loss_type, 4, tokens, 3)
        cfg = dataclasses.replace(objective, loss_type=loss_type)
        (whole, grads), (split, split_grads) = (
            loss_and_grads(model, [rollout_of(r, advantages) for r in split], divisor, tokens,
                           cfg) for split in ([[0, 1, 2, 3]], [[0], [1], [2], [3]]))
        assert float(split[0]) == pytest.approx(float(whole[0]), abs=1e-9)
        for a, b in zip(grads, split_grads):
            assert torch.allclose(a, b, atol=1e-9), loss_type


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_rows_without_a_gradient_are_left_out_of_the_update(beta):
    """grpo.trained_rows: the update runs only on rows with a gradient (not a dropped
    group's; without KL not a zero-advantage one either), cut to the columns they use, and
    gives the whole rollout's loss, clip fraction, KL and gradient; where none has one, a
    single row still runs (every rank must join each backward) and the gradient is 0."""
    from dtune.grpo import trained_rows

    model = tiny_double_llama()
    # rows 0, 1: a group with a signal; 2: a zero-signal group's (advantage 0, kept);
    # 3: a dropped group's (keep 0)
    advantages = torch.tensor([0.8, -0.8, 0.0, 0.0], dtype=torch.float64)
    keep = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    whole = rollout_of([0, 1, 2, 3], advantages, keep)
    tokens = int((whole.completion_mask * keep.unsqueeze(1)).sum())
    objective = dataclasses.replace(
        compose(*TINY, "objective=grpo", "objective.max_new_tokens=3").objective, beta=beta)
    if beta:  # its own reference: the log-probs of a frozen copy, perturbed
        ref_model = tiny_double_llama()
        with torch.no_grad():
            for q in ref_model.parameters():
                q.add_(0.01)

        class Reference:
            def token_logps(self, engine, inputs, width, temperature):
                from dtune.grpo import completion_logps
                with torch.no_grad():
                    return completion_logps(ref_model, inputs, width, temperature)
    cut = trained_rows(whole, beta)
    assert cut.completions == (["0", "1", "2"] if beta else ["0", "1"])
    if not beta:  # rows 0 and 1: a prompt of 3 and 2 tokens, completions of 3 and 2
        assert cut.input_ids.tolist() == [[5, 6, 7, 11, 12, 2], [0, 8, 9, 13, 2, 0]]
        assert cut.width == 3 and cut.position_ids[1].tolist() == [0, 0, 1, 2, 3, 3]
    (full, grads), (part, part_grads) = (
        loss_and_grads(model, [rollout], 7, tokens, objective, Reference() if beta else None)
        for rollout in (whole, cut))
    assert torch.allclose(full, part, atol=1e-12) and float(full[0]) != 0
    for a, b in zip(grads, part_grads):
        assert torch.allclose(a, b, atol=1e-12)
    nothing = dataclasses.replace(whole, advantages=torch.zeros(4, dtype=torch.float64),
                                  keep=torch.zeros(4, dtype=torch.float64))
    alone = trained_rows(nothing, beta)
    assert alone.completions == ["0"] and alone.input_ids.size(0) == 1
    if not beta:
        _, zero = loss_and_grads(model, [alone], 7, tokens, objective)
        assert all(float(g.abs().max()) == 0 for g in zero)


def test_grpo_on_two_ranks_equals_one_process_with_accumulation(tmp_path):
    """The samples are seeded by their micro-batch's place in the global window and the
    normalisers counted over every rank, so 2 ranks x 1 micro-batch give 1 process x 2's
    losses, gradient norms and rewards, under DDP (its gradient mean compensated by the
    engine) and under ZeRO-3 (the weights sharded)."""
    import json

    from conftest import run_dtune

    common = ["model=tiny-llama", "data.builtin.train_size=64", "data.builtin.eval_size=4",
              "eval.exact_match_samples=0", "train.log_every=1", "train.save_every=0",
              "train.warmup_steps=0", "objective=grpo", "objective.num_generations=2",
              "objective.max_new_tokens=6", "train.micro_batch_size=2", "train.max_steps=2",
              "objective.rewards=[{name:format,weight:1.0,pattern:'[^0-9]*'}]",
              "train.lr=1e-2", "objective.beta=0.05", "objective.resample_zero_std_groups=1"]
    runs = {"one": ["train.grad_accum_steps=2"],
            "ddp": ["parallelism=ddp", "parallelism.nproc_per_node=2"],
            # every rank joins each forward: generation (and a redraw, when any rank makes
            # one) gathers the sharded weights; the reference is the model, adapters off
            "zero3": ["parallelism=zero3", "parallelism.nproc_per_node=2"]}
    steps = {}
    for name, layout in runs.items():
        result = run_dtune(*common, *layout, f"hydra.run.dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-3000:]
        steps[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl")
                       .read_text().splitlines() if '"loss"' in line]
    assert any(m["grad_norm"] > 0 for m in steps["one"])
    for layout in ("ddp", "zero3"):
        assert [m["step"] for m in steps[layout]] == [1, 2]
        for key in ("loss", "grad_norm", "reward/mean", "kl", "clip_fraction", "groups",
                    "resampled_groups"):
            assert [m[key] for m in steps[layout]] == pytest.approx(
                [m[key] for m in steps["one"]], abs=1e-6), (layout, key)


# --- model.init_from: a full model, an adapter trained on, and the weights it records -------

def test_init_from_a_full_model_and_an_adapter_trained_on(tmp_path, tiny_lora_run):
    """A full model's final/ is the starting weights as they are; with
    model.init_adapter=continue an adapter's final/ is trained on (not merged), and the run's
    own final/ reads back onto the earlier run's base; the config records final/'s SHA-256
    and a run starts only from those very weights."""
    import shutil

    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from conftest import train
    from dtune.load_run import load_base, load_final_model, load_run_config

    full = tmp_path / "full"
    train(full, *TINY, "+method=full", "train.max_steps=2", "train.lr=1e-3",
          "eval.exact_match_samples=0")
    cfg = compose(*TINY, "+method=full", f"model.init_from={full}")
    assert cfg.settled.init_from and len(cfg.settled.init_from) == 64
    model, _, source = load_base(cfg, {})
    assert source == f"init_from {full / 'final'}"
    saved = {k: v for f in (full / "final").glob("*.safetensors") for k, v in load_file(f).items()}
    mine = model.state_dict()
    assert saved and all(torch.equal(mine[k], v) for k, v in saved.items())
    with pytest.raises(DtuneError, match="final/ is a full model, with no adapter"):
        load_base(compose(*TINY, f"model.init_from={full}", "model.init_adapter=continue"), {})

    lora = tmp_path / "lora"  # a copy: its final/ is changed below
    shutil.copytree(tiny_lora_run, lora)
    adapter = load_file(lora / "final" / "adapter_model.safetensors")
    with pytest.raises(DtuneError, match="method.r=8 here, 16 there"):
        load_base(compose(*TINY, f"model.init_from={lora}", "model.init_adapter=continue",
                          "method.r=8"), {})
    go_on = tmp_path / "go-on"
    continued = (*TINY, f"model.init_from={lora}", "model.init_adapter=continue",
                 "train.lr=1e-3", "eval.exact_match_samples=0", "train.save_every=2")
    result = train(go_on, *continued, "train.max_steps=2")
    trained = {k: v for k, v in result.model.state_dict().items() if "lora_" in k}
    assert len(trained) == len(adapter)
    # trained on from the adapter's values (2 Adam steps of lr 1e-3 away), not from a fresh
    # LoRA's (its B starts at zero, as far from these as they are large)
    for key, start in adapter.items():
        now = trained[key.replace(".weight", ".default.weight")]
        assert (now - start).abs().max() <= 2.5e-3, key
    assert max(v.abs().max() for k, v in adapter.items() if "lora_B" in k) > 1e-2
    reread, _, _ = load_final_model(go_on)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        assert torch.allclose(reread(input_ids=ids).logits,
                              result.model.eval()(input_ids=ids).logits, atol=1e-5)
    recorded = OmegaConf.load(go_on / ".hydra" / "config.yaml").settled.init_from
    assert recorded == compose(*TINY, f"model.init_from={lora}").settled.init_from

    (lora / "final" / "notes.txt").write_text("changed since")
    with pytest.raises(DtuneError, match="final/ is not what it was then"):
        load_run_config(go_on)
    stale = compose(*TINY, f"model.init_from={lora}", "model.init_adapter=continue")
    (lora / "final" / "notes.txt").write_text("changed again")
    with pytest.raises(DtuneError, match="changed after this run's config was settled"):
        load_base(stale, {})
    # nor does a resume go on from other weights than its checkpoint trained from
    with pytest.raises(DtuneError, match=r"(?s)model.init_from's final/ \(the SHA-256.*"
                                         r"in the checkpoint"):
        train(go_on, *continued, "train.max_steps=4", "train.resume=true")
