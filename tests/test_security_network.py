"""Trust boundaries on the network and the command line: what a run listens on, what crosses
between ranks, which port a multi-node run uses, and settings or paths that could turn into
code (a Hydra sweep, a line of a batch script).

Each test fails on the code before these fixes (the starter's and gather's behavioural tests
because the pieces they drive did not exist) and passes after them.
"""
import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT, TINY, compose, one_line, run_dtune
from dtune.errors import DtuneError

# The user quotes it as Hydra's override grammar asks; every one of these characters broke a
# worker's command line or turned the run into a sweep.
STRANGE_NAME = "my runs/exp (2), ü=1"
LOOPBACK = {"127.0.0.1", "::1"}
DDP = [*TINY, "+method=lora", "method.dropout=0", "train.lr=1e-2", "train.max_steps=4",
       "parallelism=ddp", "parallelism.nproc_per_node=2"]


def sockets_of(process: psutil.Process) -> list[tuple]:
    """(pid, kind, status, local address) of every inet socket of the process and its children."""
    found = []
    for proc in [process, *process.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.laddr:
                    kind = "udp" if conn.type == socket.SOCK_DGRAM else "tcp"
                    found.append((proc.pid, kind, conn.status, conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-process DDP run in a run dir named with spaces, a comma, brackets, '=' and a
    non-ASCII letter; the sockets of the launcher and its workers are sampled while it runs."""
    run_dir = tmp_path_factory.mktemp("strange") / STRANGE_NAME
    log = tmp_path_factory.mktemp("ddp-log") / "output.txt"
    with log.open("w") as output:  # a file, not a pipe: a full pipe would stall the run
        process = subprocess.Popen([sys.executable, "-m", "dtune", *DDP,
                                    f'hydra.run.dir="{run_dir}"'], cwd=ROOT, text=True,
                                   stdout=output, stderr=subprocess.STDOUT)
    watched, seen, samples_with_workers = psutil.Process(process.pid), set(), 0
    deadline = time.time() + 600
    while process.poll() is None:
        if time.time() > deadline:
            process.kill()
        try:
            workers = [p for p in watched.children(recursive=True)
                       if "dtune" in " ".join(p.cmdline())]
        except psutil.Error:
            workers = []
        samples_with_workers += len(workers) >= 2
        seen.update(sockets_of(watched))
        time.sleep(0.1)
    return {"run_dir": run_dir, "code": process.returncode, "output": log.read_text(),
            "sockets": seen, "samples_with_workers": samples_with_workers}


def test_a_single_machine_ddp_run_listens_on_loopback_only(ddp_run):
    """torch.distributed.run served its rendezvous TCPStore on every interface, without
    authentication: anyone on the network could join or disrupt the run."""
    assert ddp_run["samples_with_workers"] >= 3, ddp_run["output"][-3000:]
    bound = [s for s in ddp_run["sockets"]
             if s[1] == "udp" or s[2] in (psutil.CONN_LISTEN, psutil.CONN_NONE, psutil.CONN_CLOSE)]
    assert bound, "no bound socket seen at all: the sampling missed the run"  # gloo's, on lo
    exposed = [s for s in bound if s[3] not in LOOPBACK]
    assert not exposed, f"bound beyond loopback: {exposed}"
    assert ddp_run["code"] == 0, ddp_run["output"][-3000:]


def test_a_ddp_run_in_a_run_dir_with_spaces_commas_and_non_ascii_lands_there(ddp_run):
    assert ddp_run["code"] == 0, ddp_run["output"][-3000:]
    run_dir = ddp_run["run_dir"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / ".hydra").is_dir()
    # nothing went to a folder named after part of the path (a sweep, a cut-off name)
    assert sorted(p.name for p in run_dir.parent.iterdir()) == [run_dir.name]


def test_a_ddp_runs_exact_match_and_per_rank_peak_memory_cross_ranks_as_numbers(ddp_run):
    assert ddp_run["code"] == 0, ddp_run["output"][-3000:]
    summary = json.loads((ddp_run["run_dir"] / "summary.json").read_text())
    for key in ("exact_match_before", "exact_match_after"):
        assert 0.0 <= summary[key] <= 1.0 and summary[key] * 8 == round(summary[key] * 8), key
    assert summary["exact_match_after_by_task"]
    for key in ("peak_memory_bytes_per_rank", "train_peak_memory_bytes_per_rank"):
        per_rank = summary[key]
        assert len(per_rank) == 2 and all(isinstance(v, int) and v > 10**7 for v in per_rank)
    first = summary["peak_memory_bytes_per_rank"][0]
    assert summary["peak_memory_bytes"] <= first <= 1.05 * summary["peak_memory_bytes"]


WORKER_SCRIPT = """
import json, os, signal, stat, sys, time
rank = int(os.environ["RANK"])
store = os.path.dirname(os.environ["DTUNE_STORE_FILE"])
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
        "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "DTUNE_DIE_WITH_PARENT")
seen = {k: os.environ.get(k) for k in keys}
seen["store_mode"] = oct(stat.S_IMODE(os.stat(store).st_mode))
signal.signal(signal.SIGUSR1, lambda *a: (json.dump(seen, open(f"{sys.argv[1]}/{rank}", "w")),
                                          os._exit(0)))
open(f"{sys.argv[1]}/ready-{rank}", "w").close()
if rank == int(sys.argv[2]):
    os._exit(7)
time.sleep(120)
"""


def test_the_one_machine_starter_sets_ranks_forwards_signals_and_stops_on_a_failure(tmp_path):
    import threading

    from dtune.launch import run_local_workers

    env = {**{k: v for k, v in os.environ.items() if not k.endswith("_SOCKET_IFNAME")},
           "DTUNE_DIE_WITH_PARENT": "1"}
    def signal_once_ready():
        deadline = time.time() + 120
        while time.time() < deadline and not all((tmp_path / f"ready-{r}").exists()
                                                 for r in (0, 1)):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    # SIGUSR1 to the launcher (SLURM's warning signal) reaches both workers
    sender = threading.Thread(target=signal_once_ready)
    sender.start()
    assert run_local_workers(2, ["-c", WORKER_SCRIPT, str(tmp_path), "-1"], env) == 0
    sender.join()
    seen = [json.loads((tmp_path / str(rank)).read_text()) for rank in (0, 1)]
    for rank, worker in enumerate(seen):
        assert worker == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                          "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                          "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo",
                          "DTUNE_DIE_WITH_PARENT": "1", "store_mode": "0o700"}
    # rank 1 fails at once: rank 0 is stopped, not waited for, and the failure's code returned
    started = time.monotonic()
    assert run_local_workers(2, ["-c", WORKER_SCRIPT, str(tmp_path), "1"], env) == 7
    assert time.monotonic() - started < 60


RANK_SCRIPT = """
import os, sys, json
import torch
from dtune.config import ParallelismConfig
from dtune.distributed import Ranks, gather, init_process_group
import dtune.evaluate as evaluate
rank = int(os.environ["RANK"])
init_process_group(ParallelismConfig(name="ddp", nproc_per_node=2), Ranks(rank, 2, rank))
records = [{"task": "ab"[i % 2], "i": i} for i in range(7)]
evaluate.prompt_and_reference = lambda r, *a: (f"q{r['i']}", f"a{r['i']} ")
# the model answers items 0, 3, 4 and 5 right
evaluate.generate = lambda engine, tok, prompts, *a, **k: [
    p.replace("q", "a") if int(p[1:]) in (0, 3, 4, 5) else "wrong" for p in prompts]
engine = evaluate.Inference(None, torch.device("cpu"), Ranks(rank, 2, rank))
em = evaluate.exact_match(engine, None, records, "chat", None, 7, 4, 2)
rows = gather(torch.arange(3 * (rank + 1), dtype=torch.float64).reshape(-1, 3) + rank)
print(json.dumps({"em": {k: em[k] for k in ("exact_match", "by_task", "n")},
                  "ints": gather(10**12 + rank), "floats": gather(0.5 + rank),
                  "rows": [r.tolist() for r in rows],
                  "correct": [e["correct"] for e in em["examples"]]}))
sys.stdout.flush()
os._exit(0)
"""


def test_gather_sends_numbers_and_exact_match_is_the_same_under_two_ranks(tmp_path):
    """What ranks exchange are tensors of numbers: uneven lists, big ints and floats come
    back exact and in rank order, and exact match scores every item once."""
    store = tmp_path / "store"
    env = {**os.environ, "WORLD_SIZE": "2", "DTUNE_STORE_FILE": str(store),
           "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in (0, 1)]
    outputs = [r.communicate(timeout=180) for r in ranks]
    assert [r.returncode for r in ranks] == [0, 0], outputs
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0] == results[1]
    result = results[0]
    assert result["em"] == {"exact_match": 4 / 7, "by_task": {"a": 2 / 4, "b": 2 / 3}, "n": 7}
    assert result["correct"] == [i in (0, 3, 4, 5) for i in range(7)]
    assert result["ints"] == [10**12, 10**12 + 1] and result["floats"] == [0.5, 1.5]
    assert result["rows"] == [[[0.0, 1.0, 2.0]], [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]


OBJECT_COLLECTIVES = {"all_gather_object", "gather_object", "broadcast_object_list",
                      "scatter_object_list", "send_object_list", "recv_object_list"}


def test_no_collective_pickles_objects_between_ranks():
    """torch's *_object collectives unpickle what another rank sends: whoever reaches the
    group's sockets runs code in every rank."""
    used = []
    for folder in (ROOT / "dtune", ROOT / "launchers"):
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                name = node.attr if isinstance(node, ast.Attribute) else \
                    node.id if isinstance(node, ast.Name) else None
                if name in OBJECT_COLLECTIVES:
                    used.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not used, used


def test_several_nodes_outside_slurm_without_a_port_are_refused(tmp_path):
    result = run_dtune(*DDP, "parallelism.nproc_per_node=1", "parallelism.nnodes=2",
                       "parallelism.master_addr=127.0.0.1", f"hydra.run.dir={tmp_path}",
                       env={k: "" for k in os.environ if k.startswith("SLURM_")}, timeout=120)
    message = one_line(result.stderr)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "parallelism.master_port=0" in message and "parallelism.nnodes=2" in message
    assert "the same on every node" in message


def test_a_taken_master_port_is_named_before_any_worker_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_dtune(*DDP, "parallelism.nproc_per_node=1", "parallelism.nnodes=2",
                           "parallelism.node_rank=0", "parallelism.master_addr=127.0.0.1",
                           f"parallelism.master_port={port}", f"hydra.run.dir={tmp_path}",
                           timeout=120)
    message = one_line(result.stderr)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"port {port} is already in use" in message and "parallelism.master_port" in message
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_slurm_job_on_several_nodes_takes_its_port_from_the_job_id(monkeypatch, tmp_path):
    from dtune import launch
    from dtune.config import Config, ParallelismConfig

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: dtune parses the list itself
    commands = []
    monkeypatch.setattr(launch.subprocess, "call", lambda command, **kw: commands.append(command))
    launch.launch_workers(Config(parallelism=ParallelismConfig(name="ddp", nproc_per_node=2)),
                          str(tmp_path), [])
    (command,) = commands
    assert f"--master-port={20000 + 4242}" in command and "--master-addr=gpu07" in command


def test_dtune_checks_runs_survive_a_strange_work_dir(tmp_path, monkeypatch):
    """`dtune check --work-dir` names each run's folder after it; the folder must reach the
    run whole, not as a sweep over the comma."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    import dtune.parity as parity

    calls = []

    def fake_run(command, **kwargs):
        calls.append((command, kwargs["env"]))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(parity.subprocess, "run", fake_run)
    monkeypatch.setattr(parity, "step_losses", lambda run_dir: [1.0])
    work_dir = tmp_path / STRANGE_NAME
    parity.train_layout(parity.layouts(4)["ddp 2 ranks"], work_dir, steps=2)
    (command, env), = calls
    overrides = command[command.index("dtune") + 1:]
    parsed = OverridesParser.create().parse_overrides(overrides)
    assert not any(o.is_sweep_override() for o in parsed)
    (run_dir,) = [o.value() for o in parsed if o.key_or_group == "hydra.run.dir"]
    monkeypatch.setattr(os, "environ", env)
    assert OmegaConf.create({"dir": run_dir}).dir == str(work_dir / "ddp_2_ranks")


@pytest.mark.parametrize("override", [
    "launcher.job_name='dtune\n#SBATCH --wrap=touch /tmp/x'",
    "launcher.partition='debug\rx'",
    "launcher.mem='4G\n#SBATCH --uid=0'",
    "launcher.account='a\tb'",
    "launcher.folder='/tmp/x\n#SBATCH --chdir=/'",
    "+launcher.sbatch_extra.exclusive='1\n#SBATCH --wrap=id'",
])
def test_control_characters_in_slurm_settings_are_refused_before_submitting(override):
    with pytest.raises(DtuneError) as raised:
        compose("launcher=slurm", override)
    message = str(raised.value)
    field = re.match(r"\+?(launcher\.[a-z_]+)", override).group(1)
    assert field in message and "control character" in message, message
    assert "\\n" in message or "\\r" in message or "\\t" in message  # the value, as repr


def test_a_control_character_in_an_sbatch_extra_flag_name_is_refused():
    """A flag name can come from a config file (conf/launcher/*.yaml), not only the command
    line, whose grammar has no quoted keys."""
    from dtune.config import LauncherConfig

    with pytest.raises(DtuneError, match=r"launcher\.sbatch_extra.*control character"):
        LauncherConfig(name="slurm", sbatch_extra={"mail-type\n#SBATCH --wrap=id": "ALL"})


def test_sbatch_script_keeps_the_users_run_dir(tmp_path):
    """slurm/dtune.sbatch put its own hydra.run.dir after the user's, which Hydra let win."""
    if subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        pytest.skip("no SLURM cluster answers `sinfo` here")
    mine = tmp_path / "my run dir"
    result = subprocess.run(
        ["sbatch", "--wait", "--gpus-per-node=0", f"--output={tmp_path}/job-%j.out",
         str(ROOT / "slurm/dtune.sbatch"), *TINY, "+method=lora", "train.max_steps=1",
         "eval.exact_match_samples=0", "data.builtin.train_size=64",
         "data.builtin.eval_size=8", f'hydra.run.dir="{mine}"'],
        cwd=tmp_path, text=True, capture_output=True, timeout=300,
        env={**os.environ, "GLOO_SOCKET_IFNAME": "lo",  # the job's `python` is this one
             "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])})
    job = re.search(r"Submitted batch job (\d+)", result.stdout)
    log = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert result.returncode == 0, result.stdout + result.stderr + log[-3000:]
    assert json.loads((mine / "summary.json").read_text())["steps"] == 1, log[-3000:]
    assert not (tmp_path / "runs" / "slurm" / job.group(1)).exists()
