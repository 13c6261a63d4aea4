"""Write the README's method table from the method specs (dtune/methods.py).

    python docs/make_tables.py          # rewrites the table between the README's markers

tests/test_docs.py fails when the README's table and the specs disagree.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dtune.methods import METHODS  # noqa: E402

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


def render(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{methods_table()}\n{END}{tail}"


if __name__ == "__main__":
    path = ROOT / "README.md"
    path.write_text(render(path.read_text()))
    print(f"wrote the method table into {path}")
