"""The `dtune` command: `train` (same as `python -m dtune`), `eval`, `generate`, `merge`,
`export`, `check`, `report`, `plan`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dtune.errors import DtuneError, exit_with


# Each command imports what it needs inside its function, deliberately: `dtune report` and
# the argument errors stay fast, without torch, transformers or DeepSpeed loaded.
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        from dtune import app

        sys.argv = ["dtune"] + argv[1:]
        app.main(TOOLS)
        return
    args = build_parser().parse_args(argv)
    try:
        if args.command == "eval":
            run_eval(args)
        elif args.command == "generate":
            run_generate(args)
        elif args.command == "check":
            run_parity_check(args)
        elif args.command == "merge":
            from dtune.merge import merge_run

            out = merge_run(args.run_dir, args.out, args.force, args.trust_remote_code,
                            args.checkpoint)
            print(f"Merged model written to {out}")
        elif args.command == "export":
            from dtune.export import export_gguf

            out = export_gguf(args.run_dir, args.gguf, args.quant, args.checkpoint, args.force,
                              args.trust_remote_code)
            print(f"GGUF ({args.quant}) written to {out}")
        elif args.command == "report":
            run_report(args)
        elif args.command == "plan":
            run_plan(args)
    except DtuneError as error:
        exit_with(error)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="fine-tune; takes Hydra overrides, like `python -m dtune`")

    p_eval = sub.add_parser("eval", help="held-out loss and exact match of a finished run")
    p_eval.add_argument("run_dir", type=Path)
    p_eval.add_argument("--samples", type=int, default=None,
                        help="held-out prompts to answer (default: the whole held-out split)")
    p_eval.add_argument("--max-new-tokens", type=int, default=None)
    add_checkpoint_flag(p_eval, "writes RUN_DIR/eval-step-N.json")
    add_trust_flag(p_eval)

    p_gen = sub.add_parser("generate", help="answer prompts with a run's model, a model folder "
                           "or a GGUF file")
    p_gen.add_argument("run_dir", type=Path, metavar="RUN_DIR_OR_MODEL_DIR_OR_GGUF")
    p_gen.add_argument("--prompt", action="append",
                       help="a user message (repeatable); without it, an interactive chat")
    p_gen.add_argument("--max-new-tokens", type=int, default=128)
    p_gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p_gen.add_argument("--temperature", type=float, default=0.7)
    p_gen.add_argument("--top-p", type=float, default=0.9)
    p_gen.add_argument("--raw", action="store_true",
                       help="send the prompt as plain text, without the chat template")
    add_checkpoint_flag(p_gen)
    add_trust_flag(p_gen)

    p_merge = sub.add_parser("merge", help="merge a run's adapter into its base model")
    p_merge.add_argument("run_dir", type=Path)
    p_merge.add_argument("--out", type=Path, default=None,
                         help="the folder to write (default: RUN_DIR/merged, or "
                              "RUN_DIR/merged-step-N); an existing folder dtune did not write "
                              "is refused")
    p_merge.add_argument("--force", action="store_true",
                         help="replace --out even if dtune did not write it")
    add_checkpoint_flag(p_merge)
    add_trust_flag(p_merge)
    add_export_parser(sub)

    p_check = sub.add_parser("check", help="prove that parallel layouts train identically")
    p_check.add_argument("--steps", type=int, default=20)
    p_check.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                         help="the training precision every layout runs in (tolerances: see "
                              "dtune/parity.py)")
    p_check.add_argument("--work-dir", type=Path, default=None,
                         help="where the runs go (default: a temporary folder)")
    p_check.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="an objective to check instead of SFT, with its settings, e.g. "
                              "objective=dpo (on the built-in preference pairs)")

    p_report = sub.add_parser("report", help="an HTML dashboard (PNG plots) of runs and sweeps")
    p_report.add_argument("paths", type=Path, nargs="+", metavar="RUN_OR_SWEEP_DIR")
    p_report.add_argument("--out", type=Path, default=None,
                          help="folder for report.html and the plots (default: DIR/report for "
                               "one DIR, else ./dtune-report)")
    p_report.add_argument("--metric", default=None,
                          help="summary figure for the sweep view (default: eval_loss, else "
                               "final_loss)")
    p_report.add_argument("--force", action="store_true",
                          help="replace --out even if dtune did not write it")
    p_report.add_argument("--screenshot", type=Path, default=None, metavar="PNG",
                          help="also save a headless-Chromium screenshot of the page")

    p_plan = sub.add_parser("plan", help="estimate per-device memory for each parallelism "
                            "(reads the model's config only, no weights)")
    p_plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="the training overrides, e.g. model.name_or_path=Qwen/Qwen2.5-7B "
                             "+method=qlora precision=bf16 train.micro_batch_size=4")
    p_plan.add_argument("--world-size", type=int, default=None,
                        help="devices in all (default: what parallelism.* would start)")
    p_plan.add_argument("--device-gib", type=float, default=None,
                        help="memory of one device in GiB (default: this machine's GPU, "
                             "else its RAM); given, the plan is for GPUs unless --device cpu")
    p_plan.add_argument("--device", choices=("gpu", "cpu"), default=None,
                        help="plan for GPUs (allocator figures) or CPU processes (RSS); "
                             "default: this machine's GPU, or GPUs when --device-gib is given")

    return parser


def add_export_parser(sub) -> None:
    p_export = sub.add_parser("export", help="write a run's merged model as one GGUF file "
                              "(llama.cpp, Ollama, LM Studio)")
    p_export.add_argument("run_dir", type=Path)
    p_export.add_argument("--gguf", type=Path, nargs="?", const=None, required=True,
                          metavar="OUT.gguf",
                          help="write GGUF (default file: RUN_DIR/model[-step-N]-QUANT.gguf); "
                               "an existing file dtune did not write is refused")
    p_export.add_argument("--quant", choices=("f16", "q8_0"), default="f16",
                          help="the weights' type: f16 (default) or q8_0 (8-bit blocks, about "
                               "half the size); norms stay fp32")
    p_export.add_argument("--force", action="store_true",
                          help="replace the file even if dtune did not write it")
    add_checkpoint_flag(p_export)
    add_trust_flag(p_export)


def add_checkpoint_flag(parser: argparse.ArgumentParser, more: str = "") -> None:
    parser.add_argument("--checkpoint", default=None, metavar="step-N",
                        help="use the run's sealed checkpoint step-N instead of final/ (checked "
                             "against its manifest, as a resume checks it)"
                             + (f"; {more}" if more else ""))


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the base model's own Python code to run; a run "
                             "directory's saved config never turns this on")


def run_parity_check(args) -> None:
    import tempfile

    from dtune.parity import BASE, objective_overrides, run_check, table
    from dtune.compose import compose_config

    compose_config([*BASE, *objective_overrides(args.overrides)])  # a typo: refused at once
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="dtune-check-"))
    print(f"Training the tiny model under each layout in {work_dir} ...", flush=True)
    results = run_check(work_dir, steps=args.steps, precision=args.precision,
                        overrides=tuple(args.overrides))
    print(table(results, args.steps, args.precision))
    if not all(r.passed for r in results):
        raise DtuneError("dtune check found layouts whose losses differ beyond tolerance "
                         "(see the table above); this cluster's setup changes the training.")


def run_plan(args) -> None:
    from dtune.compose import check_overrides, compose_config
    from dtune.distributed import wanted_processes
    from dtune.plan import (GIB, choose, context_table, device_memory_bytes, model_shape,
                            plan, table)
    from dtune.settle import Machine, settle

    check_overrides(args.overrides)
    cfg = compose_config(args.overrides)
    local_bytes, local_gpu = device_memory_bytes()
    on_gpu, said = planned_device(args.device, args.device_gib, local_gpu)
    device_bytes = int(args.device_gib * GIB) if args.device_gib else local_bytes
    if cfg.parallelism.name == "auto" or (cfg.parallelism.name == "single"
                                          and args.world_size is None):
        cfg.parallelism.name = "ddp"  # the table compares every layout
    # the config as a run on the planned devices would settle it (precision=auto: bf16 on a GPU)
    cfg = settle(cfg, Machine(int(on_gpu), device_bytes, on_gpu, 1, said))
    world = args.world_size or wanted_processes(cfg.parallelism)
    shape = model_shape(cfg)
    estimates = plan(cfg, world, on_gpu, shape)
    print(f"{cfg.model.name_or_path}, +method={cfg.method.name}, precision={cfg.precision.name}, "
          f"{world} device(s), micro-batch {cfg.train.micro_batch_size} x "
          f"{cfg.data.max_seq_len} tokens, {device_bytes / GIB:.1f} GiB per device "
          f"({'GPU' if on_gpu else 'CPU'}: {said}):")
    print(table(estimates, device_bytes))
    try:
        print("parallelism=auto would choose " +
              choose(estimates, device_bytes, cfg.method.name)[1] + ".")
    except DtuneError as error:
        print(str(error))
    print(f"\nThe longest data.max_seq_len that fits {device_bytes / GIB:.1f} GiB per device, "
          "as set and with each long-context switch alone:")
    print(context_table(cfg, shape, estimates, world, on_gpu, device_bytes))


def planned_device(device: str | None, device_gib: float | None,
                   local_gpu: bool) -> tuple[bool, str]:
    """(plan for a GPU?, why): --device when given; else this machine's GPU; else a GPU when
    --device-gib names one's memory; only else this machine's CPU, said so."""
    if device is not None:
        return device == "gpu", f"--device {device}"
    if local_gpu:
        return True, "this machine's GPU"
    if device_gib:
        return True, "--device-gib given; --device cpu plans for CPU processes instead"
    return False, "this machine has no GPU; --device gpu --device-gib N plans for GPUs"


def run_eval(args) -> None:
    from dtune.data.batching import BatchStream
    from dtune.data.loading import load_splits
    from dtune.data.prepare import tokenize_records
    from dtune.evaluate import HeldOut, Inference, check_new_tokens, held_out_figures
    from dtune.load_run import load_final_model
    from dtune.loss_plan import plan_loss
    from dtune.run_dir import RunDir

    model, tokenizer, cfg = load_final_model(args.run_dir, args.trust_remote_code,
                                             args.checkpoint)
    max_new_tokens = args.max_new_tokens or cfg.eval.max_new_tokens
    check_new_tokens(max_new_tokens,
                     "--max-new-tokens" if args.max_new_tokens else "eval.max_new_tokens",
                     model, cfg.model.name_or_path)
    engine = Inference.place(model)
    sources = load_splits(cfg.data)
    # the first source's format (a mixture of several formats: its rows of that format)
    fmt = sources[0].format
    eval_records = [row for source in sources if source.format == fmt for row in source.eval]
    if not eval_records:
        raise DtuneError(f"the run in {args.run_dir} has no held-out split to evaluate on.")
    samples = args.samples or len(eval_records)  # prompts for exact match, or pairs
    if fmt == "preference":
        eval_records = eval_records[:samples]
    examples = tokenize_records(eval_records, cfg, tokenizer, "eval", fmt=fmt)
    pairs = [BatchStream(examples, cfg.eval.batch_size, cfg.train.seed,
                         tokenizer.pad_token_id)] if fmt == "preference" else None
    # the loss plan and the figures of training's own evaluation, so the two agree
    plan = plan_loss(cfg, engine, tokenizer)  # settled for one process (dtune/load_run.py)
    figures, scored = held_out_figures(engine, tokenizer, HeldOut({"eval": examples},
                                                                  eval_records, fmt, pairs),
                                       plan.response_head, cfg.eval.batch_size,
                                       cfg.data.system_prompt, samples, max_new_tokens)
    by_task = {k.split("/", 1)[1]: v for k, v in figures.items() if k.startswith("exact_match/")}
    result = {**{k: v for k, v in figures.items() if "/" not in k},
              **({"exact_match_by_task": by_task} if "exact_match" in figures else {}),
              **({"n": scored} if scored else {}), **checkpoint_field(args)}
    run = RunDir(args.run_dir)
    run.write_json(run.eval_file_at(args.checkpoint), result)
    print(json.dumps(result, indent=2))


def checkpoint_field(args) -> dict:
    """eval.json says which weights it measured where they are not final/'s."""
    return {"checkpoint": args.checkpoint} if args.checkpoint else {}


