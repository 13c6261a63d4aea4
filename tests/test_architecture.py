"""The shape of the code: short functions, no import circle (imports inside functions count),
and the launchers installed inside the dtune package."""
import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

MAX_FUNCTION_LINES = 80
# The source folder of each installed package (pyproject's package-dir).
PACKAGES = {"dtune": ROOT / "dtune", "dtune.launchers": ROOT / "launchers"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Every dtune module that `name` imports, at the top or inside a function."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in known and t != name}


def test_no_function_is_longer_than_80_lines():
    too_long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long


def test_there_is_no_import_circle_counting_imports_inside_functions():
    found = modules()
    graph = {name: imported_modules(name, path, set(found)) for name, path in found.items()}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        return seen

    circles = sorted(name for name in graph if name in reachable(name))
    assert not circles, {name: sorted(graph[name]) for name in circles}


def test_dtune_core_never_imports_a_launcher():
    found = modules()
    for name, path in found.items():
        if not name.startswith("dtune.launchers"):
            imports = imported_modules(name, path, set(found))
            assert not any(i.startswith("dtune.launchers") for i in imports), (name, imports)


def test_launchers_install_inside_dtune_not_as_a_top_level_package(tmp_path):
    probe = ("import importlib.util as u; import dtune.launchers.slurm, dtune.launchers.results; "
             "print(u.find_spec('launchers'))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "None"  # `import launchers` fails
