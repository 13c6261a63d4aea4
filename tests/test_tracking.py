"""Weights & Biases tracking, checked by reading back the offline run files with wandb's own
reader (`wandb leet inspect --json`, which wandb-core implements), not a mocked module."""
import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, compose, one_line, run_dtune
from dtune.errors import DtuneError
from dtune.metrics import read_metrics
from dtune.run_dir import RunDir
from dtune.tracking import (Tracker, WandbTracker, choose_mode, create_tracker,
                            has_credentials, init_args, redact, wandb_metrics)

FAKE_KEY = "0123456789abcdef0123456789abcdef0dtune42"  # 40 characters, like a real key
FAKE_HF_TOKEN = "hf_dtuneFakeTokenThatMustNotLeak1234"


def run_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    from conftest import ROOT

    return subprocess.run([sys.executable, "-m", "dtune", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def read_wandb(run_file: Path, env: dict) -> dict:
    """What an offline run recorded, through wandb's own transaction-log reader."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                          str(run_file)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    history = {}
    for r in records:
        if r["type"] == "history":
            step = int(r["history"].get("step", {}).get("num", 0))
            history.setdefault(step, {}).update(r["history"]["item"])
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    runs = [r["run"] for r in records if r["type"] == "run"]
    return {"run": runs[0] if runs else None, "history": history, "summary": summary,
            "artifacts": [r["artifact"] for r in records if r["type"] == "artifact"],
            "exit": [r["exit"] for r in records if r["type"] == "exit"]}


def run_id_of(run_dir: Path) -> str:
    return json.loads(RunDir(run_dir).run_file.read_text())["run_id"]


def offline_runs(run_dir: Path) -> list[Path]:
    """The run's offline W&B fragments, oldest first (one per process that trained)."""
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"),
                  key=lambda p: p.parent.name)


# --- the parts, without W&B ---------------------------------------------------------------

def test_train_and_eval_records_get_wandb_names():
    step = {"step": 3, "loss": 1.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 900.0,
            "trained_tokens": 4000, "loss_scale": 1024.0}
    assert wandb_metrics(step) == {"train/loss": 1.5, "train/lr": 1e-3, "train/grad_norm": 0.5,
                                   "train/tokens_per_s": 900.0, "train/trained_tokens": 4000,
                                   "train/loss_scale": 1024.0}
    evaluation = {"step": 3, "split": "eval", "eval_loss": 1.2, "exact_match": 0.5,
                  "exact_match/add": 0.25}
    assert wandb_metrics(evaluation) == {"eval/loss": 1.2, "eval/exact_match": 0.5,
                                         "eval/exact_match/add": 0.25}


def test_mode_is_config_then_wandb_mode_then_offline_without_credentials(tmp_path):
    no_netrc = {"NETRC": str(tmp_path / "missing")}
    assert choose_mode("disabled", {"WANDB_MODE": "online"})[0] == "disabled"
    assert choose_mode(None, {**no_netrc, "WANDB_MODE": "disabled"})[0] is None  # wandb reads it
    assert choose_mode(None, {**no_netrc, "WANDB_API_KEY": FAKE_KEY})[0] == "online"
    mode, why = choose_mode(None, no_netrc)
    assert mode == "offline" and "no W&B API key" in why


def test_a_wandb_login_in_netrc_counts_as_credentials(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    assert has_credentials({"NETRC": str(netrc)})
    assert not has_credentials({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.corp"})
    assert not has_credentials({"NETRC": str(tmp_path / "missing")})


def test_defaults_group_by_slurm_array_and_tag_method_model_parallelism(tmp_path):
    cfg = compose(*TINY, "+method=lora", "tracker=wandb")
    args = init_args(cfg, tmp_path / "lr-1e-3", "abc", {"SLURM_ARRAY_JOB_ID": "4242"})
    assert args["tags"] == ["lora", "tiny-llama", "single"]
    assert args["group"] == "slurm-array-4242"
    assert args["name"] == "lr-1e-3"
    dpo = compose(*TINY, "+method=lora", "tracker=wandb", "objective=dpo",
                  "data.format=preference", "eval.exact_match_samples=0")
    assert init_args(dpo, tmp_path / "d", "abc", {})["tags"] == \
        ["lora", "tiny-llama", "single", "dpo"]  # a preference run says which objective
    assert args["id"] == "abc" and args["resume"] == "allow"
    assert args["config"] == dataclasses.asdict(cfg)
    custom = compose(*TINY, "tracker=wandb", "tracker.project=p", "tracker.entity=team",
                     "tracker.run_name=r", "tracker.group=g", "tracker.tags=[a,b]")
    args = init_args(custom, tmp_path, "abc", {"SLURM_ARRAY_JOB_ID": "4242"})
    assert (args["project"], args["entity"], args["name"], args["group"], args["tags"]) == \
        ("p", "team", "r", "g", ["a", "b"])


def test_in_a_hydra_multirun_the_group_is_the_sweep_and_the_name_its_job(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from conftest import CONF

    sweep = tmp_path / "lr-sweep"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        composed = hydra_compose("config", overrides=["tracker=wandb", f"hydra.sweep.dir={sweep}",
                                                      "hydra.mode=MULTIRUN"],
                                 return_hydra_config=True)
    HydraConfig.instance().set_config(composed)
    try:
        args = init_args(compose("tracker=wandb"), sweep / "3", "abc",
                         {"SLURM_ARRAY_JOB_ID": "4242"})
    finally:
        HydraConfig.instance().cfg = None
    assert args["group"] == str(sweep)
    assert args["name"] == "lr-sweep/3"


def test_only_the_main_process_and_tracker_wandb_talk_to_wandb(tmp_path):
    assert type(create_tracker(compose(*TINY, "tracker=wandb"), tmp_path, "0123456789ab",
                               is_main_process=False)) is Tracker
    assert type(create_tracker(compose(*TINY), tmp_path, "0123456789ab")) is Tracker
    assert not RunDir(tmp_path).wandb.exists()


def test_a_wandb_failure_mid_run_turns_tracking_off_instead_of_stopping_training(caplog):
    class RunThatLosesItsConnection:  # stands in for a wandb Run whose service died
        step, exit_code = 0, None

        def log(self, data, step):
            raise ConnectionError("connection to wandb-core lost")

        def finish(self, exit_code=0):
            self.exit_code = exit_code

    tracker = WandbTracker.__new__(WandbTracker)
    run = RunThatLosesItsConnection()
    tracker.run, tracker.first_step, tracker.secrets = run, 0, []
    tracker.log({"step": 1, "loss": 2.0})
    assert tracker.run is None and run.exit_code == 1
    assert "tracking is off for the rest of this run" in caplog.text
    tracker.log({"step": 2, "loss": 1.9})  # the rest is quiet, and training goes on
    tracker.summary({"final_loss": 1.9})
    tracker.finish()


def test_secrets_are_redacted_from_what_is_sent():
    sent = redact({"a": f"key={FAKE_KEY}", "b": [FAKE_HF_TOKEN, 1.0], "c": float("nan")},
                  [FAKE_KEY, FAKE_HF_TOKEN])
    assert sent == {"a": "key=***", "b": ["***", 1.0], "c": None}


@pytest.mark.parametrize("override, must_name", [
    ("tracker.name=mlflow", ["tracker.name='mlflow'", "none, wandb"]),
    ("tracker.mode=cloud", ["tracker.mode='cloud'", "online, offline, disabled"]),
])
def test_bad_tracker_values_are_refused(override, must_name):
    with pytest.raises(DtuneError) as caught:
        compose("tracker=wandb", override)
    for text in must_name:
        assert text in str(caught.value)


def test_wandb_settings_without_tracker_wandb_are_refused():
    with pytest.raises(DtuneError) as caught:
        compose("tracker.project=mine")
    assert "tracker.project='mine'" in str(caught.value)
    assert "tracker=wandb" in str(caught.value)


def test_unknown_tracker_group_option_names_the_valid_ones():
    result = run_dtune("tracker=mlflow", "model=tiny-llama")
    assert result.returncode != 0
    assert "tracker/mlflow" in one_line(result.stderr) and "wandb" in result.stderr


# --- real offline runs --------------------------------------------------------------------

def test_offline_run_records_the_config_metrics_summary_and_artifact(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    env = {**wandb_env, "SLURM_ARRAY_JOB_ID": "777"}
    overrides = [*TINY, "+method=lora", "train.max_steps=6", "train.eval_every=3",
                 "tracker=wandb", "tracker.project=dtune-test", "tracker.log_artifact=true"]
    result = run_cli(env, *overrides, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]

    [run_file] = offline_runs(run_dir)
    sent = read_wandb(run_file, env)
    run = sent["run"]
    assert run["run_id"] == run_id_of(run_dir)  # dtune's run id names the W&B run
    assert run["project"] == "dtune-test"
    assert run["run_group"] == "slurm-array-777"
    assert run["tags"] == ["lora", "tiny-llama", "single"]
    logged_config = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
    resolved = compose(*overrides)  # settled, as the run settles it here
    expected = json.loads(json.dumps(dataclasses.asdict(resolved)))
    assert logged_config == expected  # the fully resolved config
    assert logged_config["precision"]["name"] == "fp32"

    local = read_metrics(run_dir / "metrics.jsonl")
    steps = [m for m in local if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 7))
    for m in steps:
        row = sent["history"][m["step"]]
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens"):
            assert row[f"train/{key}"] == pytest.approx(m[key]), (m["step"], key)
        assert row["train/peak_memory_gib"] > 0
    evals = [m for m in local if m.get("split") == "eval"]
    assert [m["step"] for m in evals] == [0, 3, 6]
    for m in evals:
        assert sent["history"][m["step"]]["eval/loss"] == pytest.approx(m["eval_loss"])
    assert "eval/exact_match/add" in sent["history"][0]

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("final_loss", "eval_loss", "exact_match_before", "exact_match_after",
                "trainable_params", "peak_memory_bytes", "wall_time_s"):
        assert sent["summary"][key] == pytest.approx(summary[key]), key
    assert sent["exit"] and sent["exit"][-1].get("exit_code", 0) == 0

    [artifact] = sent["artifacts"]
    files = {entry["path"] for entry in artifact["manifest"]["contents"]}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert artifact["type"] == "model"


def test_without_key_or_login_the_run_goes_offline_and_says_once_how_to_sync(tmp_path,
                                                                            wandb_env):
    env = {k: v for k, v in wandb_env.items() if k != "WANDB_MODE"}
    run_dir = tmp_path / "run"
    result = run_cli(env, *TINY, "train.max_steps=2", "eval.exact_match_samples=0",
                     "tracker=wandb", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("wandb sync") == 1, output[-3000:]
    assert f"wandb sync {run_dir / 'wandb'}" in one_line(output)
    [run_file] = offline_runs(run_dir)
    assert sorted(read_wandb(run_file, env)["history"]) == [0, 1, 2]  # eval at 0, steps


def test_a_bad_key_and_an_unreachable_server_do_not_stop_training_or_leak(tmp_path,
                                                                         wandb_env):
    # Port 1 on loopback refuses connections at once; init_timeout bounds wandb's retries.
    env = {k: v for k, v in wandb_env.items() if k != "WANDB_MODE"}
    env.update(WANDB_API_KEY=FAKE_KEY, HF_TOKEN=FAKE_HF_TOKEN,
               WANDB_BASE_URL="http://127.0.0.1:1", WANDB_INIT_TIMEOUT="5")
    run_dir = tmp_path / "run"
    result = run_cli(env, *TINY, "train.max_steps=3", "tracker=wandb",
                     f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "summary.json").is_file()
    output = result.stdout + result.stderr
    assert "could not start online" in output and "logging offline instead" in output
    [run_file] = offline_runs(run_dir)
    assert sorted(read_wandb(run_file, env)["history"]) == [0, 1, 2, 3]

    # No secret anywhere: not in the saved config, the logs, the metrics, the summary, nor
    # in wandb's own files, nor on the terminal.
    for secret in (FAKE_KEY, FAKE_HF_TOKEN):
        assert secret not in output
        for path in run_dir.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


def newest_checkpoint(run_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")]
    return max(steps, default=0)


def test_a_killed_and_resumed_run_continues_the_same_wandb_run(tmp_path, wandb_env):
    from conftest import ROOT

    run_dir = tmp_path / "run"
    # Flush the offline log often, so the killed process leaves what it logged on disk.
    env = {**wandb_env, "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "0.1"}
    # 16 micro-batches a step keep steps slow enough to kill between two checkpoints.
    common = [*TINY, "+method=lora", "train.grad_accum_steps=16", "train.save_every=4",
              "eval.exact_match_samples=0", "tracker=wandb", f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen([sys.executable, "-m", "dtune", *common, "train.max_steps=400"],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        # Kill once W&B has flushed a step past the newest checkpoint, so that what the killed
        # run sent reaches the point the resumed run starts from.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            if offline_runs(run_dir) and newest_checkpoint(run_dir) >= 4:
                sent = read_wandb(offline_runs(run_dir)[0], env)["history"]
                flushed = max((s for s, row in sent.items() if "train/loss" in row), default=0)
                if flushed > newest_checkpoint(run_dir):
                    break
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it could be killed"
    finally:
        first.send_signal(signal.SIGKILL)  # as a preempted job dies: no clean-up at all
        first.wait()
    run_id = run_id_of(run_dir)
    checkpoint = newest_checkpoint(run_dir)

    # Requeued: the same command with train.resume=true. It stops a few steps after the
    # checkpoint, sooner than the killed run would have, which keeps the test short.
    end = checkpoint + 3
    result = run_cli(env, *common, f"train.max_steps={end}", "train.resume=true")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step-{checkpoint}")
    assert run_id_of(run_dir) == run_id  # a resumed run keeps its id, and its W&B run

    killed_file, resumed_file = offline_runs(run_dir)
    killed, resumed = read_wandb(killed_file, env), read_wandb(resumed_file, env)
    assert killed["run"]["run_id"] == resumed["run"]["run_id"] == run_id
    assert killed["exit"] == [] and resumed["exit"]  # the killed one never finished
    killed_steps = sorted(s for s, row in killed["history"].items() if "train/loss" in row)
    assert killed_steps == list(range(1, killed_steps[-1] + 1))
    assert killed_steps[-1] > checkpoint
    resumed_steps = sorted(s for s, row in resumed["history"].items() if "train/loss" in row)
    assert resumed_steps == list(range(checkpoint + 1, end + 1))
    # One curve: the killed run's steps up to its checkpoint, then the resumed run's.
    curve = {s: killed["history"][s]["train/loss"] for s in killed_steps if s <= checkpoint}
    curve.update({s: resumed["history"][s]["train/loss"] for s in resumed_steps})
    local = {m["step"]: m["loss"] for m in read_metrics(run_dir / "metrics.jsonl")
             if "loss" in m}
    assert sorted(curve) == list(range(1, end + 1)) == sorted(local)
    assert curve == pytest.approx(local)
    # Both processes sent the first step after the checkpoint, with the same loss: where W&B
    # holds a step twice, the two agree (the resumed run's shorter schedule only changes the
    # learning rate from the second step on).
    step = checkpoint + 1
    assert killed["history"][step]["train/loss"] == resumed["history"][step]["train/loss"]
