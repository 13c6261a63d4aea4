"""Documentation that is generated from the code stays in step with it."""
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "docs"))
import make_tables  # noqa: E402


def test_the_readme_method_table_is_the_one_the_specs_give():
    readme = (ROOT / "README.md").read_text()
    assert make_tables.render(readme) == readme, "run: python docs/make_tables.py"
    for name in ("full", "lora", "qlora", "prompt_tuning"):
        assert f"| `{name}` |" in readme
