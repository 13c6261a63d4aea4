"""Prepare the wheels bench/gpu_check.sh installs on a lent GPU machine, which cannot download.

    python bench/gpu_wheels.py            # writes bench/wheels/ (git-ignored), under 40 MiB

That machine's image (the device tool's KINDS.md, read 2026-11-17) runs Python 3.12 with
torch 2.11 (CUDA 13), transformers 5.17, peft, accelerate, pandas and pyarrow. dtune needs
newer transformers, and DeepSpeed, bitsandbytes, Hydra, OmegaConf, submitit and datasets,
which it lacks. The working tree that travels there is capped at 64 MiB, so bitsandbytes keeps
its CUDA 13 kernels only. Versions are this environment's, so the device runs what CI tests.

It also writes bench/wheels/requirements.txt: dtune's own requirements (pyproject.toml) for
what the GPU check imports, and the carried versions for the rest. pip then keeps what the
machine has where it satisfies them, and installs from the wheels where it does not.
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the GPU check imports and the machine lacks (or has too old), and what they need
DIRECT = ["transformers", "peft", "bitsandbytes", "deepspeed", "hydra-core", "omegaconf",
          "submitit", "datasets", "gguf"]
INDIRECT = ["antlr4-python3-runtime", "dill", "multiprocess", "hjson", "pydantic",
            "pydantic-core", "annotated-types", "typing-inspection"]
SOURCE_ONLY = {"deepspeed", "antlr4-python3-runtime"}  # sdists, built into wheels here
TRIM = {"bitsandbytes": [r"libbitsandbytes_(cuda1[12]\d|rocm\d+)\.so$"]}  # CUDA 13 kept
LIMIT = 40 * 2**20


def requirement(name: str) -> str:
    """pyproject's requirement for a direct dependency; the carried version otherwise."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for spec in declared:
        if re.split(r"[<>=!~ ]", spec, maxsplit=1)[0] == name:
            return spec
    return f"{name}>={version(name)}"


def download(names: list[str], out: Path, python: str) -> None:
    binary = [n for n in names if n not in SOURCE_ONLY]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(out),
                    "--only-binary=:all:", "--python-version", python, "--platform",
                    "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64", "--platform",
                    "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64",
                    *[f"{n}=={version(n)}" for n in binary]], check=True)
    with tempfile.TemporaryDirectory() as sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d",
                        sdists, *[f"{n}=={version(n)}" for n in names if n in SOURCE_ONLY]],
                       check=True)
        env = {**os.environ, "DS_BUILD_OPS": "0"}  # DeepSpeed compiles kernels on first use
        for sdist in Path(sdists).iterdir():
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "--no-build-isolation", "-w", str(out), str(sdist)], check=True,
                           env=env)


def trim(wheel: Path, patterns: list[str]) -> None:
    """Rewrite `wheel` without the files matching `patterns`, and its RECORD to match."""
    kept = io.BytesIO()
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(kept, "w", zipfile.ZIP_DEFLATED) as z:
        names = [n for n in source.namelist() if not any(re.search(p, n) for p in patterns)]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        rows = []
        for name in names:
            if name != record:
                data = source.read(name)
                z.writestr(source.getinfo(name), data)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
                rows.append([name, f"sha256={digest.decode()}", str(len(data))])
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows + [[record, "", ""]])
        z.writestr(record, text.getvalue())
    wheel.write_bytes(kept.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "wheels")
    parser.add_argument("--python-version", default="312", help="the device's Python")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    download(DIRECT + INDIRECT, args.out, args.python_version)
    for wheel in args.out.glob("*.whl"):
        for package, patterns in TRIM.items():
            if wheel.name.startswith(package.replace("-", "_") + "-"):
                trim(wheel, patterns)
    (args.out / "requirements.txt").write_text(
        "".join(requirement(n) + "\n" for n in DIRECT + INDIRECT))
    total = sum(p.stat().st_size for p in args.out.iterdir())
    for path in sorted(args.out.iterdir(), key=lambda p: -p.stat().st_size):
        print(f"{path.stat().st_size / 2**20:7.1f} MiB  {path.name}")
    print(f"{total / 2**20:7.1f} MiB in all (limit {LIMIT / 2**20:.0f})")
    if total > LIMIT:
        raise SystemExit("too large to travel with the working tree; trim more")


if __name__ == "__main__":
    main()
