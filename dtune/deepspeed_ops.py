"""DeepSpeed's C++ kernels: built once per environment, never held up by a dead build.

DeepSpeed compiles the kernels dtune asks of it on first use, through torch's JIT loader: on
a CPU machine its shared-memory all-reduce (every ZeRO run), and CPU Adam for offload on CPU
and GPU machines alike (the optimizer steps on the host either way). That loader guards a build with a bare
`lock` file: a process killed while holding it (Ctrl-C, a preempted job, an OOM kill) leaves the
file behind, and every later run waits on it forever without a word. Its build folder is also
shared by every Python environment of the user, so two virtualenvs rebuild over each other.

dtune therefore keeps the kernels in its own cache, one folder per environment, and loads them
under an flock of its own, which the kernel releases when its holder dies. Holding that flock,
any `lock` file torch left in dtune's folder is known to be stale and is removed.

DeepSpeed is imported inside the functions, deliberately: only ZeRO runs need it, and its
import takes seconds and probes for accelerators.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import torch

from dtune.errors import DtuneError
from dtune.cache import build_lock, cache_dir

log = logging.getLogger("dtune")

# How long to wait on a torch build lock in a folder the user chose (TORCH_EXTENSIONS_DIR),
# where dtune cannot tell a live build from a dead one.
FOREIGN_LOCK_WAIT_S = 600


def load_deepspeed_ops(offload: bool) -> None:
    """Build (first time) and load the CPU kernels a ZeRO run is about to ask DeepSpeed for.

    DeepSpeed keeps loaded kernels in a process-wide table, so its own later calls find them.
    """
    builders = _builders(offload, torch.cuda.is_available())
    if not builders:
        return  # a GPU run without offload: NCCL and CUDA kernels, nothing to compile here
    folder, owned = extensions_folder()
    # Said before the lock, by every rank: whichever takes the lock first compiles, and only
    # rank 0's line shows. The compiler's own output is captured (verbose=False).
    for builder in builders:
        if not (folder / builder.name / f"{builder.name}.so").exists():
            log.info(f"Compiling DeepSpeed's {builder.name} kernel, once: later runs in this "
                     f"environment reuse it (1-2 minutes on 2 cores; in {folder})")
    with build_lock(folder / "kernels"):
        for builder in builders:
            lock = folder / builder.name / "lock"
            if lock.exists():
                if owned:
                    lock.unlink(missing_ok=True)  # we hold the flock: its writer is dead
                else:
                    _wait_for_foreign_lock(lock)
            try:
                builder.load(verbose=False)
            except (RuntimeError, OSError, ImportError) as error:
                raise DtuneError(
                    f"DeepSpeed could not compile or load its {builder.name} kernel in "
                    f"{folder / builder.name}: {str(error).strip()[-500:]}. It needs a C++ "
                    f"compiler (g++) and ninja: install them (Debian: apt install g++; ninja "
                    f"comes with deepspeed), or choose a parallelism without DeepSpeed, such as "
                    f"parallelism=ddp.") from error


def extensions_folder() -> tuple[Path, bool]:
    """Torch's JIT build folder, and whether dtune owns it (it does unless the user set it)."""
    chosen = os.environ.get("TORCH_EXTENSIONS_DIR")
    if chosen:
        return Path(chosen), chosen == os.environ.get("DTUNE_OWNS_TORCH_EXTENSIONS_DIR")
    import deepspeed

    # Build files name the headers of this environment's torch: one folder per environment.
    environment = hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]
    tag = (f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
           f"-deepspeed{deepspeed.__version__}-{environment}")
    folder = cache_dir() / "torch-extensions" / tag
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)  # workers and DeepSpeed's own loads
    os.environ["DTUNE_OWNS_TORCH_EXTENSIONS_DIR"] = str(folder)
    return folder, True


def _builders(offload: bool, on_gpu: bool) -> list:
    """The op builders of the kernels this run compiles: CPU Adam for offload, and off a GPU
    the shared-memory all-reduce that DeepSpeed's CPU collectives use."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    names = ([] if on_gpu else ["ShareMemCommBuilder"]) + (["CPUAdamBuilder"] if offload else [])
    if not names:
        return []
    builders = [get_accelerator().create_op_builder(name) for name in names]
    return [b for b in builders
            if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False)]


def _wait_for_foreign_lock(lock: Path) -> None:
    log.warning(f"Waiting for {lock} to go: another process is building a DeepSpeed kernel "
                f"there, or a dead one left the file behind.")
    deadline = time.monotonic() + FOREIGN_LOCK_WAIT_S
    while lock.exists():
        if time.monotonic() > deadline:
            raise DtuneError(
                f"The build lock {lock} has stayed for {FOREIGN_LOCK_WAIT_S} s, so DeepSpeed "
                f"cannot build or load its {lock.parent.name} kernel. It is usually left by a "
                f"build that was killed. If no other process is compiling there, delete the "
                f"file and run again; or unset TORCH_EXTENSIONS_DIR to let dtune keep the "
                f"kernels in its own cache, where it clears such files itself.")
        time.sleep(1)
