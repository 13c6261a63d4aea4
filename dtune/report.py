"""`dtune report`: a local dashboard comparing runs, made from their run directories alone.

It writes `report.html` and the PNG plots it shows into one folder. The page needs no network
(the plots are also embedded in it, so the HTML alone can be mailed) and has a sortable table.
"""
from __future__ import annotations

import base64
import html
import json
import math
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image, ImageChops  # noqa: E402


from dtune.errors import DtuneError  # noqa: E402
from dtune.files import output_folder, read_text  # noqa: E402
from dtune.run_dir import RunDir, check_output_target  # noqa: E402

GIB = 1024**3
# Keys that differ between runs without being hyperparameters.
NOT_SWEPT = ("tracker.run_name", "tracker.group", "tracker.tags", "train.resume")
# Headless Chromium with nothing that reaches out to the network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--no-default-browser-check",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-default-apps", "--disable-extensions",
                  "--disable-domain-reliability", "--disable-client-side-phishing-detection",
                  "--metrics-recording-only", "--hide-scrollbars", "--mute-audio"]


@dataclass
class Run:
    label: str
    path: Path
    config: dict  # flattened: {"train.lr": 0.001, ...}
    overrides: list[str]  # as typed on the command line, when Hydra recorded them
    metrics: list[dict]
    summary: dict | None  # None: the run has not finished
    swept: dict = field(default_factory=dict)  # this run's values of the keys that vary

    @property
    def steps(self) -> list[dict]:
        return [m for m in self.metrics if "loss" in m and m.get("split") != "eval"]

    @property
    def evals(self) -> list[dict]:
        return [m for m in self.metrics if m.get("split") == "eval"]

    def final(self, metric: str):
        """A final figure: from summary.json, else the last record that has it."""
        if self.summary and self.summary.get(metric) is not None:
            return self.summary[metric]
        key = {"final_loss": "loss", "exact_match_after": "exact_match",
               "preference_accuracy_after": "preference_accuracy"}.get(metric, metric)
        values = [m[key] for m in self.metrics if m.get(key) is not None]
        return values[-1] if values else None


# --- finding and reading runs -------------------------------------------------------------

def find_runs(paths: list[Path]) -> list[tuple[Path, str]]:
    """(run dir, label) for each path: a run dir, or a sweep dir whose direct subfolders are
    run dirs. Labels are relative to the folder holding each path: `sweep/0`, `my-run`."""
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise DtuneError(f"{path} does not exist or is not a folder; pass run directories "
                             "or sweep directories (a folder of run directories).")
        if RunDir(path).is_run():
            found.append((path, path.resolve().name))
            continue
        runs = sorted((p for p in path.iterdir() if p.is_dir() and RunDir(p).is_run()),
                      key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit()
                                     else 0, p.name))
        if not runs:
            raise DtuneError(
                f"{path} is neither a run directory (no .hydra/config.yaml or metrics.jsonl) "
                "nor a sweep directory (no subfolder is a run directory); pass the folder a "
                "training run or a `python -m dtune -m ...` sweep wrote."
            )
        found.extend((run, f"{path.resolve().name}/{run.name}") for run in runs)
    labels = [label for _, label in found]
    if len(set(labels)) < len(labels):  # same-named folders in different places: full paths
        return [(run, str(run.resolve())) for run, _ in found]
    return found


def flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def load_run(path: Path, label: str) -> Run:
    run = RunDir(path)
    config = flatten(OmegaConf.to_container(OmegaConf.create(read_text(run.config_file)))) \
        if run.config_file.exists() else {}
    overrides = [str(o) for o in OmegaConf.to_container(OmegaConf.create(
        read_text(run.overrides_file)))] \
        if run.overrides_file.exists() else []  # written by CLI runs, not in-process ones
    metrics = run.read_metrics() if run.metrics_file.is_file() else []
    return Run(label, path, config, overrides, metrics, run.read_summary())


