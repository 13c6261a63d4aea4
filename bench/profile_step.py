"""Where a training step's time goes: torch.profiler over LoRA steps on SmolLM2-135M-Instruct,
one packed micro-batch (4 x 256 tokens), with the plain loss and with the chunked loss.

    python bench/profile_step.py [--method lora] [--steps 2]

Writes bench/results/profile.md (top operators by self CPU time, and the share of the step
spent in the LM head and the loss).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    from hydra import compose, initialize_config_dir

    from dtune.config import register_schema, to_config
    from dtune.data.batching import BatchStream
    from dtune.data.builtin import generate
    from dtune.data.formatting import tokenize
    from dtune.loss import summed_token_loss
    from dtune.methods import apply_method, load_options
    from dtune.models import load_model_and_tokenizer

    register_schema()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_config(compose("config", overrides=[
            f"+method={args.method}", "model=smollm2-135m", "method.r=8", "method.alpha=16",
            "method.dropout=0"] if args.method != "full" else ["+method=full"]))
    model, tokenizer, _ = load_model_and_tokenizer(cfg.model, load_options(cfg.method))
    model = apply_method(model, cfg.method, tokenizer).train()
    records, _ = generate(["add", "reverse_words", "convert_units", "extract_json"], 200, 0, 0)
    examples = [tokenize(r, "chat", tokenizer, 256, False) for r in records]
    stream = BatchStream(examples, 4, 0, tokenizer.pad_token_id, pack_len=256)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    lines = [f"# Step profile: {args.method}, SmolLM2-135M, packed 4 x 256, fp32, "
             f"load {os.getloadavg()[0]:.1f} at start", ""]
    for chunk in (0, 1024):
        batch = stream.next_window(1)[0]
        summed_token_loss(model, batch, chunk).backward()  # warm-up
        optimizer.zero_grad()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            started = time.perf_counter()
            for _ in range(args.steps):
                batch = stream.next_window(1)[0]
                with torch.profiler.record_function("loss_forward"):
                    loss = summed_token_loss(model, batch, chunk)
                with torch.profiler.record_function("backward"):
                    loss.backward()
                with torch.profiler.record_function("optimizer"):
                    optimizer.step()
                    optimizer.zero_grad()
            seconds = (time.perf_counter() - started) / args.steps
        lines += [f"## loss_chunk_size={chunk}: {seconds:.2f} s/step", "", "```",
                  prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14,
                                            max_name_column_width=40), "```", ""]
        print(lines[-3][:4000], flush=True)
    out = ROOT / "bench" / "results" / "profile.md"
    out.write_text("\n".join(lines))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
