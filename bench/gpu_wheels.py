"""Prepare the wheels bench/gpu_check.sh installs on a lent GPU machine, which has torch,
transformers, peft and accelerate but nothing else dtune needs, and cannot download.

    python bench/gpu_wheels.py            # writes bench/wheels/ (git-ignored), at most 56 MiB

The working tree that travels to the device is capped at 64 MiB, and bitsandbytes, pyarrow
and pandas alone come to over 110. So the wheels are trimmed: bitsandbytes keeps the kernels
for the CUDA 12.6+ runtimes only, pyarrow drops Flight, S3 and Substrait (which datasets does
not load), pandas drops its test suite. Versions are this environment's, so the device runs
what CI tests. The DeepSpeed and ANTLR sdists are built into pure-Python wheels here.
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
import zipfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINARY = ["hydra-core", "omegaconf", "submitit", "cloudpickle", "datasets", "pyarrow",
          "pandas", "dill", "xxhash", "multiprocess", "bitsandbytes", "hjson", "msgpack",
          "ninja", "py-cpuinfo", "pydantic", "pydantic-core", "annotated-types",
          "typing-inspection", "einops", "psutil", "filelock", "safetensors", "gguf"]
SOURCE = ["deepspeed", "antlr4-python3-runtime"]
# file names (regular expressions) left out of a wheel: what dtune never loads
TRIM = {
    "bitsandbytes": [r"libbitsandbytes_(cuda11\d|cuda12[0-5]|rocm\d+)\.so$"],
    "pyarrow": [r"libarrow_(flight|substrait|s3)\.so", r"_flight\.|_s3fs\.|_substrait\.",
                r"/include/", r"/tests/", r"\.pyx$", r"\.pxd$", r"/src/"],
    "pandas": [r"^pandas/tests/"],
}
LIMIT = 56 * 2**20  # leaves room in the 64 MiB for the working tree itself


def pins(names: list[str]) -> list[str]:
    return [f"{name}=={version(name)}" for name in names]


def download(specs: list[str], out: Path, binary: bool) -> None:
    python = f"{sys.version_info.major}{sys.version_info.minor}"
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(out)]
    if binary:
        command += ["--only-binary=:all:", "--python-version", python,
                    "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64"]
    subprocess.run(command + specs, check=True)


def build(sdist: Path, out: Path) -> None:
    env = {**os.environ, "DS_BUILD_OPS": "0"}  # DeepSpeed's kernels compile on first use there
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(sdist)], check=True, env=env)


def trim(wheel: Path, patterns: list[str]) -> None:
    """Rewrite `wheel` without the files matching `patterns`, and its RECORD to match."""
    kept = io.BytesIO()
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(kept, "w", zipfile.ZIP_DEFLATED) as z:
        names = [n for n in source.namelist()
                 if not any(re.search(p, n) for p in patterns)]
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
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    download(pins(BINARY), args.out, binary=True)
    with tempfile.TemporaryDirectory() as sdists:
        download(pins(SOURCE), Path(sdists), binary=False)
        for sdist in Path(sdists).iterdir():
            build(sdist, args.out)
    for wheel in args.out.glob("*.whl"):
        for package, patterns in TRIM.items():
            if wheel.name.startswith(package.replace("-", "_") + "-"):
                trim(wheel, patterns)
    total = sum(p.stat().st_size for p in args.out.iterdir())
    for path in sorted(args.out.iterdir(), key=lambda p: -p.stat().st_size):
        print(f"{path.stat().st_size / 2**20:7.1f} MiB  {path.name}")
    print(f"{total / 2**20:7.1f} MiB in all (limit {LIMIT / 2**20:.0f})")
    if total > LIMIT:
        raise SystemExit("too large to travel with the working tree; trim more")


if __name__ == "__main__":
    main()