def mark_swept(runs: list[Run]) -> list[str]:
    """The config keys whose values differ between runs: the sweep's hyperparameters. Where
    every run recorded its command line, only keys set there count (runs that are no sweep
    differ in their model or data group's every key, and those are not what was varied)."""
    keys = sorted({k for r in runs for k in r.config})
    if all(r.overrides for r in runs):
        typed = {o.lstrip("+~").split("=", 1)[0] for r in runs for o in r.overrides}
        keys = [k for k in keys if k in typed or any(k.startswith(t + ".") for t in typed)
                or k.split(".", 1)[0] in typed]
    swept = [k for k in keys if k not in NOT_SWEPT and not k.startswith("hydra.")
             and len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]
    for run in runs:
        run.swept = {k: run.config.get(k) for k in swept}
    return swept


# --- plots --------------------------------------------------------------------------------

def _colors(n: int):
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "viridis")
    return [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]


def _legend_name(run: Run) -> str:
    if not run.swept:
        return run.label
    values = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in run.swept.items())
    return f"{run.label} ({values})"


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # a run killed before its first step has no line
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _save(fig, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=100)
    plt.close(fig)
    return name


def plot_loss(runs: list[Run], out_dir: Path) -> str:
    fig, ax = plt.subplots(figsize=(8, 4.4))
    for run, color in zip(runs, _colors(len(runs))):
        steps = run.steps
        ax.plot([m["step"] for m in steps], [m["loss"] for m in steps], color=color,
                linewidth=1.4, label=f"{_legend_name(run)} train")
        evals = [m for m in run.evals if m.get("eval_loss") is not None]
        if evals:
            ax.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], color=color,
                    linestyle="--", marker="o", markersize=4, label=f"{run.label} eval")
    ax.set(xlabel="step", ylabel="loss", title="Training (solid) and eval (dashed) loss")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, out_dir, "loss.png")


def plot_step_metric(runs: list[Run], out_dir: Path, key: str, title: str,
                     ylabel: str) -> str:
    fig, ax = plt.subplots(figsize=(8, 4.4))
    for run, color in zip(runs, _colors(len(runs))):
        points = [(m["step"], m[key]) for m in run.steps if m.get(key) is not None]
        if points:
            ax.plot(*zip(*points), color=color, linewidth=1.2, label=_legend_name(run))
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, out_dir, f"{key}.png")


