"""Prepare the wheels bench/gpu_check.sh installs on a lent GPU machine, which cannot download,
and check them against that machine's image before a lease is spent.

    python bench/gpu_wheels.py            # writes bench/wheels/ (git-ignored), then checks it
    python bench/gpu_wheels.py --check    # checks an existing bench/wheels/ only

The image (bench/gpu_image.txt: Python 3.12, torch 2.11 with CUDA 13, transformers 5.17,
huggingface_hub 1.33, accelerate 1.15, peft, pyarrow, pandas, ...) lacks DeepSpeed,
bitsandbytes, Hydra, OmegaConf, submitit, datasets and gguf: those travel, with what they need
that the image lacks. dtune runs on the image's transformers (the rehearsal, bench/gpu_rehearse.sh,
proves it), so transformers does not travel: 5.24 and later need huggingface_hub 2 and more
besides. peft travels as a fallback, since the image's version was never read: pip keeps the
image's where it satisfies dtune. The working tree that travels is capped at 64 MiB, so
bitsandbytes keeps its CUDA 13 kernels only. Versions are this environment's, so the device
runs what CI tests.

It also writes bench/wheels/requirements.txt: dtune's own requirements (pyproject.toml) for the
direct dependencies, the carried versions for the rest. pip keeps what the machine has where it
satisfies them, and installs from the wheels where it does not.

The check: every carried wheel's requirements (Requires-Dist, markers evaluated for CPython 3.12
on Linux x86_64) and dtune's own must hold for what the device will have once the wheels are
installed: the image's packages as bench/gpu_image.txt records them, replaced by a carried wheel
where the image's does not satisfy requirements.txt. `pip install --no-deps` would hide a clash.
"""
from __future__ import annotations

import argparse
import base64
import csv
import email.parser
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
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "bench" / "gpu_image.txt"
# What the GPU check imports and the machine lacks (or may have too old), and what they need
DIRECT = ["peft", "bitsandbytes", "deepspeed", "hydra-core", "omegaconf", "submitit",
          "datasets", "gguf"]
INDIRECT = ["antlr4-python3-runtime", "dill", "multiprocess", "hjson", "pydantic",
            "pydantic-core", "annotated-types", "typing-inspection"]
# The image has these, at versions never read (bench/gpu_image.txt assumes them): carried too,
# and installed only where the image's does not meet what the carried wheels ask of them
# (pydantic wants typing-extensions 4.16, of 2026-07; datasets caps fsspec at 2026.9.0)
FALLBACK = ["typing-extensions", "fsspec"]
SOURCE_ONLY = {"deepspeed", "antlr4-python3-runtime"}  # sdists, built into wheels here
TRIM = {"bitsandbytes": [r"libbitsandbytes_(cuda1[12]\d|rocm\d+)\.so$"]}  # CUDA 13 kept
LIMIT = 40 * 2**20
# The device's interpreter, for environment markers (KINDS.md: Python 3.12.3, Linux x86_64)
DEVICE = {"python_version": "3.12", "python_full_version": "3.12.3",
          "implementation_name": "cpython", "implementation_version": "3.12.3",
          "platform_python_implementation": "CPython", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "extra": ""}


def requirement(name: str) -> str:
    """pyproject's requirement for a direct dependency; the carried version otherwise."""
    for spec in dtune_requirements():
        if canonicalize_name(Requirement(spec).name) == canonicalize_name(name):
            return spec
    return f"{name}>={version(name)}"


def asked_of(name: str, wheels: list[Wheel]) -> str:
    """`name` with every version bound the carried wheels put on it, for the device."""
    bounds = {str(spec) for w in wheels if w.name != canonicalize_name(name) for r in w.requires
              if canonicalize_name(r.name) == canonicalize_name(name)
              and (r.marker is None or r.marker.evaluate(DEVICE)) for spec in r.specifier}
    return name + ",".join(sorted(bounds))


def dtune_requirements() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


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
        # Built in an isolated environment (pip fetches setuptools there): this one's may be
        # too old to make wheels. DeepSpeed then sees no torch and compiles its kernels on
        # first use, as it would anyway with DS_BUILD_OPS=0.
        env = {**os.environ, "DS_BUILD_OPS": "0"}
        for sdist in Path(sdists).iterdir():
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                            str(out), str(sdist)], check=True, env=env)


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


# --- the check against the image -----------------------------------------------------------

@dataclass
class Wheel:
    file: str
    name: str  # canonical
    version: Version
    requires: list[Requirement]


def read_image(path: Path = IMAGE) -> dict[str, Version]:
    """bench/gpu_image.txt: `name==version` a line, `#` comments."""
    image = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            image[canonicalize_name(name)] = Version(pinned)
    return image


