"""Memory planner: per-device memory of a fine-tune under each parallelism, from the model's
config alone (no weights are loaded or downloaded), and the choice behind parallelism=auto.

The estimate adds up, per device:
- weights: what trains in fp32 (16 bits in DeepSpeed's bf16/fp16 modes, and under
  bf16_pure); a frozen base in its load dtype: the compute dtype under bf16/fp16 (2 bytes),
  quantised linear layers 0.5 (4-bit, + ~1.6% quantisation constants) or 1 byte (8-bit);
  sharded across ranks by ZeRO-3 and FSDP2, which also gather about two whole modules at a
  time (in 16 bits under bf16/fp16);
- gradients: one fp32 value per trainable parameter (DeepSpeed accumulates in fp32 too);
  sharded by ZeRO-2/3 and FSDP2 (which, with gradient accumulation, also holds whole
  gradients in the compute dtype until a window's last micro-batch reduces them);
- optimizer: AdamW's two fp32 moments per trainable parameter (+ fp32 master weights in
  DeepSpeed's 16-bit modes); sharded by ZeRO-1/2/3 and FSDP2, moved to the host by the
  offload options (which at ZeRO-3 and FSDP2 move the parameter shards too);
- activations: what backward keeps per token and layer (LLaMA-style block: ~7 hidden-size
  and 4 intermediate-size vectors; the layer input alone under gradient checkpointing; the
  MLP's input instead of its intermediates with train.mlp_tiles, plus one tile's worth at
  a time; none of the layers' on a GPU with train.offload_activations, which keeps them in
  host memory, but one layer's), for this rank's tokens: 1/sequence_parallel of each row, the
  fp32 logits and their gradient (one chunk of them with train.loss_chunk_size), and under
  torch autocast (full fine-tuning in bf16/fp16) the 16-bit copy of every fp32 weight a
  matmul read, kept until backward; a preference objective's micro-batch holds two rows per
  pair (chosen and rejected), scored from full logits;
- DPO's reference: a frozen copy adds the starting weights once more (the other references
  add nothing that lasts: adapters disabled, or log-probs read from a file);
- runtime: on a GPU the CUDA context, NCCL's buffers and allocator fragmentation (2 GiB plus
  a tenth of the rest); on CPU the process's own footprint (Python, torch, tokenizer, data:
  ~0.6 GiB measured);
- loading: ZeRO-3 loads each rank's shard, gathering one module at a time; FSDP2 loads the
  whole model into host memory and moves one layer at a time to the GPU (on a CPU machine:
  the whole model per process); a layout whose loading needs more than its training is
  planned by its loading.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dtune.compose import check_combination, conf_group
from dtune.config import Config, ModelConfig, ParallelismConfig, loss_chunk_size
from dtune.engines import ENGINES, shards_parameters
from dtune.errors import DtuneError
from dtune.families import resolve_targets
from dtune.hub import hub_reachable
from dtune.methods import METHODS
from dtune.models import cached_conversion, gguf_file, random_model_config
from dtune.objectives import objective_spec, resolve_reference

log = logging.getLogger("dtune")
GIB = 1024**3
CPU_RUNTIME_BYTES = int(0.6 * GIB)


@dataclass(frozen=True)
class Layout:
    """One option of the parallelism group (conf/parallelism/NAME.yaml)."""

    name: str
    engine: str  # a key of dtune.engines.ENGINES
    zero_stage: int | None  # the memory estimate models ZeRO's sharding by stage
    offload: bool

    @property
    def parallelism(self) -> ParallelismConfig:
        return ParallelismConfig(name=self.name, engine=self.engine, zero_stage=self.zero_stage,
                                 offload=self.offload)

    @property
    def sharding(self) -> int:
        """What the engine splits across ranks, counted as ZeRO's stages count it (3: FSDP2)."""
        return ENGINES[self.engine].sharding(self.parallelism)

    @property
    def cost(self) -> tuple:
        """Cheapest first: less communication and fewer moving parts win when several fit
        (single, ddp, zero1, zero2, then fsdp2 before zero3: its checkpoints resume on any
        number of processes; then the offload options)."""
        return (self.offload, self.sharding, self.name != "single",
                ENGINES[self.engine].fixed_world_size)


def layouts() -> dict[str, Layout]:
    """Every parallelism option but `auto`, from its YAML file."""
    found = {}
    for name, node in conf_group("parallelism").items():
        if name != "auto":
            found[name] = Layout(name, node.get("engine", ParallelismConfig.engine),
                                 node.get("zero_stage"), bool(node.get("offload", False)))
    return dict(sorted(found.items(), key=lambda item: item[1].cost))


