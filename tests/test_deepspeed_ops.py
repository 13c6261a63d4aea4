"""DeepSpeed's CPU kernels: a build killed mid-way must not hang every later ZeRO run."""
import os
import subprocess
import sys

import pytest

from dtune import deepspeed_ops
from dtune.errors import DtuneError

LOAD_AFTER_A_DEAD_BUILD = """
import torch
from dtune.deepspeed_ops import extensions_folder, load_deepspeed_ops
folder, owned = extensions_folder()
assert owned
for name in ("cpu_adam", "deepspeed_shm_comm"):  # what a build killed mid-way leaves behind
    (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / name / "lock").touch()
load_deepspeed_ops(offload=True)
from deepspeed.ops.adam import DeepSpeedCPUAdam
p = torch.nn.Parameter(torch.ones(4))
p.grad = torch.ones(4)
DeepSpeedCPUAdam([p], lr=0.5).step()  # the compiled kernel really runs
assert torch.all(p < 1), p
print("LOCKS", [(folder / n / "lock").exists() for n in ("cpu_adam", "deepspeed_shm_comm")])
"""


def test_a_killed_builds_lock_file_does_not_block_deepspeed_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    result = subprocess.run([sys.executable, "-c", LOAD_AFTER_A_DEAD_BUILD], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOCKS [False, False]" in result.stdout


def test_a_lock_in_a_folder_the_user_chose_ends_in_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(deepspeed_ops, "FOREIGN_LOCK_WAIT_S", 1)
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "lock").touch()
    with pytest.raises(DtuneError, match="delete the file") as error:
        deepspeed_ops.load_deepspeed_ops(offload=False)
    assert str(tmp_path / "deepspeed_shm_comm" / "lock") in str(error.value)
    assert (tmp_path / "deepspeed_shm_comm" / "lock").exists()  # not ours to remove
