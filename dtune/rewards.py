"""Verifiable rewards for online RL (objective=grpo): named in config, checked before launch.

`objective.rewards` is a list of terms, each `{name, weight, ...}` (or a mapping
`name: weight`, or `name: {weight, ...}`). A completion's reward is the weighted sum of its
terms. The built-ins are REWARDS below; a user's own reward is any importable callable named by
`_target_` (its term's other keys, apart from name and weight, are passed to it):

    objective.rewards:
      - {name: exact_match, weight: 1.0}
      - {name: format, weight: 0.2, pattern: '\\d+'}
      - {name: mine, weight: 0.5, _target_: mypkg.rewards.brevity, limit: 20}

Every reward function is called as `fn(completions, answers, lengths, **params)` with the
completions' text, the reference answers (None where a row has none), and the completions'
token counts, and returns one float per completion.

No torch here: settling the config (dtune/settle.py) parses and checks the rewards before
anything heavy loads, so a typo costs no model load and no SLURM queue wait.
"""
from __future__ import annotations

import importlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from dtune.errors import DtuneError, excerpt

FIELD = "objective.rewards"


def exact_match(completions, answers, lengths, **_) -> list[float]:
    """1 where the completion, stripped, equals the reference answer (the built-in tasks'
    answers, or the assistant turn of a chat row): as held-out exact match scores it."""
    return [float(a is not None and c.strip() == a.strip()) for c, a in zip(completions, answers)]


def json_valid(completions, answers, lengths, **_) -> list[float]:
    """1 where the completion parses as JSON."""
    def ok(text: str) -> float:
        try:
            json.loads(text)
        except ValueError:
            return 0.0
        return 1.0
    return [ok(c) for c in completions]


