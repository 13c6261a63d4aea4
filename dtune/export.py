"""`dtune export --gguf`: a run's merged model as one GGUF file, the format llama.cpp, Ollama
and LM Studio read: the weights (f16 or q8_0), the tokenizer (vocabulary, merges, special ids)
and the chat template, written through the gguf package's GGUFWriter, with its tensor-name
maps and its Q8_0 quantizer.

What is written is what transformers' GGUF loader reads back as the same model (the tests
compare logits): the architectures in ARCHITECTURES, and byte-level BPE tokenizers whose
pre-tokenizer has a llama.cpp name (PRE_TOKENIZERS). Anything else is refused before a weight
loads, since a file that loads but computes or tokenizes differently fails silently.
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

from dtune.config import Config
from dtune.errors import DtuneError, excerpt
from dtune.files import output_file
from dtune.load_run import load_run_config, trained_weights
from dtune.logs import quiet_libraries
from dtune.merge import check_standalone, load_merged
from dtune.methods import METHODS
from dtune.models import base_config_and_tokenizer
from dtune.run_dir import RunDir, check_output_target

log = logging.getLogger("dtune")


@dataclass(frozen=True)
class GgufArchitecture:
    arch: gguf.MODEL_ARCH
    # llama.cpp's llama graph rotates interleaved pairs of each head's dimensions, where
    # transformers rotates its two halves: the q and k rows are permuted to match (and
    # transformers' GGUF loader permutes them back). Qwen2's graph rotates halves, as HF does.
    interleaved_rotary: bool


# transformers model_type -> how its GGUF is written. Mistral is llama.cpp's llama graph (as
# llama.cpp's own converter writes it), which has no sliding window.
ARCHITECTURES = {
    "llama": GgufArchitecture(gguf.MODEL_ARCH.LLAMA, interleaved_rotary=True),
    "mistral": GgufArchitecture(gguf.MODEL_ARCH.LLAMA, interleaved_rotary=True),
    "qwen2": GgufArchitecture(gguf.MODEL_ARCH.QWEN2, interleaved_rotary=False),
}
# --quant: (the file type llama.cpp reads, the type of 2-D weights); 1-D tensors (norms,
# biases) stay F32, as llama.cpp's converter keeps them.
QUANTS = {"f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
          "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0)}
# Byte-level BPE pre-tokenizers (as tokenizer.json spells them) -> llama.cpp's name, which
# tells llama.cpp (and transformers' GGUF loader) how to split text before the merges
# (transformers' loader splits "smollm" as "gpt-2": digits are split by llama.cpp alone). A
# normalizer other than NFC is refused; NFC (Qwen2's) has no GGUF field and is left out, which
# changes only text that is not already in NFC.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {("byte-level",): "gpt-2", ("digits", "byte-level"): "smollm",
                  (LLAMA3_SPLIT,): "llama-bpe", (QWEN2_SPLIT,): "qwen2"}
MARKER = "dtune.output"  # metadata key: {"written_by": "dtune", "kind": "gguf", provenance}


def export_gguf(run_dir: Path, out: Path | None = None, quant: str = "f16",
                checkpoint: str | None = None, force: bool = False,
                trust_remote_code: bool = False) -> Path:
    """Write the run's merged model (final/, or the sealed checkpoint `checkpoint`) as one GGUF
    file; return its path. Everything that can be refused is, before a weight loads; the file
    appears whole, and replaces only a GGUF dtune wrote unless `force`."""
    quiet_libraries()
    run = RunDir(run_dir)
    cfg = load_run_config(run.path, trust_remote_code)
    check_standalone(run, METHODS[cfg.method.name], "export")
    folder = trained_weights(run, cfg, checkpoint)
    out = Path(out) if out else run.gguf_file(quant, checkpoint)
    check_output_target(out, "gguf", force, [run.path], option="--gguf",
                        file_kind_of=gguf_output_kind, suggestion=run.gguf_file(quant, checkpoint))
    config, tokenizer = base_config_and_tokenizer(cfg.model, cfg.data.chat_template)
    architecture = check_architecture(config, cfg)
    pre_tokenizer_name(tokenizer)  # refused now, not after the weights load
    model, tokenizer = load_merged(run, cfg, folder)
    provenance = {"run_dir": str(run.path.resolve()), "base": cfg.model.name_or_path,
                  "revision": cfg.model.revision, "method": cfg.method.name,
                  "checkpoint": checkpoint, "quant": quant}
    print(f"Writing {out} ({quant}) ...", file=sys.stderr, flush=True)
    with output_file(out, "gguf", gguf_output_kind, force, "--gguf") as building:
        write_gguf(model, tokenizer, building, quant, architecture, provenance)
    return out


def check_architecture(config, cfg: Config | None = None) -> GgufArchitecture:
    """How a model of this transformers config is written; anything this writer cannot carry
    faithfully is refused, naming what it supports."""
    name = cfg.model.name_or_path if cfg is not None else config.model_type
    supported = ", ".join(sorted(ARCHITECTURES))
    instead = ("Write a Hugging Face folder with `dtune merge` and convert that with llama.cpp's "
               "convert_hf_to_gguf.py instead.")
    if config.model_type not in ARCHITECTURES:
        raise DtuneError(
            f"dtune export --gguf writes {supported} models (the families that llama.cpp and "
            f"transformers' GGUF loader both read back as the same model), and {name} is a "
            f"{config.model_type!r} model. {instead}")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise DtuneError(
            f"{name} scales its rotary embeddings (rope_type {rope['rope_type']!r}), which "
            f"dtune's GGUF writer does not carry yet: the file would compute other positions "
            f"than the model. {instead}")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and \
            window < config.max_position_embeddings:
        log.warning("%s attends within a sliding window of %d tokens, and llama.cpp's graph for "
                    "it attends to the whole context (as for any Mistral GGUF): its answers "
                    "match the model's up to %d tokens of context.", name, window, window)
    return ARCHITECTURES[config.model_type]


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for how the tokenizer splits text (tokenizer.ggml.pre); a tokenizer
    that is not byte-level BPE, or splits text in a way without a name, is refused."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) \
        if hasattr(tokenizer, "backend_tokenizer") else {}
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    byte_level = model.get("type") == "BPE" and not model.get("byte_fallback") and \
        decoder.get("type") == "ByteLevel"
    normalizer = (spec.get("normalizer") or {}).get("type")
    shape = pre_tokenizer_shape(spec.get("pre_tokenizer") or {})
    if byte_level and normalizer in (None, "NFC") and shape in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[shape]
    found = "not byte-level BPE" if not byte_level else \
        f"normalizer {normalizer!r}, pre-tokenizer {excerpt(spec.get('pre_tokenizer'), 160)}"
    raise DtuneError(
        f"dtune export --gguf writes byte-level BPE tokenizers that split text as GPT-2, "
        f"SmolLM, Llama 3 or Qwen2 do, and this run's tokenizer is {found}. A GGUF that split "
        "text otherwise would feed the model other tokens than it was trained on. Write a "
        "Hugging Face folder with `dtune merge` and convert that with llama.cpp's "
        "convert_hf_to_gguf.py instead.")


def pre_tokenizer_shape(pre: dict) -> tuple | None:
    """The pre-tokenizer as PRE_TOKENIZERS keys it: its steps, each "byte-level" (GPT-2's
    own split), "digits" (each digit alone) or a Split's regex."""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space"):
            if step.get("use_regex", True):
                shape.append("byte-level")
        elif kind == "Digits" and step.get("individual_digits"):
            shape.append("digits")
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            shape.append((step.get("pattern") or {}).get("Regex"))
        else:
            return None
    return tuple(shape)


