"""Write the README's method and objective tables from the specs (dtune/methods.py,
dtune/objectives.py).

    python docs/make_tables.py          # rewrites the table between the README's markers

tests/test_docs.py fails when the README's table and the specs disagree.
"""
from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dtune.methods import METHODS  # noqa: E402
from dtune.config import ObjectiveConfig  # noqa: E402
from dtune.objectives import OBJECTIVES  # noqa: E402

START, END = "<!-- methods table: docs/make_tables.py -->", "<!-- end of methods table -->"
# What the user sets for each config field, in the README's words.
KEY_NOTES = {
    "dropout": "`dropout` (default 0)",
    "target_modules": "`target_modules` (`all-linear`, `attention`, `mlp`, `default`, or a list)",
    "compute_dtype": "`compute_dtype` (`fp32`/`bf16`/`fp16`)",
    "quant_type": "`quant_type` (`nf4`/`fp4`)",
    "init_text": "`init_text` (start from a text's embeddings)",
}
ORDER = ["r", "alpha", "dropout", "target_modules", "modules_to_save", "quant_type",
         "double_quant", "compute_dtype", "num_virtual_tokens", "init_text"]


def methods_table() -> str:
    lines = ["| method | what trains | keys | precisions | ZeRO | `dtune merge` | default `train.lr` |",
             "|---|---|---|---|---|---|---|"]
    for spec in METHODS.values():
        keys = ", ".join(KEY_NOTES.get(k, f"`{k}`") for k in ORDER if k in spec.fields) or "-"
        base = {4: " (4-bit base)", 8: " (8-bit base)"}.get(spec.quantized_bits, "")
        lines.append(
            f"| `{spec.name}` | {spec.trains} | {keys} | {', '.join(spec.precisions)} | "
            f"{'yes' if spec.zero else 'no' + base} | {'folds in' if spec.merges else '-'} | "
            f"{spec.recommended_lr:g} |")
    return "\n".join(lines)


OBJECTIVES_START = "<!-- objectives table: docs/make_tables.py -->"
OBJECTIVES_END = "<!-- end of objectives table -->"


def objectives_table() -> str:
    """The README's objective table, from the objective specs (dtune/objectives.py)."""
    lines = ["| objective | what it optimises | keys | reference model | data.format |",
             "|---|---|---|---|---|"]
    order = [f.name for f in fields(ObjectiveConfig) if f.name != "name"]  # the schema's
    for spec in OBJECTIVES.values():
        keys = ", ".join(f"`{k}`" for k in order if k in spec.fields) or "-"
        reference = "yes" if spec.reference else \
            "with `beta` > 0 (its KL term)" if spec.online else "no"
        formats = "`preference`" if spec.pairs else \
            "`chat` or `alpaca` (prompts with answers)" if spec.online else "any but `preference`"
        lines.append(f"| `{spec.name}` | {spec.what} | {keys} | {reference} | {formats} |")
    return "\n".join(lines)


def render(readme: str) -> str:
    for start, end, table in ((START, END, methods_table()),
                              (OBJECTIVES_START, OBJECTIVES_END, objectives_table())):
        head, rest = readme.split(start, 1)
        _, tail = rest.split(end, 1)
        readme = f"{head}{start}\n{table}\n{end}{tail}"
    return readme


if __name__ == "__main__":
    path = ROOT / "README.md"
    path.write_text(render(path.read_text()))
    print(f"wrote the method table into {path}")
