"""No visible change: the golden runs recorded before the architecture change
(tests/golden_runs/runs.json, made by tests/golden_runs/record.py) give the same per-step losses,
evals and summary within 1e-6 on CPU, and leave the same files and keys. Later features may
add summary keys (the GPU issue added the allocator's reserved peak); none may go."""
import json
import os
from pathlib import Path

import pytest

from conftest import run_dtune
from dtune.files import OUTPUT_MARKER
from golden_runs.record import VOLATILE, describe

GOLDEN = json.loads((Path(__file__).parent / "golden_runs" / "runs.json").read_text())


def close(a, b, tol=1e-6):
    """Equal within `tol` (relative for large numbers) for every number in a nested value."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k], tol)
                                                                     for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(close(x, y, tol)
                                                                 for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(a - b) <= tol * max(1.0, abs(a))
    return a == b


@pytest.mark.parametrize("name", sorted(GOLDEN["runs"]))
def test_a_run_computes_and_leaves_what_it_did_before_the_change(tmp_path, name):
    overrides = GOLDEN["overrides"][name]
    result = run_dtune(*overrides, f"hydra.run.dir={tmp_path}",
                       env={"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")})
    assert result.returncode == 0, result.stderr[-3000:]
    now, before = describe(tmp_path), GOLDEN["runs"][name]
    now["summary"] = {k: v for k, v in now["summary"].items() if k in before["summary"]}
    for key in ("losses", "grad_norms", "lrs", "evals", "summary"):
        assert close(now[key], before[key]), (key, now[key], before[key])
    assert now["step_keys"] == before["step_keys"]
    assert set(before["summary_keys"]) <= set(now["summary_keys"])
    # Added since: the marker that says dtune wrote final/, the run's record and its lock
    # (see "Security model")
    added = (f"final/{OUTPUT_MARKER}", "dtune_run.json", ".dtune.lock")
    assert [f for f in now["files"] if f not in added] == before["files"]
    assert set(added) <= set(now["files"])
    assert set(VOLATILE) <= set(now["summary_keys"])
