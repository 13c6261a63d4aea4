"""From command-line overrides to a validated Config.

Hydra composes conf/ over the schema and refuses what does not fit it; this module only puts
Hydra's and OmegaConf's refusals into words a user can act on, then runs the checks that span
groups (a method with a precision, a parallelism with a method), which read the method specs,
and fills in the defaults that depend on the method.
"""
from __future__ import annotations

import difflib
import importlib.resources
import re
from dataclasses import asdict
from pathlib import Path

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Glob, RangeSweep
from omegaconf import DictConfig, OmegaConf

from dtune.config import (DPO_LOSS_TYPES, GRPO_LOSS_TYPES, Config, MethodConfig,
                          ObjectiveConfig, SettledConfig, check_choice, check_finite_settings)
from dtune.engines import ENGINES, engine_spec, shards_parameters
from dtune.errors import DtuneError
from dtune.methods import METHODS
from dtune.objectives import OBJECTIVES, resolve_reference
from dtune.redaction import mask_text, refuse_secret_overrides, refuse_secret_settings
from dtune.tracking import TRACKERS

SOURCE_CONF = Path(__file__).resolve().parent.parent / "conf"
# The modules `_target_` paths named before dtune's launchers moved into the package.
MOVED_MODULES = {"launchers.": "dtune.launchers."}
# Free-form mappings: their keys are the user's (flags, column names), so Hydra's struct mode,
# which refuses keys the schema lacks, is off beneath them.
OPEN_MAPPINGS = ("data.columns", "launcher.sbatch_extra", "parallelism.deepspeed_overrides",
                 "model.rope_scaling")
# conf/config.yaml carries LoRA's values as the default method; they stay in every composed
# config, so they cannot count as "set by the user" for other methods.
PRIMARY_METHOD_VALUES = {"r", "alpha", "dropout", "target_modules"}


def register_schema() -> None:
    """Make the schema available to conf/config.yaml as `dtune_schema`."""
    schema = OmegaConf.structured(Config)
    for key in OPEN_MAPPINGS:
        OmegaConf.set_struct(OmegaConf.select(schema, key), False)
    ConfigStore.instance().store(name="dtune_schema", node=schema)


def config_dir() -> str:
    """conf/ of the source tree, else the installed dtune.conf package (what `hydra.main`
    and the compose API take)."""
    return str(SOURCE_CONF) if SOURCE_CONF.is_dir() else "pkg://dtune.conf"


def conf_group(group: str) -> dict[str, DictConfig]:
    """The options of a config group, as their YAML files hold them: {name: contents}."""
    if SOURCE_CONF.is_dir():
        files = {p.stem: p.read_text() for p in (SOURCE_CONF / group).glob("*.yaml")}
    else:
        folder = importlib.resources.files("dtune.conf") / group
        files = {p.name.removesuffix(".yaml"): p.read_text() for p in folder.iterdir()
                 if p.name.endswith(".yaml")}
    return {name: OmegaConf.create(text) for name, text in sorted(files.items())}


def compose_config(overrides: list[str]) -> Config:
    """The validated Config that `python -m dtune <overrides>` would run, composed in-process
    (for `dtune plan`, benchmarks and tests)."""
    return to_config(compose_dict(list(overrides)))


def hydra_context():
    """Hydra's compose API over conf/ of the source tree, else the installed dtune.conf."""
    if SOURCE_CONF.is_dir():
        return initialize_config_dir(config_dir=str(SOURCE_CONF), version_base="1.3")
    return initialize_config_module("dtune.conf", version_base="1.3")