@dataclass
class ModelShape:
    params: int  # every parameter, tied weights counted once
    linear_params: int  # weights of the decoder's linear layers (what LoRA/quantisation touch)
    lora_params_per_rank: int  # sum of (in + out) over the adapted layers: LoRA adds r x this
    lora_outputs: int  # sum of out over them: DoRA's magnitude vectors
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv_hidden: int
    head_params: int = 0  # the LM head's weight, when it is not tied to the embeddings
    largest_module_params: int = 0  # what ZeRO-3 gathers at once while loading


@dataclass
class Estimate:
    parallelism: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    runtime: int
    offloaded: int  # bytes moved to host memory (not in the total)
    load_peak: int = 0  # on the device while the weights load (ZeRO-3: shard + one module)
    gathered: int = 0  # ZeRO-3, FSDP2: the modules gathered whole around the one computing

    @property
    def training(self) -> int:
        return (self.weights + self.gathered + self.gradients + self.optimizer
                + self.activations + self.runtime)

    @property
    def total(self) -> int:
        """What the device must hold: training, or loading where that needs more."""
        return max(self.training, self.load_peak + self.runtime)


def model_shape(cfg: Config) -> ModelShape:
    """Count parameters on the meta device: the architecture without any weights."""
    hf_config = _hf_config(cfg.model, AutoConfig)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    head = model.get_output_embeddings()
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", heads) or heads
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    return ModelShape(
        head_params=0 if head is None or tied else head.weight.numel(),
        largest_module_params=max(sum(p.numel() for p in m.parameters(recurse=False))
                                  for m in model.modules()),
        params=sum(p.numel() for p in model.parameters()),
        linear_params=sum(m.weight.numel() for m in linear),
        **dict(zip(("lora_params_per_rank", "lora_outputs"), lora_width(model, cfg, linear))),
        hidden=text.hidden_size, intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        layers=text.num_hidden_layers, vocab=text.vocab_size,
        kv_hidden=text.hidden_size // heads * kv,
    )


def lora_width(model, cfg: Config, linear: list) -> tuple[int, int]:
    """(sum of in + out, sum of out) over the layers a LoRA-family method adapts: its
    target_modules resolved as training resolves them (dtune/families.py), a fused MoE expert
    weight [experts, out, in] counting experts x (in + out). Other methods: every linear."""
    if "r" not in METHODS[cfg.method.name].fields:
        return sum(m.in_features + m.out_features for m in linear), 0
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    modules, experts = resolve_targets(model, cfg.method.target_modules, PEFT,
                                       with_experts=cfg.method.name != "dora")
    if modules is None:  # "default": peft's names for the architecture
        modules = PEFT[model.config.model_type]
    width, outputs = 0, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(
                name == t or name.endswith(f".{t}") for t in modules):
            width += module.in_features + module.out_features
            outputs += module.out_features
    for name, param in model.named_parameters():
        if any(name.endswith(f".{t}") for t in experts or ()):
            width += param.shape[0] * (param.shape[1] + param.shape[2])
    return width, outputs


def _hf_config(model_cfg: ModelConfig, auto_config):
    """The model's config: built for random-init models, else config.json from a local
    folder, an earlier GGUF conversion, or the hub (which sends that one small file)."""
    if model_cfg.random_init is not None:
        return random_model_config(model_cfg.random_init)
    source, options = model_cfg.name_or_path, {}
    converted = None if Path(source).expanduser().exists() else cached_conversion(model_cfg)
    if converted is not None:
        source = str(converted)
    elif not Path(source).expanduser().exists() and not hub_reachable():
        gguf = offline_gguf(model_cfg)  # no conversion yet: the GGUF file's own header
        if gguf is not None:
            source, options = str(gguf.parent), {"gguf_file": gguf.name}
    try:
        return auto_config.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code,
                                           **options)
    except (OSError, ValueError) as exc:
        raise DtuneError(f"dtune plan could not read the config of model.name_or_path="
                         f"{model_cfg.name_or_path!r}: {str(exc).splitlines()[0]}") from None


def offline_gguf(model_cfg: ModelConfig) -> Path | None:
    """The model group's GGUF file, where it holds this model and its package is installed."""
    gguf = model_cfg.gguf
    if gguf is None or not gguf.package or (gguf.holds and gguf.holds != model_cfg.name_or_path):
        return None
    path = gguf_file(gguf)
    return path if path is not None and path.is_file() else None