def read_wheel(path: Path) -> Wheel:
    with zipfile.ZipFile(path) as z:
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")
                        and n.count("/") == 1)
        fields = email.parser.Parser().parsestr(z.read(metadata).decode())
    return Wheel(path.name, canonicalize_name(fields["Name"]), Version(fields["Version"]),
                 [Requirement(r) for r in fields.get_all("Requires-Dist") or []])


def device_packages(image: dict[str, Version], wheels: list[Wheel],
                    requirements: list[str]) -> dict[str, tuple[Version, str]]:
    """What the device holds once gpu_check.sh has installed: per requirements.txt line, the
    image's package where it satisfies the line (pip keeps it), else the carried wheel."""
    held = {name: (v, "image") for name, v in image.items()}
    carried = {w.name: w for w in wheels}
    for line in requirements:
        wanted = Requirement(line)
        name = canonicalize_name(wanted.name)
        if name in image and wanted.specifier.contains(image[name], prereleases=True):
            continue
        if name in carried:
            held[name] = (carried[name].version, "carried")
    return held


def unmet(who: str, wanted: Requirement, held: dict[str, tuple[Version, str]]) -> str | None:
    """Why `wanted` does not hold on the device, or None."""
    if wanted.marker is not None and not wanted.marker.evaluate(DEVICE):
        return None
    name = canonicalize_name(wanted.name)
    if name not in held:
        return (f"{who} requires '{wanted}', but neither the image (bench/gpu_image.txt) nor "
                f"bench/wheels has {name}: carry it (DIRECT or INDIRECT in bench/gpu_wheels.py)")
    have, where = held[name]
    if wanted.specifier.contains(have, prereleases=True):
        return None
    has = (f"the image has {name} {have} (bench/gpu_image.txt)" if where == "image"
           else f"bench/wheels carries {name} {have}")
    return f"{who} requires '{wanted}', but {has}"


def requirement_problems(wheel_dir: Path, image_file: Path = IMAGE) -> list[str]:
    """Every requirement of the carried wheels, requirements.txt and dtune itself that the
    device would not meet; [] when all hold."""
    image = read_image(image_file)
    wheels = [read_wheel(p) for p in sorted(wheel_dir.glob("*.whl"))]
    lines = [x for x in (wheel_dir / "requirements.txt").read_text().splitlines() if x.strip()]
    problems = [f"two wheels of {name} in {wheel_dir}: pip would refuse them both"
                for name in {w.name for w in wheels} if [w.name for w in wheels].count(name) > 1]
    held = device_packages(image, wheels, lines)
    installed = {name for name, (_, where) in held.items() if where == "carried"}
    for wheel in wheels:
        if wheel.name in installed:
            problems += [p for r in wheel.requires
                         if (p := unmet(f"{wheel.file} (carried)", r, held))]
    problems += [p for line in lines if (p := unmet("requirements.txt", Requirement(line), held))]
    # dtune's own, for what the device has: wandb and the sweep plugins are imported only
    # when a run asks for them, and the check does not
    problems += [p for spec in dtune_requirements()
                 if canonicalize_name(Requirement(spec).name) in held
                 and (p := unmet("dtune (pyproject.toml)", Requirement(spec), held))]
    return problems


def check(wheel_dir: Path, image_file: Path = IMAGE) -> None:
    problems = requirement_problems(wheel_dir, image_file)
    if problems:
        raise SystemExit("gpu_wheels: the carried wheels do not fit the GPU image:\n  "
                         + "\n  ".join(problems))
    print(f"gpu_wheels: every requirement of {wheel_dir.name}/ and dtune holds against "
          f"{image_file.name} plus the carried wheels")


def build(out: Path, python_version: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    download(DIRECT + INDIRECT + FALLBACK, out, python_version)
    for wheel in out.glob("*.whl"):
        for package, patterns in TRIM.items():
            if wheel.name.startswith(package.replace("-", "_") + "-"):
                trim(wheel, patterns)
    wheels = [read_wheel(p) for p in out.glob("*.whl")]
    (out / "requirements.txt").write_text(
        "".join(requirement(n) + "\n" for n in DIRECT + INDIRECT)
        + "".join(asked_of(n, wheels) + "\n" for n in FALLBACK))
    total = sum(p.stat().st_size for p in out.iterdir())
    for path in sorted(out.iterdir(), key=lambda p: -p.stat().st_size):
        print(f"{path.stat().st_size / 2**20:7.1f} MiB  {path.name}")
    print(f"{total / 2**20:7.1f} MiB in all (limit {LIMIT / 2**20:.0f})")
    if total > LIMIT:
        raise SystemExit("too large to travel with the working tree; trim more")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "wheels")
    parser.add_argument("--python-version", default="312", help="the device's Python")
    parser.add_argument("--image", type=Path, default=IMAGE)
    parser.add_argument("--check", action="store_true", help="check --out only, build nothing")
    args = parser.parse_args()
    if not args.check:
        build(args.out, args.python_version)
    check(args.out, args.image)


if __name__ == "__main__":
    main()
