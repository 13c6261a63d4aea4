"""The container recipes cannot be built here; check they install what CI and pyproject do."""
import re

from conftest import ROOT


def torch_pin(text: str) -> str:
    return re.search(r"torch==([\w.+]+)", text).group(1)


def test_container_recipes_use_the_ci_torch_pin_and_pyproject():
    ci = torch_pin((ROOT / ".ci/run").read_text())
    for recipe in ("docker/Dockerfile", "docker/dtune.def"):
        text = (ROOT / recipe).read_text()
        assert torch_pin(text) == ci, recipe
        assert "pip install --no-cache-dir /opt/dtune" in text, recipe  # pyproject's pins
        for package in ("dtune", "conf", "launchers", "pyproject.toml"):
            assert package in text, (recipe, package)
    assert 'ENTRYPOINT ["python", "-m", "dtune"]' in (ROOT / "docker/Dockerfile").read_text()
    assert "USER dtune" in (ROOT / "docker/Dockerfile").read_text()