def estimate(cfg: Config, shape: ModelShape, layout: Layout, world_size: int,
             on_gpu: bool) -> Estimate:
    spec, precision = METHODS[cfg.method.name], cfg.precision.name
    engine = ENGINES[layout.engine]
    zero, offload = layout.sharding, layout.offload
    w = world_size if layout.name != "single" else 1
    # DeepSpeed's 16-bit modes keep the module itself in 16 bits, fp32 masters in the optimizer
    deepspeed_16bit = engine.sixteen_bit_module and precision in ("bf16", "fp16")
    trainable = trainable_params(cfg, shape)
    weights, loaded, gathered = weight_bytes(cfg, shape, trainable, deepspeed_16bit), 0, 0
    if objective_spec(cfg.objective).reference and resolve_reference(
            cfg.objective, spec.adapter, cfg.data.streaming)[0] == "frozen_copy":
        weights *= 2  # full fine-tuning only (compose refuses it for adapters and ZeRO-3)
    # a module gathered whole: in 16 bits under bf16/fp16 (DeepSpeed's module, FSDP2's policy)
    gathered_bytes = 2 if precision in ("bf16", "fp16", "bf16_pure") else 4
    module = shape.largest_module_params * gathered_bytes
    if zero == 3:  # this rank's shard, plus about two modules gathered at once in training
        whole, weights = weights, weights / w
        gathered = 2 * module
        # ZeRO-3 partitions as it loads (one module gathered); FSDP2 loads whole on the host
        # and shards one layer at a time onto the GPU
        loaded = weights + module if engine.partitions_while_loading(layout.parallelism) \
            or on_gpu else whole
    grad_bytes = 2 if precision == "bf16_pure" else 4  # DeepSpeed accumulates them in fp32
    gradients = trainable * grad_bytes / (w if zero >= 2 else 1)
    if engine.accumulates_unsharded and cfg.train.grad_accum_steps > 1:
        # FSDP2 reduces once per window: until then each rank holds whole gradients, in the
        # gathered weights' dtype, beside its fp32 shard of them
        gradients += trainable * gathered_bytes
    state_bytes = 4 if precision != "bf16_pure" else 2
    optimizer = trainable * (2 * state_bytes + (4 if deepspeed_16bit else 0)) \
        / (w if zero >= 1 else 1)
    offloaded = 0
    if offload:
        offloaded, optimizer = optimizer, 0
        if zero == 3:  # the parameters live on the host too, gathered as they are needed
            offloaded, weights = offloaded + weights, 0
    activations = activation_bytes(cfg, shape, shards_parameters(layout.parallelism),
                                   engine.autocast, on_gpu)
    work = weights + gathered + gradients + optimizer + activations
    # On a GPU: the CUDA context, NCCL's buffers and allocator fragmentation, outside what
    # training itself allocates (about 2 GiB, plus a tenth)
    runtime = int(2 * GIB + 0.1 * work) if on_gpu else CPU_RUNTIME_BYTES
    return Estimate(layout.name, int(weights), int(gradients), int(optimizer),
                    int(activations), runtime, int(offloaded), int(loaded), int(gathered))


def trainable_params(cfg: Config, shape: ModelShape) -> int:
    spec = METHODS[cfg.method.name]
    if not spec.adapter:
        return shape.params
    if "r" in spec.fields:  # the LoRA family: r x (in + out) per adapted layer
        magnitude = shape.lora_outputs if cfg.method.name == "dora" else 0
        return cfg.method.r * shape.lora_params_per_rank + magnitude
    return shape.hidden * shape.layers * 3  # ia3, soft prompts: small


def weight_bytes(cfg: Config, shape: ModelShape, trainable: int, deepspeed_16bit: bool) -> int:
    """What the weights hold on one device before any sharding: what trains in fp32 (16 bits
    in DeepSpeed's modes) and a frozen base in its load dtype (dtune/precision.py: the compute
    dtype under bf16/fp16, quantized linear layers in 4 or 8 bits)."""
    spec, precision = METHODS[cfg.method.name], cfg.precision.name
    sixteen = precision == "bf16_pure" or deepspeed_16bit
    if not spec.adapter:
        return shape.params * (2 if sixteen else 4)
    other = shape.params - shape.linear_params
    frozen_bytes = 2 if sixteen or precision in ("bf16", "fp16") else 4
    if spec.quantized_bits == 4:  # + ~1.6% quantisation constants; the rest loads in fp32
        frozen = other * 4 + shape.linear_params * 0.516
    elif spec.quantized_bits == 8:
        frozen = other * 4 + shape.linear_params * 1.02
    else:
        frozen = shape.params * frozen_bytes
    return int(frozen + trainable * (2 if deepspeed_16bit else 4))