def plot_sweep(runs: list[Run], swept: list[str], metric: str, out_dir: Path) -> str | None:
    """The final metric against each swept hyperparameter, one panel each."""
    shown = [k for k in swept if any(r.final(metric) is not None for r in runs)][:8]
    if not shown:
        return None
    cols = min(len(shown), 2)
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(8, 4.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, shown):
        points = [(r.config.get(key), r.final(metric), r.label) for r in runs
                  if r.final(metric) is not None]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool)
                      for x, _, _ in points)
        if numeric:
            points.sort(key=lambda p: p[0])
            xs = [p[0] for p in points]
            if min(xs) > 0 and max(xs) / min(xs) >= 20:
                ax.set_xscale("log")
        else:
            names = sorted({_short(p[0]) for p in points})
            xs = [names.index(_short(p[0])) for p in points]
            ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ys = [p[1] for p in points]
        ax.plot(xs, ys, marker="o", linestyle="-" if numeric else "none", color="tab:blue")
        for x, y, (_, _, label) in zip(xs, ys, points):
            ax.annotate(label.split("/")[-1], (x, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        ax.set(xlabel=key, ylabel=metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle(f"Final {metric} against each swept hyperparameter", fontsize=12)
    return _save(fig, out_dir, "sweep.png")


# --- the page -----------------------------------------------------------------------------

def _fmt(value, kind: str = "") -> tuple[str, str]:
    """(text shown, sort key) for a table cell."""
    if value is None:
        return "n/a", ""
    if kind == "pct":
        return f"{100 * value:.1f}%", repr(value)
    if kind == "gib":
        return f"{value / GIB:.2f} GiB", repr(value)
    if kind in ("int", "rate"):
        return f"{value:,.0f}", repr(value)
    if kind == "s":
        return (f"{value:.1f} s" if value < 10 else f"{value:,.0f} s"), repr(value)
    if isinstance(value, float):
        return f"{value:.4g}", repr(value)
    return str(value), ""


def task_accuracy(run: Run) -> str:
    """`add 0% → 28%` per line: per-task exact match before (first eval) and after (last)."""
    with_tasks = [m for m in run.evals if any(k.startswith("exact_match/") for k in m)]
    if not with_tasks:
        return ""
    before, after = with_tasks[0], with_tasks[-1]
    if run.summary and run.summary.get("exact_match_after_by_task"):
        after = {f"exact_match/{k}": v for k, v in run.summary["exact_match_after_by_task"].items()}
    tasks = sorted(k.split("/", 1)[1] for k in after if k.startswith("exact_match/"))
    lines = []
    for task in tasks:
        b, a = before.get(f"exact_match/{task}"), after.get(f"exact_match/{task}")
        b_text = "n/a" if b is None else f"{100 * b:.0f}%"
        lines.append(f"{task} {b_text} → {100 * a:.0f}%")
    return "\n".join(lines)


def swept_cell(run: Run) -> tuple[str, str]:
    text = ", ".join(f"{k}={_short(v)}" for k, v in run.swept.items())
    values = list(run.swept.values())
    numeric = len(values) == 1 and isinstance(values[0], (int, float)) \
        and not isinstance(values[0], bool)
    return text, repr(values[0]) if numeric else ""


# One column per entry: header, and the (text, sort key) of a run's cell.
COLUMNS = [
    ("run", lambda r, s: (r.label, "")),
    ("status", lambda r, s: ("finished" if r.summary else "incomplete", "")),
    ("swept values", lambda r, s: swept_cell(r)),
    ("method", lambda r, s: (s.get("method") or r.config.get("method.name") or "n/a", "")),
    ("model", lambda r, s: (s.get("model") or r.config.get("model.name_or_path") or "n/a", "")),
    ("precision", lambda r, s: (s.get("precision") or r.config.get("precision.name")
                                or "n/a", "")),
    ("parallelism", lambda r, s: (s.get("parallelism") or r.config.get("parallelism.name")
                                  or "n/a", "")),
    ("trainable params", lambda r, s: _fmt(s.get("trainable_params"), "int")),
    ("steps", lambda r, s: _fmt(s.get("steps") or (r.steps[-1]["step"] if r.steps else None),
                                "int")),
    ("final train loss", lambda r, s: _fmt(r.final("final_loss"))),
    ("eval loss", lambda r, s: _fmt(r.final("eval_loss"))),
    ("exact match before", lambda r, s: _fmt(s.get("exact_match_before"), "pct")),
    ("exact match after", lambda r, s: _fmt(r.final("exact_match_after"), "pct")),
    ("task accuracy (before → after)", lambda r, s: (task_accuracy(r), "")),
    ("objective", lambda r, s: (s.get("objective") or r.config.get("objective.name")
                                or "sft", "")),
    # preference objectives: held-out pairs whose chosen response the policy finds likelier
    ("preference accuracy before", lambda r, s: _fmt(s.get("preference_accuracy_before"),
                                                     "pct")),
    ("preference accuracy after", lambda r, s: _fmt(r.final("preference_accuracy_after"),
                                                    "pct")),
    ("tokens/s", lambda r, s: _fmt(s.get("tokens_per_s"), "rate")),
    ("peak memory", lambda r, s: _fmt(s.get("peak_memory_bytes"), "gib")),
    ("wall time", lambda r, s: _fmt(s.get("wall_time_s"), "s")),
    ("overrides", lambda r, s: ("\n".join(r.overrides) or "(none recorded)", "")),
]


def run_table(runs: list[Run]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(name)}</th>" for name, _ in COLUMNS)
    rows = []
    for run in runs:
        cells = []
        for name, cell in COLUMNS:
            text, sort = cell(run, run.summary or {})
            if name == "overrides":
                cells.append(f'<td class="lines"><details><summary>{len(run.overrides)} '
                             f"overrides</summary>{esc(text)}</details></td>")
            elif sort:
                cells.append(f'<td class="num" data-sort="{esc(sort)}">{esc(text)}</td>')
            else:
                cells.append(f'<td class="lines">{esc(text)}</td>')
        rows.append(f'<tr data-run="{esc(run.label)}">{"".join(cells)}</tr>')
    return (f'<div class="scroll"><table class="sortable" id="runs"><thead><tr>{head}</tr>'
            f'</thead>\n<tbody>\n{chr(10).join(rows)}\n</tbody></table></div>')


STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px;
       color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin: 12px 0 6px; }
.meta { color: #666; font-size: 13px; }
img { max-width: 100%; border: 1px solid #ddd; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 14px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12px; margin-top: 8px; }
th, td { border: 1px solid #ccc; padding: 4px 7px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
th[data-dir=asc]::after { content: " \\25B2"; } th[data-dir=desc]::after { content: " \\25BC"; }
td { white-space: nowrap; } td.num { text-align: right; }
td.lines { white-space: pre; }
summary { cursor: pointer; color: #555; }
tr:nth-child(even) td { background: #fafafa; }
code { font-size: 12px; }
"""

# Sort by a cell's data-sort value when it has one (numbers), else by its text; blanks last.
SCRIPT = """
document.querySelectorAll("table.sortable th").forEach((th, col) => {
  th.addEventListener("click", () => {
    const table = th.closest("table"), body = table.tBodies[0];
    const asc = th.dataset.dir !== "asc";
    table.querySelectorAll("th").forEach(h => delete h.dataset.dir);
    th.dataset.dir = asc ? "asc" : "desc";
    const key = row => {
      const cell = row.cells[col];
      return cell.dataset.sort !== undefined ? Number(cell.dataset.sort) : cell.textContent;
    };
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = key(a), y = key(b);
      const blankX = x === "" || x === "n/a", blankY = y === "" || y === "n/a";
      if (blankX || blankY) return blankX - blankY;
      const order = typeof x === "number" && typeof y === "number" ? x - y
        : String(x).localeCompare(String(y), undefined, {numeric: true});
      return asc ? order : -order;
    });
    rows.forEach(row => body.appendChild(row));
  });
});
// report.html#sort=eval%20loss opens sorted by that column (a link to a sorted view).
const wanted = decodeURIComponent(location.hash.replace(/^#sort=/, ""));
document.querySelectorAll("table.sortable th").forEach(th => {
  if (location.hash.startsWith("#sort=") && th.textContent === wanted) th.click();
});
// Lets a headless browser check that every plot decoded: see data-plots-loaded.
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.body.dataset.plotsLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.plots = images.length;
});
"""


def _img(out_dir: Path, name: str, alt: str) -> str:
    data = base64.b64encode((out_dir / name).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" data-file="{name}">'


def render_html(runs: list[Run], swept: list[str], metric: str, plots: dict,
                out_dir: Path, sources: list[Path]) -> str:
    esc = html.escape
    if swept and plots.get("sweep"):
        sweep = (f"<p>Swept: {', '.join(f'<code>{esc(k)}</code>' for k in swept)}. "
                 f"Final <code>{esc(metric)}</code> of each run (from summary.json, or the "
                 "last logged value of a run that has not finished).</p>"
                 + _img(out_dir, plots["sweep"], f"final {metric} against swept values"))
    else:
        sweep = "<p>No hyperparameter differs between these runs.</p>"
    finished = sum(r.summary is not None for r in runs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dtune report</title>
<style>{STYLE}</style></head>
<body>
<h1>dtune report</h1>
<p class="meta">{len(runs)} runs ({finished} finished) from {esc(", ".join(map(str, sources)))};
made {esc(time.strftime("%Y-%m-%d %H:%M"))}. The plots are also saved as PNG files beside
this page.</p>
<div class="grid">
<section><h2>Loss</h2>
{_img(out_dir, plots["loss"], "training and eval loss per run")}</section>
<section><h2>Sweep</h2>
{sweep}</section>
<section><h2>Learning rate</h2>
{_img(out_dir, plots["lr"], "learning rate per run")}</section>
<section><h2>Throughput</h2>
{_img(out_dir, plots["tokens_per_s"], "tokens per second per run")}</section>
</div>
<h2>Runs</h2>
<p class="meta">Click a column header to sort (again to reverse);
<code>report.html#sort=eval%20loss</code> opens sorted.</p>
{run_table(runs)}
<script>{SCRIPT}</script>
</body></html>
"""


def write_report(paths: list[Path], out_dir: Path, metric: str | None = None,
                 force: bool = False) -> Path:
    """Write `out_dir/report.html` and its PNG plots for the runs under `paths`."""
    runs = [load_run(path, label) for path, label in find_runs(paths)]
    swept = mark_swept(runs)
    if metric is None:
        metric = "eval_loss" if any(r.final("eval_loss") is not None for r in runs) \
            else "final_loss"
    out_dir = Path(out_dir)
    # Never a run's own files, nor a folder holding what it reads, --force or not.
    check_output_target(out_dir, "report", force, list(map(Path, paths)))
    # Built beside out_dir and renamed into place: a link planted in a run's report/ folder
    # redirects nothing, and a folder dtune did not write is refused.
    # Labels are run names and config values, shown as written: `$` is no mathtext marker.
    with output_folder(out_dir, "report", force=force, option="--out") as building, \
            matplotlib.rc_context({"text.parse_math": False}):
        plots = {
            "loss": plot_loss(runs, building),
            "lr": plot_step_metric(runs, building, "lr", "Learning rate", "lr"),
            "tokens_per_s": plot_step_metric(runs, building, "tokens_per_s", "Throughput",
                                             "tokens/s"),
            "sweep": plot_sweep(runs, swept, metric, building) if swept else None,
        }
        page = render_html(runs, swept, metric, plots, building, list(map(Path, paths)))
        (building / "report.html").write_text(page, encoding="utf-8")
    return out_dir / "report.html"


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 3000) -> Path:
    """Render `page` in headless Chromium and save what it shows as `png`, with the blank
    space below the content trimmed (Chromium captures the whole window)."""
    browser = find_chromium()
    if browser is None:
        raise DtuneError("--screenshot needs Chromium, and none is on PATH; install it "
                         "(Debian: apt-get install chromium) or leave --screenshot out.")
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
             f"--window-size={width},{height}", "--virtual-time-budget=5000",
             Path(page).resolve().as_uri()],
            capture_output=True, text=True, timeout=180,
        )
    if result.returncode != 0 or not png.is_file():
        raise DtuneError(f"Chromium ({browser}) could not screenshot {page}: "
                         f"{result.stderr.strip()[-500:]}")
    trim_bottom(png)
    return png


def trim_bottom(png: Path, margin: int = 24) -> None:
    with Image.open(png) as image:
        rgb = image.convert("RGB")
    content = ImageChops.difference(rgb, Image.new("RGB", rgb.size, "white")).getbbox()
    if content is not None:
        rgb = rgb.crop((0, 0, rgb.width, min(rgb.height, content[3] + margin)))
    # A page is flat colours and anti-aliased text: 256 colours look the same at a third of
    # the size, which matters for screenshots kept in a repository.
    rgb.quantize(colors=256).save(png, optimize=True)