def format_match(completions, answers, lengths, pattern: str = "", **_) -> list[float]:
    """1 where the whole completion (stripped) matches the regex `pattern`."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]


def length_penalty(completions, answers, lengths, max_new_tokens: int = 1, **_) -> list[float]:
    """-(completion tokens / max_new_tokens), in [-1, 0]: a shorter answer scores higher."""
    return [-n / max(max_new_tokens, 1) for n in lengths]


@dataclass(frozen=True)
class RewardSpec:
    fn: Callable
    what: str
    params: frozenset = frozenset()  # the keys a term may set besides name and weight
    required: frozenset = frozenset()


REWARDS: dict[str, RewardSpec] = {
    "exact_match": RewardSpec(exact_match, "1 if the completion equals the reference answer"),
    "json_valid": RewardSpec(json_valid, "1 if the completion parses as JSON"),
    "format": RewardSpec(format_match, "1 if the completion fully matches `pattern` (a regex)",
                         frozenset({"pattern"}), frozenset({"pattern"})),
    "length_penalty": RewardSpec(length_penalty, "-(completion tokens / max_new_tokens)"),
}


@dataclass(frozen=True)
class RewardTerm:
    name: str
    weight: float
    fn: Callable
    params: dict = field(default_factory=dict)

    def score(self, completions: list[str], answers: list[Optional[str]],
              lengths: list[int], max_new_tokens: int) -> list[float]:
        extra = {"max_new_tokens": max_new_tokens} if self.fn is length_penalty else {}
        values = self.fn(completions, answers, lengths, **self.params, **extra)
        values = [float(v) for v in values]
        if len(values) != len(completions) or not all(map(math.isfinite, values)):
            raise DtuneError(
                f"{FIELD}: the reward {self.name!r} returned {excerpt(values, 120)} for "
                f"{len(completions)} completions; a reward must return one finite number per "
                "completion. Fix the reward function.")
        return values


def as_terms(value: Any) -> list[dict]:
    """The config value as a list of term mappings (from a list, or a mapping name -> weight
    or name -> {weight, ...})."""
    if isinstance(value, dict):
        return [{"name": k, **(v if isinstance(v, dict) else {"weight": v})}
                for k, v in value.items()]
    if isinstance(value, (list, tuple)) and all(isinstance(t, dict) for t in value):
        return [dict(t) for t in value]
    raise DtuneError(
        f"{FIELD}={excerpt(value, 120)} is not a list of rewards. Write a list of "
        "{name, weight} mappings (e.g. objective.rewards=[{name:exact_match,weight:1.0}]) or a "
        f"mapping of name to weight; the built-in rewards are {', '.join(REWARDS)}.")


def parse_rewards(value: Any) -> list[RewardTerm]:
    """The reward terms `objective.rewards` names, each checked: a known name or an importable
    `_target_`, a finite weight, a regex that compiles. Raises one paragraph per problem."""
    terms = as_terms(value)
    if not terms:
        raise DtuneError(
            f"{FIELD} is empty: objective=grpo needs at least one reward to learn from. Add "
            f"one, e.g. objective.rewards=[{{name:exact_match,weight:1.0}}]; the built-ins are "
            f"{', '.join(REWARDS)}.")
    parsed = [parse_term(index, term) for index, term in enumerate(terms)]
    names = [t.name for t in parsed]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DtuneError(
            f"{FIELD} names {', '.join(twice)} more than once; each reward's metrics are "
            "logged under its name. Give each term a distinct name (a _target_ reward may take "
            "any name), or add the weights into one term.")
    return parsed


def parse_term(index: int, term: dict) -> RewardTerm:
    where = f"{FIELD}[{index}]"
    name, weight = term.get("name"), term.get("weight", 1.0)
    if not isinstance(name, str) or not name:
        raise DtuneError(
            f"{where}={excerpt(term, 120)} has no name. Give each reward a name: a built-in "
            f"({', '.join(REWARDS)}) or your own with _target_ naming its function.")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
            or not math.isfinite(weight):
        raise DtuneError(
            f"{where}.weight={weight!r} (reward {name!r}) is not a finite number. Set it to "
            "a finite number (1.0 counts the reward as it is; 0 turns it off).")
    params = {k: v for k, v in term.items() if k not in ("name", "weight", "_target_")}
    if "_target_" in term:
        return RewardTerm(name, float(weight), import_reward(where, term["_target_"]), params)
    spec = REWARDS.get(name)
    if spec is None:
        raise DtuneError(
            f"{where}.name={name!r} is not a built-in reward; choose one of "
            f"{', '.join(REWARDS)}, or name your own function with _target_ (e.g. "
            f"{{name: {name}, weight: 1.0, _target_: mypkg.rewards.{name}}}).")
    unknown = sorted(set(params) - spec.params)
    missing = sorted(spec.required - set(params))
    if unknown or missing:
        takes = ", ".join(sorted(spec.params)) or "none"
        raise DtuneError(
            f"{where} (reward {name!r}) " + (f"sets {', '.join(unknown)}, which it does not "
                                             "read" if unknown else
                                             f"lacks {', '.join(missing)}") +
            f"; its settings besides name and weight: {takes}. "
            + ("Remove them." if unknown else f"Add {missing[0]}."))
    if name == "format":
        check_pattern(where, params["pattern"])
    return RewardTerm(name, float(weight), spec.fn, params)


def check_pattern(where: str, pattern: Any) -> None:
    try:
        re.compile(str(pattern), re.DOTALL)
    except re.error as err:
        raise DtuneError(
            f"{where}.pattern={pattern!r} is not a valid regular expression ({err}). Fix the "
            "pattern (Python's re syntax; the whole stripped completion must match it); quote "
            "it in YAML, where backslashes and braces mean something too.") from None


def import_reward(where: str, target: Any) -> Callable:
    """The callable `target` names ("package.module.function"), imported now: a reward that
    cannot be found is refused before launch, not after the model loads."""
    module_name, _, attr = str(target).rpartition(".")
    problem = None
    if not module_name:
        problem = "it is not a dotted path module.function"
    else:
        try:
            found = getattr(importlib.import_module(module_name), attr, None)
        except Exception as err:  # the user's module: any error it raises on import
            found, problem = None, f"importing {module_name} failed: {type(err).__name__}: {err}"
        if problem is None and not callable(found):
            problem = f"{module_name} has no callable {attr}"
    if problem:
        raise DtuneError(
            f"{where}._target_={target!r} cannot be used: {problem}. Name a function as "
            "package.module.function, importable from where dtune runs (on PYTHONPATH), taking "
            "(completions, answers, lengths, **settings) and returning one float per "
            "completion.")
    return found