def compose_dict(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    register_schema()
    refuse_secret_overrides(overrides)
    try:
        with hydra_context():
            return compose("config", overrides=overrides, return_hydra_config=with_hydra)
    except Exception as exc:  # Hydra and OmegaConf raise many kinds; all become words
        raise explain(exc, overrides, with_hydra) from None


def check_overrides(overrides: list[str]) -> None:
    """Compose as `python -m dtune` will, and refuse in words what Hydra would refuse in its
    own. In a sweep each swept key takes its first value (interval sweeps are left to the
    sweeper); `_target_` paths of modules that moved get their new name."""
    refuse_secret_overrides(overrides)  # before the grammar, whose errors quote the text
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # Hydra's grammar errors are clear enough; pass them through
        raise DtuneError(mask_text(f"could not parse the command-line overrides: {exc}",
                                   overrides)) from None
    plain = []
    for override in parsed:
        value = override.value() if override.is_sweep_override() else None
        if isinstance(value, (ChoiceSweep, RangeSweep, Glob)):
            first = next(iter(override.sweep_string_iterator()), None)
            plain += [f"{override.get_key_element()}={first}"] if first is not None else []
        elif value is None:
            plain.append(override.input_line)
    composed = compose_dict(plain, with_hydra=True)
    for name, callback in (composed.hydra.callbacks or {}).items():
        check_moved(f"hydra.callbacks.{name}._target_", callback.get("_target_", ""))
    check_moved("launcher._target_", composed.launcher._target_)


def check_moved(key: str, target: str) -> None:
    for old, new in MOVED_MODULES.items():
        if target.startswith(old):
            raise DtuneError(
                f"{key}={target!r} names a module path that no longer exists: dtune's launchers "
                f"install as {new.rstrip('.')} now. Write {new + target[len(old):]!r} instead.")


def explain(exc: Exception, overrides: list[str], with_hydra: bool) -> DtuneError:
    """One paragraph for a failed composition: the override, the key, the value, the fix,
    with the value of any secret-looking override masked, wherever Hydra's text echoed it."""
    return DtuneError(mask_text(str(explain_unmasked(exc, overrides, with_hydra)), overrides))


def explain_unmasked(exc: Exception, overrides: list[str], with_hydra: bool) -> DtuneError:
    text = str(exc)
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing:
        group = missing.group(1).rpartition("/")[0]
        options = re.findall(r"^\t(\S+)$", text, re.MULTILINE)
        return DtuneError(
            f"there is no config {missing.group(1)!r} in conf/; the options of {group} are "
            f"{', '.join(options)}. Pick one of them ({group}=OPTION).")
    no_match = re.search(r"Could not override '([^']+)'\. No match in the defaults list", text)
    if no_match:
        group = no_match.group(1)
        chosen = next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{group}=")), "...")
        return DtuneError(
            f"{group}={chosen}: {group} is not in the primary config's defaults list, so it is "
            f"added with a plus: +{group}={chosen}.")
    cause = exc.__cause__ or exc
    key = getattr(cause, "full_key", None)
    line = next((o for o in overrides if key and o.lstrip("+~").split("=", 1)[0] == key), None)
    if key and ("not in" in str(cause) or "is not in struct" in str(cause)):
        return unknown_key(key, line)
    if key and line and "=" in line:
        detail = str(cause).splitlines()[0]
        return DtuneError(
            f"config key {key!r} got the value {line.split('=', 1)[1]!r}, which does not fit its "
            f"type ({detail}). Fix the override {line!r}.")
    return culprit(overrides, with_hydra, text)


def unknown_key(key: str, line: str | None) -> DtuneError:
    *parents, leaf = key.split(".")
    node = OmegaConf.select(OmegaConf.structured(Config), ".".join(parents)) if parents else None
    source = f" (from the override {line!r})" if line else ""
    if not isinstance(node, DictConfig):
        return DtuneError(f"unknown config key {key!r}{source}; Hydra's own keys are listed by "
                          "`python -m dtune --cfg hydra`, and new ones are added with a plus "
                          f"(+{key}=...).")
    valid = list(node.keys())
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" Did you mean {'.'.join(parents + [close[0]])}?" if close else ""
    return DtuneError(f"unknown config key {key!r}{source}.{hint} Valid keys under "
                      f"{'.'.join(parents)}: {', '.join(valid)}.")


def culprit(overrides: list[str], with_hydra: bool, text: str) -> DtuneError:
    """Find the first override that cannot be applied, and say why in the terms of the config
    it lands in (for example a section that this model config leaves null)."""
    with hydra_context():
        before = compose("config", overrides=[])
    for count in range(1, len(overrides) + 1):
        try:
            with hydra_context():
                compose("config", overrides=overrides[:count], return_hydra_config=with_hydra)
                before = compose("config", overrides=overrides[:count])
            continue
        except Exception:
            pass
        line = overrides[count - 1]
        parent = line.lstrip("+~").split("=", 1)[0].rpartition(".")[0]
        if parent and OmegaConf.select(before, parent, default="missing") is None:
            return DtuneError(
                f"the override {line!r} sets a key under {parent}, which is null in this "
                f"config; choose a config that has a {parent} section first (for random-init "
                f"models, model=tiny-llama), then override its keys.")
        return DtuneError(f"the override {line!r} cannot be applied: "
                          f"{' '.join(text.split())[:300]}")
    return DtuneError(f"the configuration could not be composed: {' '.join(text.split())[:300]}")


def to_config(cfg: DictConfig) -> Config:
    """Turn a composed DictConfig into validated dataclasses and run the checks that span
    groups. What depends on the machine, and the method's defaults, are filled in by
    dtune.settle, once, before launch."""
    # NaN and infinity first, named by their full key, before the dataclasses' range checks
    check_finite_settings(OmegaConf.to_container(cfg, resolve=True))
    config: Config = OmegaConf.to_object(cfg)
    refuse_secret_settings(asdict(config))  # a YAML file's free-form mapping, say
    if config.settled != SettledConfig():
        raise DtuneError(
            f"settled={asdict(config.settled)}: the settled section is what dtune records "
            "after settling a config before launch, never a setting; remove settled.* from "
            "the command line or the YAML file.")
    check_combination(config)
    return config


def check_combination(cfg: Config) -> None:
    """Refuse, before anything loads, what cannot work together."""
    method, precision, parallel = cfg.method, cfg.precision.name, cfg.parallelism
    check_registered_names(cfg)
    spec, engine = METHODS[method.name], engine_spec(parallel)
    check_method_fields(method)
    if precision != "auto" and precision not in spec.precisions:  # auto: fp32 or bf16
        why = (" bf16_pure keeps the weights themselves in bf16, which only full fine-tuning "
               "has a use for;" if precision == "bf16_pure" else "")
        raise DtuneError(
            f"precision={precision} does not work with +method={method.name};{why} choose "
            f"precision from {', '.join(spec.precisions)}.")
    if spec.quantized_bits == 4 and precision in ("fp16", "bf16") \
            and method.compute_dtype not in ("auto", precision):
        raise DtuneError(
            f"precision={precision} autocasts to {precision}, but the QLoRA base computes in "
            f"method.compute_dtype={method.compute_dtype}; the two would fight over the "
            f"matmul dtype. Set method.compute_dtype={precision} or precision=fp32.")
    if cfg.model.init_from:
        check_init_from(cfg)
    if engine.shards_state and not spec.zero:
        raise DtuneError(
            f"+method={method.name} with parallelism={parallel.name} is not supported: "
            f"{engine.what.split(':')[0]} would have to shard bitsandbytes' packed quantized "
            "weights, which it cannot do (the quantization state lives on each weight, not in "
            "its shards). A quantized base is small already: use parallelism=ddp, which "
            "replicates it and splits the data.")
    if spec.soft_prompt and not engine.soft_prompts:
        raise DtuneError(
            f"+method={method.name} with parallelism={parallel.name} is not supported: peft "
            "reads the virtual tokens' embeddings outside the model's forward pass while "
            f"generating, where {engine.what.split(':')[0]} holds only this rank's shard of "
            "them. They are a few thousand values: use parallelism=ddp, which replicates them.")
    if not engine.bf16_pure and precision == "bf16_pure":
        raise DtuneError(
            f"precision=bf16_pure with parallelism={parallel.name}: DeepSpeed keeps fp32 master "
            "weights in its bf16 mode; use precision=bf16.")
    if cfg.launcher.nodes > 1 and parallel.name == "single":
        raise DtuneError(
            f"launcher.nodes={cfg.launcher.nodes} runs one task per node, but "
            "parallelism=single trains in one process; choose parallelism=ddp or a ZeRO "
            "stage such as parallelism=zero2.")
    check_sequence_layout(cfg, spec)
    if parallel.sequence_parallel > 1:
        check_sequence_parallel(cfg)
    check_objective(cfg)


def check_registered_names(cfg: Config) -> None:
    """Each name that picks a spec is a key of its registry: the one list of that axis, so a
    spec added there (and its YAML file) is accepted here without a second list to update.
    The engine then checks the parallelism fields it needs."""
    check_choice("method.name", cfg.method.name, list(METHODS))
    check_choice("objective.name", cfg.objective.name, list(OBJECTIVES))
    check_choice("tracker.name", cfg.tracker.name, list(TRACKERS))
    check_choice("parallelism.engine", cfg.parallelism.engine, list(ENGINES))
    engine_spec(cfg.parallelism).check(cfg.parallelism)


def check_sequence_layout(cfg: Config, spec) -> None:
    method = cfg.method
    if spec.soft_prompt and cfg.data.packing:
        raise DtuneError(
            f"data.packing=true does not work with +method={method.name}: its virtual tokens "
            "would sit in front of a whole packed row and be shared by every example in it. "
            "Set data.packing=false.")
    if shards_parameters(cfg.parallelism) and cfg.train.loss_chunk_size:
        raise DtuneError(
            f"train.loss_chunk_size={cfg.train.loss_chunk_size} with parallelism="
            f"{cfg.parallelism.name}: it shards the LM head (ZeRO-3, FSDP2), which the chunked "
            "loss reads outside the model's forward pass. Set train.loss_chunk_size=0.")
    if spec.soft_prompt and cfg.data.max_seq_len <= method.num_virtual_tokens:
        raise DtuneError(
            f"data.max_seq_len={cfg.data.max_seq_len} leaves no room for text next to "
            f"method.num_virtual_tokens={method.num_virtual_tokens} virtual tokens; raise "
            "data.max_seq_len or lower method.num_virtual_tokens.")


def check_sequence_parallel(cfg: Config) -> None:
    """What sequence parallelism (dtune/sequence_parallel.py) does not train, before anything
    loads. Every engine trains split sequences (DDP, ZeRO 1-3, FSDP2: the attention's
    exchange is on activations, whatever holds the weights); the process count is checked once
    the machine is known (dtune/settle.py)."""
    size = cfg.parallelism.sequence_parallel
    setting = f"parallelism.sequence_parallel={size}"
    objective = OBJECTIVES[cfg.objective.name]
    if objective.pairs or objective.online:
        raise DtuneError(
            f"{setting} with objective={cfg.objective.name} is not supported: it scores whole "
            "sequences (a preference pair's, a sampled completion's), and sequence parallelism "
            "splits each sequence over ranks; it trains objective=sft. Use objective=sft, or "
            "set parallelism.sequence_parallel=1.")
    if METHODS[cfg.method.name].soft_prompt:
        raise DtuneError(
            f"{setting} with +method={cfg.method.name} is not supported: its virtual tokens "
            "sit in front of each row, in the first shard alone. Use an adapter method such as "
            "+method=lora, or set parallelism.sequence_parallel=1.")
    if cfg.model.attn_implementation == "eager":
        raise DtuneError(
            f"{setting} with model.attn_implementation=eager is not supported: eager attention "
            "needs a materialized mask of the whole gathered sequence. Set "
            "model.attn_implementation=sdpa (or flash_attention_2 on GPUs).")


def check_method_fields(method: MethodConfig) -> None:
    """Refuse a method field set to something other than its default when the chosen method
    ignores it (`method.init_text` with LoRA, say): it would silently do nothing."""
    defaults = MethodConfig.__dataclass_fields__
    every_field = set().union(*(spec.fields for spec in METHODS.values()))
    for key in sorted(every_field - METHODS[method.name].fields - PRIMARY_METHOD_VALUES):
        if getattr(method, key) != defaults[key].default:
            users = ", ".join(m for m, spec in METHODS.items() if key in spec.fields)
            raise DtuneError(
                f"method.{key}={getattr(method, key)!r} has no effect with method.name="
                f"{method.name}; it applies to {users}. Remove it.")


def check_objective_fields(objective: ObjectiveConfig) -> None:
    """Refuse an objective field set to something other than its default when the chosen
    objective ignores it (`objective.gamma` with DPO, say): it would silently do nothing."""
    defaults = ObjectiveConfig.__dataclass_fields__
    every_field = set().union(*(spec.fields for spec in OBJECTIVES.values()))
    for key in sorted(every_field - OBJECTIVES[objective.name].fields):
        if getattr(objective, key) != defaults[key].default:
            users = ", ".join(o for o, spec in OBJECTIVES.items() if key in spec.fields)
            raise DtuneError(
                f"objective.{key}={getattr(objective, key)!r} has no effect with objective="
                f"{objective.name}; it applies to {users}. Remove it.")


def training_formats(cfg: Config) -> set[str]:
    """The formats of the rows a run trains on: data.format, or each mixture source's."""
    if not cfg.data.sources:
        return {cfg.data.format}
    return {source.format or cfg.data.format for source in cfg.data.sources}


def check_objective(cfg: Config) -> None:
    """An objective with the data, method and layout it trains under."""
    objective, method = cfg.objective, cfg.method
    check_objective_fields(objective)
    spec, formats = OBJECTIVES[objective.name], training_formats(cfg)
    if spec.online:
        check_online(cfg, formats)
        return
    if objective.loss_type not in DPO_LOSS_TYPES and "loss_type" in spec.fields:
        raise DtuneError(
            f"objective.loss_type={objective.loss_type!r} is a GRPO normalisation; with "
            f"objective={objective.name} choose one of {', '.join(DPO_LOSS_TYPES)}.")
    if objective.beta == 0 and "beta" in spec.fields:
        raise DtuneError(f"objective.beta=0.0 is out of range; it must be > 0 with objective="
                         f"{objective.name}.")
    if not spec.pairs:
        if "preference" in formats:
            raise DtuneError(
                "data.format=preference with objective=sft: SFT would train on the rejected "
                "responses as well as the chosen ones. Choose a preference objective "
                "(objective=dpo, objective=orpo or objective=simpo), or train SFT on the "
                "chosen responses as chat rows (data.format=chat).")
        return
    if formats != {"preference"}:
        raise DtuneError(
            f"objective={objective.name} trains on chosen/rejected pairs, but the data is "
            f"data.format={'/'.join(sorted(formats))}. Set data.format=preference, with rows "
            "holding prompt (or messages), chosen and rejected; or use objective=sft.")
    check_scored_layout(cfg, "pairs")
    if objective.loss_type == "ipo" and objective.label_smoothing:
        raise DtuneError(
            f"objective.label_smoothing={objective.label_smoothing} has no effect with "
            "objective.loss_type=ipo: label smoothing (cDPO) is a form of the sigmoid loss. "
            "Remove it, or use objective.loss_type=sigmoid.")
    if spec.reference:
        check_reference(cfg, METHODS[method.name].adapter and not cfg.model.continues_adapter)


def check_init_from(cfg: Config) -> None:
    """`model.init_from`: what it cannot be combined with, before anything loads. (The run
    it names is read when the model loads, dtune.load_run.load_base: the tools that read
    this run later, on another machine perhaps, settle its config too.)"""
    where, method = cfg.model.init_from, cfg.method.name
    if METHODS[method].quantized_bits:
        raise DtuneError(
            f"model.init_from={where} with +method={method} is not supported: the earlier run's "
            "weights would have to be quantized after they are merged, which dtune does not do. "
            "Use +method=lora (or full) to train on from it.")
    if shards_parameters(cfg.parallelism):
        raise DtuneError(
            f"model.init_from={where} with parallelism={cfg.parallelism.name} is not supported: "
            "ZeRO-3 partitions the weights as they load, before an earlier run's adapter could "
            "be merged in. Use parallelism=zero2 or ddp.")
    if cfg.model.continues_adapter and not METHODS[method].adapter:
        raise DtuneError(
            f"model.init_adapter=continue with +method={method}: it trains on the earlier run's "
            "adapter, so this run must train that adapter too (its +method and method.* as the "
            "earlier run set them, e.g. +method=lora). Use model.init_adapter=merge to train "
            f"+method={method} on the merged model.")


def check_online(cfg: Config, formats: set[str]) -> None:
    """GRPO's settings, data and layout (dtune/grpo.py), before anything loads: the rewards
    parsed (a bad name, weight, regex or _target_ refused here), rows with prompts."""
    from dtune.rewards import parse_rewards

    objective, name = cfg.objective, cfg.objective.name
    if objective.loss_type not in GRPO_LOSS_TYPES:
        raise DtuneError(
            f"objective.loss_type={objective.loss_type!r} is a DPO loss; with objective={name} "
            f"choose one of {', '.join(GRPO_LOSS_TYPES)} (how the token losses are averaged; "
            "conf/objective/grpo.yaml sets dapo).")
    if objective.rewards is None:
        raise DtuneError(
            f"objective.rewards is not set: objective={name} learns from rewards named in "
            "config. Use objective=grpo (its YAML names exact_match), or set e.g. "
            "objective.rewards=[{name:exact_match,weight:1.0}].")
    parse_rewards(objective.rewards)
    if not formats <= {"chat", "alpaca"}:
        raise DtuneError(
            f"objective={name} samples completions of prompts, but the data is data.format="
            f"{'/'.join(sorted(formats))}. Use rows with a prompt and a reference answer: "
            "data.format=chat (data=builtin: the user turn is the prompt, the assistant turn "
            "the answer exact_match compares with) or data.format=alpaca.")
    check_scored_layout(cfg, "online")
    if shards_parameters(cfg.parallelism) and objective.beta \
            and not (METHODS[cfg.method.name].adapter and not cfg.model.continues_adapter):
        raise DtuneError(
            f"objective.beta={objective.beta} with +method={cfg.method.name} and parallelism="
            f"{cfg.parallelism.name}: the KL term's reference would be a frozen copy of the "
            "partitioned weights, which dtune does not make. Use objective.beta=0 (no KL term, "
            "as in DAPO and Dr. GRPO), an adapter method (its reference is the model with the "
            "adapters disabled), or parallelism=zero2.")


# What each objective that scores whole sequences puts through the model, and why its loss
# needs the sequences' own logits, for the refusals of check_scored_layout.
SCORED = {
    "pairs": ("be scored in front of each chosen and rejected response",
              "a pair's chosen and rejected responses go through one forward as rows of one "
              "batch, padded",
              "weighs each sequence by a factor known only once both of a pair are scored, so "
              "it comes from the full logits"),
    "online": ("be placed in front of every sampled completion when it is scored",
               "each row's prompt is completed on its own, G times",
               "weighs each token by its advantage and clip, so it comes from the completions' "
               "logits"),
}


def check_scored_layout(cfg: Config, kind: str) -> None:
    """What the objectives that score whole sequences (preference pairs, GRPO's rollouts) do
    not support, before anything loads."""
    name, method = cfg.objective.name, cfg.method.name
    soft_prompt, packing, chunked = SCORED[kind]
    if METHODS[method].soft_prompt:
        raise DtuneError(
            f"+method={method} with objective={name} is not supported: its virtual tokens "
            f"would have to {soft_prompt}, which dtune does not do yet. Use an adapter method "
            "such as +method=lora, or +method=full.")
    if cfg.data.packing:
        raise DtuneError(
            f"data.packing=true with objective={name} is not supported: {packing}. Set "
            "data.packing=false.")
    if cfg.train.loss_chunk_size:
        raise DtuneError(
            f"train.loss_chunk_size={cfg.train.loss_chunk_size} has no effect with objective="
            f"{name}: its loss {chunked}. Remove train.loss_chunk_size.")


def check_reference(cfg: Config, adapter: bool) -> None:
    """DPO's reference (dtune/reference.py) with the method and layout."""
    chosen, _ = resolve_reference(cfg.objective, adapter, cfg.data.streaming)
    method, setting = cfg.method.name, f"objective.reference={cfg.objective.reference}"
    if chosen == "adapter_disabled" and not adapter:
        why = "full fine-tuning has no adapters to disable, so the reference would be the " \
            "policy itself" if not cfg.model.continues_adapter else "model.init_adapter=" \
            "continue trains model.init_from's adapter, which is part of the starting model: " \
            "disabling it would give that run's start as the reference, not this run's"
        raise DtuneError(
            f"{setting} with +method={method}: {why}. Use objective.reference=precomputed "
            "(least memory) or frozen_copy, or auto.")
    if chosen == "frozen_copy" and adapter:
        raise DtuneError(
            f"{setting} with +method={method}: an adapter method's reference is its own base "
            "with the adapters disabled, with no second copy in memory. Use "
            "objective.reference=adapter_disabled (or auto).")
    if chosen == "frozen_copy" and shards_parameters(cfg.parallelism):
        why = " (auto picks it for streamed data, which cannot be precomputed)" \
            if cfg.objective.reference == "auto" else ""
        raise DtuneError(
            f"a frozen reference copy{why} with parallelism={cfg.parallelism.name}: dtune "
            "does not shard a second model where parameters are sharded (ZeRO-3, FSDP2) yet. Use "
            "objective.reference=precomputed (with data.streaming=false), or parallelism=zero2.")
    if chosen == "precomputed" and cfg.data.streaming:
        raise DtuneError(
            f"{setting} with data.streaming=true: a stream has no end to precompute the "
            "reference over before training. Use objective.reference=frozen_copy, or "
            "data.streaming=false.")
