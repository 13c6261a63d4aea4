"""The catalogue of bad inputs: every case exits non-zero with one paragraph naming the field or
file, the bad value and the fix, and no traceback; and docs/errors.md holds each message as
dtune prints it now (tests/catalogue.py; python docs/make_errors.py writes the page)."""
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import catalogue
from conftest import TINY, one_line, run_dtune

ALPACA_ROW = {"instruction": "say hi", "input": "", "output": "hi"}


@dataclass
class Case:
    name: str
    overrides: list[str]
    expect: list[str]  # fragments the message must hold: the field or file, the value, the fix
    files: dict[str, str] = field(default_factory=dict)  # name -> content, made in tmp_path
    module: bool = True  # python -m dtune, else the dtune console tool
    # needs neither the model nor the data: refused where launch begins (dtune/settle.py),
    # before a SLURM job is submitted (tests/test_settle.py runs these with launcher=slurm)
    before_launch: bool = False


def rows(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def data(name: str, fmt: str = "alpaca") -> list[str]:
    return ["data=file", f"data.path={{tmp}}/{name}", f"data.format={fmt}"]


CASES = [
    # --- configuration -----------------------------------------------------------------
    Case("unknown key", ["train.lrr=1"], ["train.lrr", "Did you mean train.lr"],
         before_launch=True),
    Case("unknown section key", ["data.max_len=9"], ["data.max_len", "max_seq_len"],
         before_launch=True),
    Case("wrong type", ["train.lr=abc"], ["train.lr", "abc", "Fix the override"],
         before_launch=True),
    Case("wrong type bool", ["train.resume=maybe"], ["train.resume", "maybe"], before_launch=True),
    Case("negative lr", ["train.lr=-1"], ["train.lr=-1.0", "must be > 0"], before_launch=True),
    Case("zero lr", ["train.lr=0"], ["train.lr=0.0", "must be > 0"], before_launch=True),
    Case("zero batch", ["train.micro_batch_size=0"], ["train.micro_batch_size=0", "> 0"],
         before_launch=True),
    Case("zero steps", ["train.max_steps=0"], ["train.max_steps=0", "-1 to train for"],
         before_launch=True),
    Case("negative accumulation", ["train.grad_accum_steps=-2"],
         ["train.grad_accum_steps=-2", "> 0"], before_launch=True),
    Case("unknown schedule", ["train.lr_schedule=step"],
         ["train.lr_schedule='step'", "cosine, linear, constant"], before_launch=True),
    Case("dropout out of range", ["+method=lora", "method.dropout=1.5"],
         ["method.dropout=1.5", "[0, 1)"], before_launch=True),
    Case("unknown method", ["+method=adapterx"], ["method/adapterx", "lora"], before_launch=True),
    Case("method without plus", ["method=lora"], ["method", "+method=lora"], before_launch=True),
    Case("unknown model", ["model=gpt-17"], ["model/gpt-17", "tiny-llama"], before_launch=True),
    Case("unknown parallelism", ["parallelism=fsdp9"], ["parallelism/fsdp9", "zero2"],
         before_launch=True),
    Case("unknown precision", ["precision=fp8"], ["precision/fp8", "bf16"], before_launch=True),
    Case("unknown data format", ["data.format=xml"], ["data.format='xml'", "alpaca, chat, text"],
         before_launch=True),
    Case("sequence beyond the model's context", ["data.max_seq_len=4096"],
         ["data.max_seq_len=4096", "1024 positions", "data.max_seq_len<=1024",
          "model.rope_scaling={rope_type:linear,factor:4}"]),
    Case("precision that the method cannot use", ["+method=lora", "precision=bf16_pure"],
         ["precision=bf16_pure", "+method=lora", "fp32, fp16, bf16"], before_launch=True),
    Case("QLoRA compute dtype against fp16", ["+method=qlora", "precision=fp16",
                                               "method.compute_dtype=bf16"],
         ["precision=fp16", "method.compute_dtype=bf16", "method.compute_dtype=fp16"],
         before_launch=True),
    Case("soft prompt longer than the sequence", ["+method=prompt_tuning",
                                                   "data.max_seq_len=16"],
         ["data.max_seq_len=16", "method.num_virtual_tokens=20"], before_launch=True),
    Case("a method key the method ignores", ["+method=lora", "method.init_text=hello"],
         ["method.init_text='hello'", "prompt_tuning", "Remove it"], before_launch=True),
    Case("quantized base under ZeRO", ["+method=qlora", "parallelism=zero3"],
         ["+method=qlora", "parallelism=zero3", "use parallelism=ddp"], before_launch=True),
    Case("quantized base under FSDP2", ["+method=qlora", "parallelism=fsdp2"],
         ["+method=qlora", "parallelism=fsdp2", "PyTorch FSDP2", "use parallelism=ddp"],
         before_launch=True),
    Case("soft prompt under FSDP2", ["+method=prompt_tuning", "parallelism=fsdp2"],
         ["+method=prompt_tuning", "parallelism=fsdp2", "use parallelism=ddp"],
         before_launch=True),
    Case("offload without a sharding engine", ["parallelism=ddp", "parallelism.offload=true"],
         ["parallelism.offload=true", "parallelism.engine=torch", "fsdp2_offload"],
         before_launch=True),
    Case("more processes than cores", ["parallelism=ddp", "parallelism.nproc_per_node=64"],
         ["parallelism.nproc_per_node=64", "CPU cores", "parallelism.nproc_per_node<="]),
    Case("several processes with parallelism=single", ["parallelism.nproc_per_node=2"],
         ["parallelism.nproc_per_node=2", "parallelism=ddp"], before_launch=True),
    Case("unknown tracker", ["tracker=mlflow"], ["tracker/mlflow", "wandb"], before_launch=True),
    Case("unknown objective name", ["objective.name=kto"],
         ["objective.name='kto'", "sft, dpo, orpo, simpo"], before_launch=True),
    Case("unknown GRPO reward", ["objective=grpo", "objective.rewards=[{name:exact_matc}]"],
         ["objective.rewards[0].name='exact_matc'", "exact_match, json_valid", "_target_"],
         before_launch=True),
    Case("non-finite GRPO reward weight",
         ["objective=grpo", "objective.rewards=[{name:exact_match,weight:nan}]"],
         ["objective.rewards[0].weight=nan", "finite number"], before_launch=True),
    Case("GRPO format reward with a bad regex",
         ["objective=grpo", "objective.rewards=[{name:format,pattern:'a(b'}]"],
         ["objective.rewards[0].pattern='a(b'", "not a valid regular expression"],
         before_launch=True),
    Case("GRPO reward _target_ that cannot be imported",
         ["objective=grpo", "objective.rewards=[{name:mine,_target_:nowhere.brevity}]"],
         ["objective.rewards[0]._target_='nowhere.brevity'", "importing nowhere failed",
          "package.module.function"], before_launch=True),
    Case("init_from a folder that is not a finished run", ["model.init_from={tmp}"],
         ["model.init_from={tmp}", "not a finished dtune run directory", "hydra.run.dir"]),
    Case("an init_from adapter continued by full fine-tuning",
         ["model.init_from={tmp}", "model.init_adapter=continue", "+method=full"],
         ["model.init_adapter=continue", "+method=full", "model.init_adapter=merge"],
         before_launch=True),
    Case("unknown engine", ["parallelism=ddp", "parallelism.engine=fsdp9"],
         ["parallelism.engine='fsdp9'", "torch, deepspeed, fsdp2"], before_launch=True),
    Case("engine without its ZeRO stage", ["parallelism=ddp", "parallelism.engine=deepspeed"],
         ["parallelism.engine=deepspeed", "parallelism=zero1, zero2 or zero3"], before_launch=True),
    Case("sequence parallelism over a process count it does not divide",
         ["parallelism=ddp", "parallelism.nproc_per_node=3", "parallelism.sequence_parallel=2"],
         ["parallelism.sequence_parallel=2", "3 process(es)", "does not divide"],
         before_launch=True),
    Case("sequence parallelism with a preference objective",
         ["parallelism=ddp", "parallelism.nproc_per_node=2", "parallelism.sequence_parallel=2",
          "objective=dpo", "data=builtin_preference"],
         ["parallelism.sequence_parallel=2", "objective=dpo", "objective=sft"],
         before_launch=True),
    Case("unknown non-finite policy", ["train.on_nonfinite=ignore"],
         ["train.on_nonfinite='ignore'", "skip, stop"], before_launch=True),
    Case("non-finite setting", ["train.lr=inf"], ["train.lr=inf", "not a finite number"],
         before_launch=True),
    Case("resume and overwrite together", ["train.resume=true", "train.overwrite=true"],
         ["train.resume=true", "train.overwrite=true", "set one of them"], before_launch=True),
    Case("secret nested in a mapping", ["parallelism.deepspeed_overrides={api_key: abc12345}"],
         ["parallelism.deepspeed_overrides.api_key", "=***", "in the environment"],
         before_launch=True),
    Case("DeepSpeed setting that unpickles", [
        "parallelism=zero2", "parallelism.deepspeed_overrides={checkpoint: {load_universal: true}}"],
         ["checkpoint.load_universal", "weights_only=False"], before_launch=True),
    Case("generation longer than the model's context", ["eval.max_new_tokens=100000000000"],
         ["eval.max_new_tokens=100000000000", "1024 positions"]),
    # --- data ----------------------------------------------------------------------------
    Case("missing file", data("nope.jsonl"), ["data.path=", "nope.jsonl", "no such file"]),
    Case("empty file", data("empty.jsonl"), ["empty.jsonl", "is empty"], {"empty.jsonl": ""}),
    Case("malformed JSONL", data("bad.jsonl"), ["bad.jsonl, line 2", "malformed JSON"],
         {"bad.jsonl": rows(ALPACA_ROW, '{"instruction": "x", "output": ')}),
    Case("JSONL line that is not an object", data("list.jsonl"),
         ["list.jsonl, line 1", "expected a JSON object"], {"list.jsonl": rows("[1, 2]")}),
    Case("missing column", data("nocol.jsonl"),
         ["nocol.jsonl, line 2", "'output' is missing", "columns present"],
         {"nocol.jsonl": rows(ALPACA_ROW, {"instruction": "x", "input": ""})}),
    Case("empty response", data("empty_out.jsonl"),
         ["empty_out.jsonl, line 1", "'output' is empty"],
         {"empty_out.jsonl": rows({"instruction": "x", "output": " "}, ALPACA_ROW)}),
    Case("non-string field", data("num.jsonl", "text"),
         ["num.jsonl, line 1", "'text' must be a string", "int 42"], {"num.jsonl": rows({"text": 42})}),
    Case("unknown chat role", data("role.jsonl", "chat"),
         ["role.jsonl, line 1", "role 'robot'", "system, user, assistant"],
         {"role.jsonl": rows({"messages": [{"role": "user", "content": "hi"},
                                           {"role": "robot", "content": "beep"}]})}),
    Case("chat without an assistant turn", data("noasst.jsonl", "chat"),
         ["noasst.jsonl, line 1", "no assistant message"],
         {"noasst.jsonl": rows({"messages": [{"role": "user", "content": "hi"}]})}),
    Case("unsupported file format", data("data.xlsx"), ["data.xlsx", "'.xlsx'", ".jsonl"],
         {"data.xlsx": "not a spreadsheet"}),
    Case("every response truncated away", [*data("long.jsonl"), "data.max_seq_len=8"],
         ["data.max_seq_len=8", "raise data.max_seq_len"],
         {"long.jsonl": rows(*[{"instruction": "word " * 30, "output": "yes"}] * 4)}),
    Case("eval fraction that leaves no training rows",
         [*data("one.jsonl"), "data.eval_fraction=0.5"],
         ["data.eval_fraction=0.5", "leaves no training rows"],
         {"one.jsonl": rows(ALPACA_ROW)}),
    Case("built-in data with a non-chat format", ["data.format=alpaca"],
         ["data.format='alpaca'", "data.path=builtin", "data.format=chat"], before_launch=True),
    Case("unknown built-in task", ["data.builtin.tasks=[add,poetry]"],
         ["data.builtin.tasks", "poetry", "reverse_words"], before_launch=True),
    Case("streaming without a step count", ["data.streaming=true", "train.max_steps=-1"],
         ["data.streaming=true", "train.max_steps", "train.max_steps=10000"], before_launch=True),
    Case("streaming with epochs", ["data.streaming=true", "train.epochs=2"],
         ["train.epochs=2", "no epochs", "Remove train.epochs"], before_launch=True),
    Case("data.path and data.sources together",
         [*data("a.jsonl"), "data.sources=[{path: b.jsonl}]"],
         ["data.path=", "data.sources are both set", "data=mixture"], before_launch=True),
    Case("one eval file for a mixture",
         ["data=mixture", "data.sources=[{path: a.jsonl}, {path: b.jsonl}]",
          "data.eval_path=e.jsonl"],
         ["data.eval_path='e.jsonl'", "mixture", "its own eval_path"], before_launch=True),
    # --- the machine a SLURM job asks for: known before it is submitted -----------------------
    Case("fp16 under ZeRO on a SLURM job without GPUs",
         ["launcher=slurm", "+method=full", "precision=fp16", "parallelism=zero2",
          "parallelism.nproc_per_node=1"],
         ["precision=fp16 with parallelism=zero2 needs a GPU", "SLURM job", "precision=bf16"],
         before_launch=True),
    Case("parallelism=auto for SLURM GPUs of unknown memory",
         ["launcher=slurm", "launcher.gpus_per_node=8", "parallelism=auto"],
         ["parallelism=auto", "8 GPU(s) per node", "launcher.gpu_memory_gib=80"],
         before_launch=True),
    # --- model ---------------------------------------------------------------------------
    Case("model not found offline", ["model.name_or_path=acme/no-such-model", "model.random_init=null"],
         ["acme/no-such-model", "was not found", "Hugging Face cache", "model=tiny-llama"]),
    Case("local folder that is not a model",
         ["model.name_or_path={tmp}/empty_dir", "model.random_init=null"],
         ["empty_dir", "holds no config.json", "save_pretrained"], {"empty_dir/.keep": ""}),
    Case("not a causal LM", ["model.name_or_path={tmp}/t5", "model.random_init=null"],
         ["'t5' model", "not a causal language model", "decoder-only"],
         {"t5/config.json": json.dumps({"model_type": "t5", "vocab_size": 64, "d_model": 16,
                                        "num_layers": 1, "num_heads": 2, "d_ff": 32})}),
    Case("a word that is neither a setting nor a tool", ["qlora"],
         ["'qlora'", "neither a setting nor a dtune tool", "+method=qlora", "eval RUN_DIR"],
         before_launch=True),
    # --- tools ---------------------------------------------------------------------------
    Case("eval of a folder that is not a run", ["eval", "{tmp}"],
         ["is not a dtune run directory", ".hydra/config.yaml"], module=False),
    Case("merge of a folder that is not a run", ["merge", "{tmp}"],
         ["is not a dtune run directory"], module=False),
    Case("generate from a folder that is neither", ["generate", "{tmp}", "--prompt", "hi"],
         ["neither a dtune run directory", "config.json"], module=False),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_clear_paragraph(tmp_path, case):
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    args = [a.replace("{tmp}", str(tmp_path)) for a in case.overrides]
    if case.module:
        args = [*TINY, *args, f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_dtune(*args, module=case.module)
    message = one_line(result.stderr)
    assert result.returncode != 0, result.stdout[-1500:]
    for fragment in case.expect:
        assert fragment.replace("{tmp}", str(tmp_path)) in message, result.stderr[-2500:]
    assert "Traceback" not in result.stderr
    assert not catalogue.stale(case.name, catalogue.message(result.stderr, tmp_path)), \
        catalogue.stale(case.name, catalogue.message(result.stderr, tmp_path))


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 40


def test_disk_full_while_saving_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    """A write error injected at the filesystem layer (ENOSPC) mid-checkpoint."""
    import errno

    import torch

    from conftest import train
    from dtune.checkpoint import valid_checkpoints
    from dtune.errors import DtuneError

    overrides = [*TINY, "+method=full", "train.max_steps=4", "train.save_every=2",
                 "eval.exact_match_samples=0"]
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if "step-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(DtuneError, match=r"writing the checkpoint for step 4.*No space"):
        train(tmp_path, *overrides)
    assert [c.name for c in valid_checkpoints(tmp_path)] == ["step-2"]
    assert not list((tmp_path / "checkpoints").glob(".step-*.tmp-*"))


# --- run directories: situations a config alone cannot make --------------------------------

RUN = [*TINY, "train.max_steps=2", "train.save_every=1"]


def held(tmp: Path, run: Path):
    from dtune import run_lock
    from dtune.run_dir import RunDir

    run_lock.hold(RunDir(run))  # this process holds it while the command runs
    return [*RUN, "train.resume=true", "hydra.run.dir={tmp}/run"], True


def used(tmp: Path, run: Path):
    return [*RUN, "train.lr=3e-3", "hydra.run.dir={tmp}/run"], True


def changed(tmp: Path, run: Path):
    return [*RUN, "train.resume=true", "train.micro_batch_size=2", "hydra.run.dir={tmp}/run"], \
        True


def damaged(tmp: Path, run: Path):
    for manifest in run.glob("checkpoints/step-*/manifest.json"):
        manifest.unlink()
    return [*RUN, "train.resume=true", "hydra.run.dir={tmp}/run"], True


def linked(tmp: Path, run: Path):
    (run / ".hydra" / "config.yaml").unlink()
    (run / ".hydra" / "config.yaml").symlink_to(tmp / "yours.yaml")
    return [*RUN, "train.resume=true", "hydra.run.dir={tmp}/run"], True


def report_into_final(tmp: Path, run: Path):
    return ["report", "{tmp}/run", "--out", "{tmp}/run/final"], False


def merge_into_root(tmp: Path, run: Path):
    return ["merge", "{tmp}/run", "--out", "/", "--force"], False


def damaged_summary(tmp: Path, run: Path):
    (run / "summary.json").write_text("[1, 2]")
    return ["report", "{tmp}/run"], False


SITUATIONS = [
    ("a second run in a directory another run holds", held),
    ("a fresh run in a directory that holds another run", used),
    ("a resume under settings that change training", changed),
    ("a resume whose every checkpoint is damaged", damaged),
    ("a link planted in the run directory", linked),
    ("report --out a run's final/ folder", report_into_final),
    ("merge --out / --force", merge_into_root),
    ("report of a run whose summary.json is damaged", damaged_summary),
]


def situation(make, tmp: Path, trained: Path) -> tuple[str, str]:
    """(the command as shown, the message as written down) of one situation, set up in a copy
    of a finished run at tmp/run."""
    run = tmp / "run"
    shutil.copytree(trained, run, symlinks=True)
    overrides, module = make(tmp, run)
    try:
        result = run_dtune(*[a.replace("{tmp}", str(tmp)) for a in overrides], module=module)
    finally:
        from dtune import run_lock
        from dtune.run_dir import RunDir

        run_lock.release(RunDir(run))
    shown = " ".join(a.replace("{tmp}", "DIR") for a in overrides if a not in TINY)
    command = f"python -m dtune {shown}" if module else f"dtune {shown}"
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return command, catalogue.message(result.stderr, tmp)


def train_run(folder: Path) -> Path:
    """A finished tiny run with checkpoints at steps 1 and 2."""
    result = run_dtune(*RUN, f"hydra.run.dir={folder}")
    assert result.returncode == 0, result.stderr[-2000:]
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("trained") / "run")


@pytest.mark.parametrize("name, make", SITUATIONS, ids=[name for name, _ in SITUATIONS])
def test_a_run_directory_situation_gets_its_catalogued_paragraph(tmp_path, trained, name, make):
    _, text = situation(make, tmp_path, trained)
    assert not catalogue.stale(name, text), catalogue.stale(name, text)
