"""The GPU check's own machinery, on the CPU: the carried wheels checked against the GPU image
before a lease is spent, and a call that records a step's timeout and its spent time budget.
The whole dry run of both calls is in tests/test_gpu_ready.py."""
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_wheels  # noqa: E402  (bench/ is no package)


def fake_wheel(folder, name: str, version: str, *requires: str) -> None:
    """A wheel as pip download leaves one, its METADATA alone inside."""
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{name}-{version}.dist-info/METADATA",
                       f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                       + "".join(f"Requires-Dist: {r}\n" for r in requires))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "image.txt"
    path.write_text("# recorded\ntorch==2.11.0\ntransformers==5.17.0\nhuggingface-hub==1.33.0\n")
    return path


def test_a_carried_wheel_whose_requirement_the_image_does_not_meet_is_named(tmp_path, image):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "fakepkg", "1.0", "transformers>=9", "huggingface-hub>=1.31,<3",
               "nowhere>=1", 'winonly; sys_platform == "win32"', 'extra-only; extra == "dev"')
    fake_wheel(wheels, "helper", "2.0", "fakepkg==1.0")
    (wheels / "requirements.txt").write_text("fakepkg>=1.0\nhelper>=2.0\n")
    problems = gpu_wheels.requirement_problems(wheels, image)
    assert len(problems) == 2, problems
    clash = next(p for p in problems if "transformers" in p)
    assert "fakepkg-1.0-py3-none-any.whl" in clash and "transformers>=9" in clash
    assert "the image has transformers 5.17.0" in clash
    assert "nowhere" in next(p for p in problems if "transformers" not in p)
    with pytest.raises(SystemExit, match="do not fit the GPU image"):
        gpu_wheels.check(wheels, image)


def test_wheels_that_fit_the_image_pass_and_the_image_keeps_what_satisfies(tmp_path, image):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "fakepkg", "1.0", "transformers>=5.17", "torch<3,>=2.4")
    # a newer hub is carried but the image's satisfies requirements.txt: pip keeps the image's,
    # so its own requirements are never installed and not checked
    fake_wheel(wheels, "huggingface_hub", "2.4.0", "httpx2>=2")
    (wheels / "requirements.txt").write_text("fakepkg>=1.0\nhuggingface-hub>=1.30\n")
    assert gpu_wheels.requirement_problems(wheels, image) == []
    (wheels / "requirements.txt").write_text("fakepkg>=1.0\nhuggingface-hub>=2.4\n")
    assert ["httpx2" in p for p in gpu_wheels.requirement_problems(wheels, image)] == [True]


def test_a_fallback_is_asked_for_with_every_bound_the_carried_wheels_put_on_it(tmp_path):
    fake_wheel(tmp_path, "one", "1.0", "typing-extensions>=4.16", "fsspec<=2026.9.0")
    fake_wheel(tmp_path, "two", "1.0", "typing_extensions>=4.15",
               'typing-extensions<4; python_version < "3.8"')  # not for the device's 3.12
    wheels = [gpu_wheels.read_wheel(p) for p in tmp_path.glob("*.whl")]
    assert gpu_wheels.asked_of("typing-extensions", wheels) == "typing-extensions>=4.15,>=4.16"


def test_the_recorded_image_list_parses_and_holds_the_seen_versions():
    recorded = gpu_wheels.read_image()
    assert str(recorded["transformers"]) == "5.17.0" and str(recorded["torch"]) == "2.11.0"
    assert str(recorded["huggingface-hub"]) == "1.33.0"


def run_check(tmp_path, *args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out",
                           str(tmp_path), "--cpu-dry-run", "--call", "1", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_a_step_past_its_timeout_or_the_calls_budget_is_recorded_and_fails_the_call(tmp_path):
    done = run_check(tmp_path / "timeout", "--only", "prompt-tuning-bf16", "--step-timeout", "2")
    assert done.returncode != 0 and "1 step(s) failed: prompt-tuning-bf16" in done.stderr
    row = (tmp_path / "timeout" / "call1.md").read_text().splitlines()[-1]
    assert row.startswith("| prompt-tuning-bf16 | FAIL: timed out after 2 s")
    assert "+method=prompt_tuning" in (tmp_path / "timeout" / "call1.log").read_text()
    done = run_check(tmp_path / "budget", "--only", "dora-bf16", "--deadline", "1")
    assert done.returncode != 0
    assert "| dora-bf16 | FAIL: not run: the call's time budget was spent" in (
        tmp_path / "budget" / "call1.md").read_text()
