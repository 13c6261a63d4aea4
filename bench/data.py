"""Tokenization at scale: 1,000,000 generated alpaca rows (about 300 MB of JSONL), read,
checked and tokenized cold, then warm (from the caches), with data.num_proc 1 and 2.

Each measurement runs in a fresh process. Peak RSS is the process's own ru_maxrss above the
baseline of a process that has imported everything and built the tokenizer but read no data
(the "model-free baseline"); with num_proc 2 the worker processes' peak is reported apart
(RUSAGE_CHILDREN: the largest child). Results go to bench/results/data.md.

    .venv/bin/python bench/data.py [--rows 1000000] [--work-dir /tmp/dtune-bench-data]
    .venv/bin/python bench/data.py --warm-only   # again from the caches a full run left
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

MEASURE = r"""
import json, os, resource, sys, time
sys.path.insert(0, {tests!r})
from conftest import compose
from dtune.data.loading import load_splits
from dtune.data.prepare import prepare_data
from dtune.distributed import Ranks
from dtune.models import build_tiny_tokenizer
cfg = compose("model=tiny-llama", "data=file", "data.path={path}", "data.format=alpaca",
              "data.max_seq_len=256", "data.num_proc={num_proc}")
tokenizer = build_tiny_tokenizer(cfg.model.random_init.vocab_size)
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
started = time.perf_counter()
if {load}:
    sources = load_splits(cfg.data)
    data = prepare_data(cfg, tokenizer, Ranks(), sources)
    rows = len(data.train)
else:
    rows = 0
seconds = time.perf_counter() - started
print(json.dumps({{"seconds": seconds, "baseline": baseline, "rows": rows,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "children_peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}}))
"""

WORDS = ("apple river stone cloud tiger paper window garden silver orange candle forest bread "
         "mirror rocket pencil valley ocean thunder basket lemon castle dragon feather jacket "
         "ladder marble needle pillow rabbit saddle tomato violin wagon anchor bottle").split()


def generate(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with path.open("w") as handle:
        for i in range(rows):
            words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
            handle.write(json.dumps({"instruction": f"Task {i}: {words(22)}", "input": words(6),
                                     "output": words(14)}) + "\n")


def measure(path: Path, work: Path, num_proc: int, load: bool = True) -> dict:
    env = {**os.environ, "DTUNE_CACHE_DIR": str(work / f"dtune-cache-{num_proc}"),
           "HF_DATASETS_CACHE": str(work / f"hf-cache-{num_proc}"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = MEASURE.format(tests=str(ROOT / "tests"), path=path, num_proc=num_proc, load=load)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dtune-bench-data"))
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warm-only", action="store_true",
                        help="measure warm starts only, from the caches of an earlier full run, "
                             "and add them to the report")
    args = parser.parse_args()
    work = args.work_dir
    if args.warm_only:
        return warm_again(args)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    path = work / "train.jsonl"
    generate(path, args.rows)
    size_mb = path.stat().st_size / 1e6
    baseline = measure(path, work, 1, load=False)["peak"]
    results = []
    for num_proc in args.num_proc:
        cold = measure(path, work, num_proc)
        warm = measure(path, work, num_proc)
        results.append((num_proc, cold, warm))
        print(f"num_proc={num_proc}: cold {cold['seconds']:.1f} s, warm {warm['seconds']:.2f} s",
              flush=True)
    write_report(args, size_mb, baseline, results)


def warm_again(args) -> None:
    path, mib = args.work_dir / "train.jsonl", 1024 ** 2
    baseline = measure(path, args.work_dir, 1, load=False)["peak"]
    lines = ["", f"Warm again: `.venv/bin/python bench/data.py --warm-only` "
             f"({time.strftime('%Y-%m-%d %H:%M')}), from the caches above.", "",
             "| num_proc | warm s | warm peak RSS above baseline (MiB) |", "|---|---|---|"]
    for num_proc in args.num_proc:
        warm = measure(path, args.work_dir, num_proc)
        lines.append(f"| {num_proc} | {warm['seconds']:.2f} | "
                     f"{(warm['peak'] - baseline) / mib:.0f} |")
    report = RESULTS / "data.md"
    report.write_text(report.read_text() + "\n".join(lines) + "\n")
    print("\n".join(lines))


def write_report(args, size_mb: float, baseline: int, results: list) -> None:
    mib = 1024 ** 2
    lines = [
        "# Tokenizing 1M rows: cold and warm", "",
        f"`.venv/bin/python bench/data.py --rows {args.rows}` on {os.cpu_count()} CPU cores "
        f"(shared), {time.strftime('%Y-%m-%d')}. {args.rows:,} generated alpaca rows, "
        f"{size_mb:.0f} MB of JSONL; tiny-llama's tokenizer, data.max_seq_len=256. Cold: empty "
        "dtune and datasets caches (JSONL to Arrow, every row checked, tokenized). Warm: the "
        "same run again, from the caches. Peak RSS is above the model-free baseline "
        f"({baseline / mib:.0f} MiB: everything imported, tokenizer built, no data).", "",
        "| num_proc | cold s | warm s | warm / cold | cold peak RSS above baseline (MiB) | "
        "largest worker peak RSS (MiB) | warm peak RSS above baseline (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for num_proc, cold, warm in results:
        lines.append(
            f"| {num_proc} | {cold['seconds']:.1f} | {warm['seconds']:.2f} | "
            f"{100 * warm['seconds'] / cold['seconds']:.1f}% | "
            f"{(cold['peak'] - baseline) / mib:.0f} | "
            f"{cold['children_peak'] / mib:.0f} | {(warm['peak'] - baseline) / mib:.0f} |")
    lines += ["", "Goals: warm under 5% of cold; cold peak RSS under 2 GiB above the baseline.",
              ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