def activation_bytes(cfg: Config, shape: ModelShape, sharded_parameters: bool,
                     autocast: bool, on_gpu: bool = True) -> int:
    """What backward keeps per token and layer, the logits, and autocast's copies: torch
    autocast holds a 16-bit copy of every fp32 weight a matmul reads until backward."""
    precision, spec, t = cfg.precision.name, METHODS[cfg.method.name], cfg.train
    pairs = objective_spec(cfg.objective).pairs
    # this rank's shard of each row (dtune/sequence_parallel.py)
    length = -(-cfg.data.max_seq_len // cfg.parallelism.sequence_parallel)
    tokens = t.micro_batch_size * (2 if pairs else 1) * length
    act_bytes = 2 if precision in ("bf16", "fp16", "bf16_pure") else 4
    mlp = shape.hidden if t.mlp_tiles > 1 else 4 * shape.intermediate
    per_token_layer = 7 * shape.hidden + mlp + 2 * shape.kv_hidden
    # one tile's intermediates exist at a time, in forward and again in backward
    tile = 4 * shape.intermediate / t.mlp_tiles if t.mlp_tiles > 1 else 0
    kept = shape.layers * (shape.hidden if t.gradient_checkpointing else per_token_layer)
    if t.offload_activations and on_gpu:
        kept = 0  # in host memory until backward asks for them, one layer's at a time
    rebuilt = per_token_layer if t.gradient_checkpointing or kept == 0 else 0
    layers = kept + rebuilt + tile
    # pairs: at most every position
    chunk = 0 if pairs else loss_chunk_size(cfg.train, sharded_parameters)
    logit_rows = min(chunk, tokens) if chunk else tokens
    # fp32 logits, their softmax/gradient, and the model-dtype logits the head returns
    logits = logit_rows * shape.vocab * (8 + act_bytes)
    autocast = (shape.linear_params + shape.head_params) * 2 \
        if precision in ("bf16", "fp16") and not spec.adapter and autocast else 0
    return int(tokens * layers * act_bytes + logits + autocast)


def plan(cfg: Config, world_size: int, on_gpu: bool, shape: ModelShape | None = None
         ) -> list[Estimate]:
    shape = shape or model_shape(cfg)
    options = [layout for layout in layouts().values()
               if (layout.name == "single") == (world_size == 1)
               or (world_size == 1 and layout.offload)]  # offload helps one device too
    options = [layout for layout in options if accepted(cfg, layout)]
    return [estimate(cfg, shape, layout, world_size, on_gpu) for layout in options]


def accepted(cfg: Config, layout: Layout) -> bool:
    """Whether the config check takes `cfg` under `layout`: its engine against the method
    (QLoRA under ZeRO or FSDP2, soft prompts under FSDP2), the precision and the objective.
    What it refuses is neither planned nor chosen."""
    try:
        check_combination(replace(cfg, parallelism=layout.parallelism))
    except DtuneError:
        return False
    return True


def smaller_method(method: str | None) -> str:
    """A method that holds less than `method`, as the end of a suggestion ("" for none)."""
    if method in (None, "full"):
        return ", use +method=lora (or +method=qlora)"
    if METHODS[method].quantized_bits == 4:
        return ""
    return ", use +method=qlora (a 4-bit base)"


def choose(estimates: list[Estimate], device_bytes: int,
           method: str | None = None) -> tuple[Estimate, str]:
    """The cheapest option that fits, and why: "<option>, the cheapest option that fits
    (...)"."""
    fitting = [e for e in estimates if e.total <= device_bytes]
    if not fitting:
        smallest = min(estimates, key=lambda e: e.total)
        raise DtuneError(
            f"parallelism=auto: no option fits in {device_bytes / GIB:.1f} GiB per device; the "
            f"smallest, {smallest.parallelism}, needs about {smallest.total / GIB:.1f} GiB. "
            "Lower train.micro_batch_size or data.max_seq_len, set "
            f"train.gradient_checkpointing=true{smaller_method(method)}, or give it more or "
            "larger devices.")
    cost = {name: layout.cost for name, layout in layouts().items()}
    best = min(fitting, key=lambda e: cost[e.parallelism])
    skipped = [e for e in estimates if cost[e.parallelism] < cost[best.parallelism]]
    why = f"{best.parallelism}, the cheapest option that fits " \
          f"({best.total / GIB:.2f} of {device_bytes / GIB:.1f} GiB per device)"
    if skipped:
        why += "; " + ", ".join(f"{e.parallelism} needs {e.total / GIB:.2f} GiB"
                                for e in skipped)
    return best, why


def device_memory_bytes() -> tuple[int, bool]:
    """(memory of one device, whether it is a GPU): GPU 0's total, else the host's RAM."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, True
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), False


def table(estimates: list[Estimate], device_bytes: int | None) -> str:
    header = "| parallelism | weights | gathered (ZeRO-3, FSDP2) | gradients | optimizer " \
             "| activations | runtime | loading | total per device | offloaded to host | fits |"
    lines = [header, "|" + "---|" * 11]
    for e in estimates:
        fits = "-" if device_bytes is None else ("yes" if e.total <= device_bytes else "no")
        lines.append("| " + " | ".join([e.parallelism] + [
            f"{v / GIB:.2f} GiB" for v in (e.weights, e.gathered, e.gradients, e.optimizer,
                                           e.activations, e.runtime, e.load_peak, e.total,
                                           e.offloaded)]
            + [fits]) + " |")
    return "\n".join(lines)


# The switches for long context, each alone over the config: (what `dtune plan` calls it, the
# train or parallelism fields it sets). Sequence parallelism is added for the world size.
CONTEXT_SWITCHES = (("gradient_checkpointing", {"train.gradient_checkpointing": True}),
                    ("mlp_tiles=8", {"train.mlp_tiles": 8}),
                    ("offload_activations", {"train.offload_activations": True}))


def with_settings(cfg: Config, settings: dict) -> Config:
    """A copy of (a settled) `cfg` with dotted `settings` changed, for planning only."""
    sections = {}
    for key, value in settings.items():
        section, field = key.split(".")
        sections[section] = replace(sections.get(section, getattr(cfg, section)),
                                    **{field: value})
    return replace(cfg, **sections)


def longest_context(cfg: Config, shape: ModelShape, layout: Layout, world_size: int,
                    on_gpu: bool, device_bytes: int, step: int = 256) -> int:
    """The longest data.max_seq_len (a multiple of `step`) whose estimate fits
    `device_bytes` under `layout`; 0 if not even `step` does."""
    def fits(length: int) -> bool:
        planned = with_settings(cfg, {"data.max_seq_len": length})
        return estimate(planned, shape, layout, world_size, on_gpu).total <= device_bytes

    low, high = 0, step
    while fits(high):  # memory grows with length: double until it no longer fits
        low, high = high, 2 * high
        if high > 1 << 26:
            return low
    while high - low > step:
        middle = (low + high) // 2 // step * step
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def context_table(cfg: Config, shape: ModelShape, estimates: list[Estimate], world_size: int,
                  on_gpu: bool, device_bytes: int) -> str:
    """For each layout, the longest data.max_seq_len that fits as configured, and with each
    long-context switch alone (and the sequence split over every rank)."""
    switches = [(name, settings) for name, settings in CONTEXT_SWITCHES
                if not all(getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) == v
                           for k, v in settings.items())
                and (on_gpu or name != "offload_activations")]  # a CPU run keeps them
    if world_size > cfg.parallelism.sequence_parallel and \
            world_size % cfg.parallelism.sequence_parallel == 0:
        switches.append((f"sequence_parallel={world_size}",
                         {"parallelism.sequence_parallel": world_size}))
    header = ["parallelism", "as set"] + [f"+ {name}" for name, _ in switches]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    everything = layouts()
    for e in estimates:
        layout = everything[e.parallelism]
        row = [e.parallelism, longest_context(cfg, shape, layout, world_size, on_gpu,
                                              device_bytes)]
        for _, settings in switches:
            row.append(longest_context(with_settings(cfg, settings), shape, layout,
                                       world_size, on_gpu, device_bytes))
        lines.append("| " + " | ".join(f"{v:,}" if isinstance(v, int) else v
                                       for v in row) + " |")
    return "\n".join(lines)


def auto_layout(cfg: Config, world: int, device_bytes: int, on_gpu: bool
                ) -> tuple[Layout, str]:
    """What parallelism=auto becomes for `world` processes on devices of `device_bytes`:
    the cheapest layout that fits, and why (dtune/settle.py applies it)."""
    best, why = choose(plan(cfg, world, on_gpu), device_bytes, cfg.method.name)
    return layouts()[best.parallelism], why