def run_report(args) -> None:
    from dtune.report import screenshot, write_report

    from dtune.run_dir import RunDir

    out = args.out or (RunDir(args.paths[0]).report if len(args.paths) == 1
                       else Path("dtune-report"))
    page = write_report(args.paths, out, args.metric, args.force)
    print(f"Report written to {page} (open it in a browser; the plots are PNGs beside it)")
    if args.screenshot:
        print(f"Screenshot written to {screenshot(page, args.screenshot)}")


def run_generate(args) -> None:
    from dtune.data.formatting import render_chat
    from dtune.evaluate import Inference, check_new_tokens, generate
    from dtune.load_run import load_for_generation

    model, tokenizer, system_prompt = load_for_generation(args.run_dir, args.trust_remote_code,
                                                         args.checkpoint)
    check_new_tokens(args.max_new_tokens, "--max-new-tokens", model, args.run_dir)
    engine = Inference.place(model)
    use_chat = not args.raw and bool(getattr(tokenizer, "chat_template", None))
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []

    def answer(history: list[dict]) -> str:
        if use_chat:
            prompt = render_chat(tokenizer, history, add_generation_prompt=True)
        else:
            prompt = history[-1]["content"]
        return generate(engine, tokenizer, [prompt], args.max_new_tokens, 1,
                        add_special_tokens=not use_chat, do_sample=args.sample,
                        temperature=args.temperature, top_p=args.top_p)[0]

    if args.prompt:
        for prompt in args.prompt:
            print(answer(system + [{"role": "user", "content": prompt}]), flush=True)
        return
    history = list(system)
    print("Chat with the fine-tuned model; an empty line or Ctrl-D ends it.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        reply = answer(history)
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)


# The subcommands, from the parser itself: `python -m dtune TOOL ...` hands these to main().
TOOLS = tuple(build_parser()._subparsers._group_actions[0].choices)


if __name__ == "__main__":
    main()