def write_gguf(model, tokenizer, path: Path, quant: str, architecture: GgufArchitecture,
               provenance: dict | None = None) -> None:
    """Write `model` (a plain transformers model, adapters merged) and `tokenizer` to `path`.
    The tensors stream: each is converted while being written, so the file costs one
    tensor's memory beyond the model's."""
    config, provenance = model.config, provenance or {}
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[architecture.arch])
    writer.add_name(str(provenance.get("base") or config.name_or_path).rstrip("/")
                    .split("/")[-1] or config.model_type)
    add_hyperparameters(writer, config, quant)
    add_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0])
    writer.add_string(MARKER, json.dumps({"written_by": "dtune", "kind": "gguf", **provenance}))
    tensors = tensor_plan(model, architecture, quant)
    for name, tensor, qtype in tensors:
        shape = gguf.quant_shape_to_byte_shape(tensor.shape, qtype)
        writer.add_tensor_info(name, shape, np.dtype(np.uint8), int(np.prod(shape)),
                               raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    heads = (config.num_attention_heads, kv_heads(config))
    for name, tensor, qtype in tensors:
        writer.write_tensor_data(gguf_data(name, tensor, qtype, architecture, heads))
    writer.close()


def add_hyperparameters(writer, config, quant: str) -> None:
    """The shape of the model, under the keys llama.cpp's llama and qwen2 graphs read."""
    head_dim = getattr(config, "head_dim", None) or \
        config.hidden_size // config.num_attention_heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(kv_heads(config))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(QUANTS[quant][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def add_tokenizer(writer, tokenizer, rows: int) -> None:
    """The vocabulary (one entry per embedding row: ids the tokenizer lacks become unused
    [PADn] entries, as llama.cpp's converter pads them), each token's type (special added
    tokens are control tokens, matched whole), the merges, special ids, whether BOS/EOS are
    added, and the chat template (the gguf package's SpecialVocab reads the last four)."""
    if len(tokenizer) > rows:
        raise DtuneError(
            f"the tokenizer has {len(tokenizer)} tokens and the model's embeddings only {rows} "
            "rows: ids past the embeddings would crash any runtime. The run's tokenizer and "
            "model do not belong together.")
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    added = tokenizer.added_tokens_decoder
    kinds = [gguf.TokenType.NORMAL if i not in added else gguf.TokenType.CONTROL
             if added[i].special else gguf.TokenType.USER_DEFINED for i in range(len(tokens))]
    for i, token in enumerate(tokens):
        if token is None:  # a hole in the tokenizer's ids
            tokens[i], kinds[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    pad = range(len(tokens), rows)
    writer.add_tokenizer_model("gpt2")  # byte-level BPE, in llama.cpp's words
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in pad])
    writer.add_token_types(kinds + [gguf.TokenType.UNUSED] * len(pad))
    with tempfile.TemporaryDirectory(prefix="dtune-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=rows)
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    marked = tokenizer("a")["input_ids"]
    special.add_special_token.update(
        bos=len(marked) > len(plain) and marked[0] == tokenizer.bos_token_id,
        eos=len(marked) > len(plain) and marked[-1] == tokenizer.eos_token_id)
    special.add_to_gguf(writer, quiet=True)


def tensor_plan(model, architecture: GgufArchitecture, quant: str) -> list:
    """(GGUF name, tensor, GGML type) for every weight, in the file's order. An output head
    that shares the embeddings' storage is left out: llama.cpp (and transformers' loader)
    then use the embeddings, as the model does."""
    names = gguf.get_tensor_name_map(architecture.arch, model.config.num_hidden_layers)
    tied = model.get_output_embeddings().weight.data_ptr() == \
        model.get_input_embeddings().weight.data_ptr()
    plan = []
    for key, tensor in model.state_dict().items():
        if tied and key.startswith("lm_head."):
            continue
        stem, suffix = key.rsplit(".", 1)
        name = names.get_name(stem)
        if name is None:
            raise DtuneError(
                f"the gguf package (version {gguf_version()}) has no GGUF name for the "
                f"weight {key} of this {model.config.model_type} model, so the file would lack "
                "it. Update the gguf package (pip install -U gguf), or write a Hugging Face "
                "folder with dtune merge.")
        plan.append((f"{name}.{suffix}", tensor, tensor_type(tensor, quant)))
    return plan


def tensor_type(tensor: torch.Tensor, quant: str) -> gguf.GGMLQuantizationType:
    """F32 for 1-D tensors; the --quant type for weights, F16 where a row does not split into
    whole Q8_0 blocks of 32 (as llama.cpp's converter falls back)."""
    qtype = QUANTS[quant][1]
    if tensor.dim() < 2:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if tensor.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def gguf_data(name: str, tensor: torch.Tensor, qtype, architecture: GgufArchitecture,
              heads: tuple[int, int]) -> np.ndarray:
    """One tensor as the file stores it: q/k rows permuted for an interleaved-rotary graph,
    then cast or quantized (as bytes, the layout add_tensor_info was given)."""
    values = tensor.detach().to("cpu", torch.float32)
    if architecture.interleaved_rotary and (".attn_q." in name or ".attn_k." in name):
        values = interleave_rotary_halves(values, heads[0] if ".attn_q." in name else heads[1])
    if not torch.isfinite(values).all():
        raise DtuneError(f"the weight {name} holds NaN or infinite values; the model is broken, "
                         "and a GGUF of it would be too. Export an earlier checkpoint.")
    array = np.ascontiguousarray(values.numpy())
    if qtype == gguf.GGMLQuantizationType.F32:
        return array.view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.F16:
        if np.abs(array).max(initial=0) > np.finfo(np.float16).max:
            raise DtuneError(
                f"the weight {name} holds values beyond float16's range (±65504), which "
                "--quant f16 would turn into infinities. Use --quant q8_0, whose blocks scale.")
        return array.astype(np.float16).view(np.uint8)
    return gguf.quants.quantize(array, qtype)


def interleave_rotary_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's output rows from transformers' rotary layout (the first half of
    the head's dimensions paired with the second) to llama.cpp's (neighbours paired): row
    (h, part, i) moves to (h, i, part)."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]) \
        .transpose(1, 2).reshape(shape)


def gguf_output_kind(path: Path) -> str | None:
    """The kind in the dtune marker of a GGUF file (its metadata), None for any file that is
    not a GGUF dtune wrote. Reads the header only (the file is memory-mapped)."""
    try:
        field = gguf.GGUFReader(path).get_field(MARKER)
        marker = json.loads(field.contents()) if field is not None else None
    except Exception:  # not a GGUF, a torn one, another format: not dtune's, whatever it is
        return None
    if isinstance(marker, dict) and marker.get("written_by") == "dtune":
        kind = marker.get("kind")
        return kind if isinstance(kind, str) else None
    return None


def gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")
