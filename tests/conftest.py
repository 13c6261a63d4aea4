"""Shared helpers: compose configs like the CLI does, and run dtune as a user would."""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
# Small, fast settings for the tiny random model; tests add what they exercise.
TINY = [
    "model=tiny-llama",
    "data.builtin.train_size=256",
    "data.builtin.eval_size=32",
    "eval.exact_match_samples=8",
    "eval.max_new_tokens=12",
    "train.micro_batch_size=4",
    "train.log_every=1",
    "train.save_every=0",
    "train.warmup_steps=0",
]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Random-init models go to a per-session cache; the real SmolLM2 keeps the user's cache."""
    os.environ.setdefault("DTUNE_REAL_CACHE_DIR",
                          os.environ.get("DTUNE_CACHE_DIR", str(Path.home() / ".cache/dtune")))
    os.environ["DTUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("dtune-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    yield


@pytest.fixture(autouse=True)
def _library_noise_filtered():
    """Every dtune process filters the library warnings no user can act on (dtune/logs.py);
    so does every test. pytest swaps in its own warning filters around each test (and around
    collection, where dtune is first imported), so they are put back here each time."""
    from dtune.logs import filter_library_noise

    filter_library_noise()


def compose(*overrides: str):
    """The settled Config that `python -m dtune <overrides>` would run on this machine."""
    from dtune.settle import settled_config

    return settled_config(list(overrides))


def run_dtune(*args: str, module: bool = True, env: dict | None = None,
              timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m dtune ARGS` (or the `dtune` console script) as a subprocess."""
    command = [sys.executable, "-m", "dtune"] if module else [sys.executable, "-m", "dtune.cli"]
    return subprocess.run(
        command + list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def tiny_lora_run(tmp_path_factory) -> Path:
    """One real CLI run of LoRA on the tiny model, shared by the tests that inspect a run dir."""
    run_dir = tmp_path_factory.mktemp("tiny-lora-run")
    result = run_dtune(*TINY, "+method=lora", "train.max_steps=12", "train.lr=3e-3",
                       "train.save_every=6", "train.eval_every=4", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def one_line(text: str) -> str:
    """Error output with the terminal wrapping undone, for substring checks."""
    return " ".join(text.split())


def train(run_dir: Path, *overrides: str):
    """Train in-process and leave `.hydra/config.yaml` as the CLI would, for the run-dir tools."""
    from omegaconf import OmegaConf

    from dtune.train import run

    cfg = compose(*overrides)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / ".hydra" / "config.yaml")
    return run(cfg, run_dir)


@pytest.fixture(scope="session")
def constant_answer_data(tmp_path_factory) -> Path:
    """A chat task a frozen random base can still learn in 30 steps: one fixed answer."""
    import json
    import random

    from dtune.data.builtin import WORDS

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "constant.jsonl"
    with path.open("w") as handle:
        for _ in range(200):
            handle.write(json.dumps({"messages": [
                {"role": "user", "content": " ".join(rng.sample(WORDS, 4))},
                {"role": "assistant", "content": "the answer is yes"},
            ]}) + "\n")
    return path


@pytest.fixture
def wandb_env(tmp_path):
    """An environment where wandb finds no login and writes nothing outside tmp_path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WANDB_") and k not in ("NETRC", "HF_TOKEN")}
    home = tmp_path / "home"
    home.mkdir()
    env.update(HOME=str(home), WANDB_CONFIG_DIR=str(home / "wandb-config"),
               WANDB_CACHE_DIR=str(home / "wandb-cache"),
               WANDB_DATA_DIR=str(home / "wandb-data"), WANDB_MODE="offline")
    return env


# Test tiers (#23). Each test is marked by what it starts, read from its source (and its
# fixtures' and helpers' source, followed through the names they use) rather than tagged by
# hand: `e2e` runs a whole `python -m dtune` in a subprocess, `multiprocess` starts several
# training processes (DDP, ZeRO, torchrun, kill tests), and `fast` is every test that is none
# of these nor `slow` or `slurm`: the in-process unit tests (`python -m pytest -m fast`).
# dtune.parity.run_check trains each layout (DDP, ZeRO on 2 ranks) as `python -m dtune` runs.
RUN_CHECK = r"|from dtune\.parity import[^\n]*\brun_check\b"
E2E_SOURCE = re.compile(r'run_dtune\(|tiny_lora_run|executable, "-m", "dtune|\["-m", "dtune'
                        r'|bench/gpu_check|"gpu_check\.(py|sh)"' + RUN_CHECK)
MULTIPROCESS_SOURCE = re.compile(r"parallelism\.nproc_per_node=[2-9]\b|nnodes=[2-9]\b"
                                 r"|mp\.spawn|nprocs=[2-9]\b|SIGKILL|kill_fuzz" + RUN_CHECK)
# What the source patterns cannot see: ranks started by hand.
MULTIPROCESS_TESTS = {
    "tests/test_security_network.py::"
    "test_gather_sends_numbers_and_exact_match_is_the_same_under_two_ranks",
}
# Builds that start neither dtune nor ranks, yet take long: left out of the fast tier, by name.
NOT_FAST = {
    # compiles DeepSpeed's CPU Adam kernel into the session's fresh cache (minutes of C++)
    "tests/test_deepspeed_ops.py::test_a_killed_builds_lock_file_does_not_block_deepspeed_kernels",
    # runs docker/test-build.sh with buildah (about 30 s where buildah is installed)
    "tests/test_containers.py::test_a_broken_build_step_fails_the_test_build_and_is_named",
}


def _function_source(function) -> str:
    """A function's source from its `def` on (not its decorators: a parametrize list speaks
    for each case through the case's own parameters)."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return ""
    start = re.search(r"^\s*(async\s+)?def ", source, re.M)
    return source[start.start():] if start else source


def _code_names(code) -> set[str]:
    names = set(code.co_names) | set(code.co_varnames)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _code_names(const)
    return names


_reach_cache: dict[object, str] = {}


def _reached_source(function) -> str:
    """The source of `function` and of every test-suite function or constant it names."""
    if function in _reach_cache:
        return _reach_cache[function]
    _reach_cache[function] = ""  # recursion guard
    parts = [_function_source(function)]
    code = getattr(function, "__code__", None)
    module_globals = getattr(function, "__globals__", {})
    for name in _code_names(code) if code else ():
        value = module_globals.get(name)
        if inspect.isfunction(value) and Path(value.__code__.co_filename).parent == ROOT / "tests":
            parts.append(_reached_source(value))
        elif inspect.isfunction(value):  # imported from dtune: as if imported inside
            parts.append(f"from {value.__module__} import {value.__name__}")
        elif isinstance(value, (str, list, tuple)) and name.isupper():
            parts.append(repr(value))
    _reach_cache[function] = "\n".join(parts)
    return _reach_cache[function]


def _item_source(item) -> str:
    parts = [_reached_source(item.function)]
    for name, defs in item._fixtureinfo.name2fixturedefs.items():
        parts.append(name)
        for fixturedef in defs:
            if Path(inspect.getsourcefile(fixturedef.func) or "").parent == ROOT / "tests":
                parts.append(_reached_source(fixturedef.func))
    if hasattr(item, "callspec"):
        parts.append(repr(item.callspec.params))
    return "\n".join(parts)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by these markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        source = _item_source(item)
        if E2E_SOURCE.search(source):
            item.add_marker(pytest.mark.e2e)
        if MULTIPROCESS_SOURCE.search(source) or item.nodeid.split("[")[0] in MULTIPROCESS_TESTS:
            item.add_marker(pytest.mark.multiprocess)
        tiers = {"slow", "slurm", "e2e", "multiprocess"}
        if not tiers & {mark.name for mark in item.iter_markers()} and \
                item.nodeid.split("[")[0] not in NOT_FAST:
            item.add_marker(pytest.mark.fast)
