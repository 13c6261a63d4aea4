"""The config settled once, before launch (dtune/settle.py): `auto` made concrete for the
machine the run trains on, the loss plan decided, frozen; the workers and a SLURM job take it
as it is; and every refusal that needs neither the model nor the data comes before a job is
submitted."""
import dataclasses
import os
import sys

import pytest

import catalogue
from conftest import TINY, compose
from dtune.compose import compose_config
from dtune.errors import DtuneError
from dtune.methods import METHODS
from dtune.settle import Machine, received, settle

GIB = 1024 ** 3
CPU = Machine(0, 16 * GIB, False, 1, "a CPU machine")
GPU = Machine(1, 80 * GIB, True, 1, "a GPU machine")


def test_auto_values_become_concrete_for_the_machine():
    composed = compose_config([*TINY, "+method=qlora"])
    assert (composed.precision.name, composed.method.compute_dtype, composed.train.lr) == \
        ("auto", "auto", None)
    on_cpu, on_gpu = settle(composed, CPU), settle(composed, GPU)
    assert (on_cpu.precision.name, on_cpu.method.compute_dtype) == ("fp32", "fp32")
    assert (on_gpu.precision.name, on_gpu.method.compute_dtype) == ("bf16", "bf16")
    assert on_cpu.train.lr == on_gpu.train.lr == METHODS["qlora"].recommended_lr
    assert on_gpu.settled.machine == "a GPU machine"
    assert composed.precision.name == "auto"  # settling copies: the input is left as it was


def test_parallelism_auto_is_planned_for_the_devices_and_names_its_engine():
    big = settle(compose_config([*TINY, "+method=full", "parallelism=auto"]), GPU)
    assert (big.parallelism.name, big.parallelism.engine) == ("single", "torch")
    # one tiny device: only a layout that moves state to the host fits
    tiny = dataclasses.replace(GPU, device_memory=2 * 1024 ** 2)
    with pytest.raises(DtuneError, match="parallelism=auto|fits"):
        settle(compose_config([*TINY, "+method=full", "parallelism=auto"]), tiny)


@pytest.mark.parametrize("overrides, plan", [
    ([], (1024, False)),
    (["train.loss_chunk_size=256"], (256, False)),
    (["+method=full", "parallelism=zero3"], (0, False)),  # ZeRO-3 shards the LM head
    (["objective=dpo", "data=builtin_preference"], (0, True)),
    (["objective=dpo", "data=builtin_preference", "+method=full", "parallelism=zero3"],
     (0, False)),
])
def test_the_loss_plan_is_settled_from_the_settings(overrides, plan):
    cfg = settle(compose_config([*TINY, *overrides]), CPU)
    assert (cfg.settled.loss_chunk_size, cfg.settled.response_head) == plan


def test_a_settled_config_is_frozen_and_settles_once():
    cfg = compose(*TINY)
    with pytest.raises(AttributeError, match="settled"):
        cfg.train.lr = 1.0
    with pytest.raises(AttributeError, match="settled"):
        cfg.precision = None
    with pytest.raises(DtuneError, match="settled already"):
        settle(cfg, CPU)


def test_settled_is_not_a_setting():
    with pytest.raises(DtuneError, match="never a setting"):
        compose_config([*TINY, "settled.loss_chunk_size=7"])


def test_training_refuses_a_config_that_was_not_settled(tmp_path):
    from dtune.train import run

    with pytest.raises(DtuneError, match="not settled"):
        run(compose_config([*TINY, "train.max_steps=1"]), tmp_path)


def test_workers_train_with_the_config_their_launcher_settled(tmp_path, monkeypatch):
    """launch_workers hands the settled config over in the environment; a worker's app takes
    it, not the config its own command line composes (which it never settles)."""
    from dtune import app, launch
    from dtune.compose import compose_dict

    cfg = compose(*TINY, "parallelism=ddp", "parallelism.nproc_per_node=2", "train.lr=3e-3")
    seen = {}
    monkeypatch.setattr(launch, "run_local_workers",
                        lambda n, args, env: seen.update(env) or 0)
    assert launch.launch_workers(cfg, str(tmp_path), []) == 0
    # A fresh environment object, as a worker process has: received() reads the one current
    # now, not one bound when dtune.settle was first imported.
    monkeypatch.setattr(os, "environ",
                        {**os.environ, "DTUNE_SETTLED_CONFIG": seen["DTUNE_SETTLED_CONFIG"]})
    assert received() == cfg
    handed, how = app.settled_launch(compose_dict([*TINY, "train.lr=1"]))
    assert handed == cfg and handed.train.lr == 3e-3 and how is launch.run_training
    with pytest.raises(AttributeError):
        handed.train.lr = 1.0


def test_a_slurm_job_is_settled_for_its_nodes_on_the_login_node():
    job = settle(compose_config([*TINY, "launcher=slurm", "launcher.gpus_per_node=4",
                                 "launcher.nodes=2", "parallelism=ddp"]))
    assert job.precision.name == "bf16"  # the job's GPUs, not this CPU machine
    assert job.settled.machine.startswith("the SLURM job's 2 node(s), 4 GPU(s) per node")
    planned = settle(compose_config([*TINY, "+method=full", "launcher=slurm",
                                     "launcher.gpus_per_node=4", "launcher.gpu_memory_gib=80",
                                     "parallelism=auto"]))
    assert planned.parallelism.name != "auto" and planned.parallelism.engine


def before_launch_cases():
    from test_bad_inputs import CASES

    return [case for case in CASES if case.before_launch]


def test_every_refusal_before_launch_comes_before_sbatch(tmp_path, monkeypatch, capsys):
    """Each catalogued refusal that needs neither model nor data, run with launcher=slurm and
    an `sbatch` on PATH that records being called: refused with its catalogued paragraph, and
    sbatch never runs. In this process, through the app's own entry point."""
    from dtune import app, cli

    bin_dir, called = tmp_path / "bin", tmp_path / "sbatch-was-called"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ntouch {called}\necho Submitted batch job 1\n")
    (bin_dir / "sinfo").write_text("#!/bin/sh\nexit 1\n")  # no partitions to check against
    for tool in ("sbatch", "sinfo"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    cases = before_launch_cases()
    assert len(cases) >= 40
    for index, case in enumerate(cases):
        folder = tmp_path / f"case-{index}"
        folder.mkdir()
        slurm = [] if "launcher=slurm" in case.overrides else ["launcher=slurm"]
        args = [a.replace("{tmp}", str(folder)) for a in case.overrides]
        monkeypatch.setattr(sys, "argv", ["dtune", *TINY, *args, *slurm,
                                          f"hydra.run.dir={folder / 'run'}"])
        with pytest.raises(SystemExit) as stop:
            app.main(cli.TOOLS)
        err = capsys.readouterr().err
        assert stop.value.code, (case.name, err[-2000:])
        assert not called.exists(), f"{case.name}: sbatch ran before the refusal"
        assert "Traceback" not in err, (case.name, err[-2000:])
        text = catalogue.message(err, folder)
        assert not catalogue.stale(case.name, text), catalogue.stale(case.name, text)
