"""DPO's reference model: where the reference log-probs of each pair come from (and GRPO's,
for its KL term with objective.beta > 0: adapters disabled or a frozen copy, per token).

- `adapter_disabled`: an adapter method's own model with its adapters switched off (peft's
  `disable_adapter`): the starting model, with no second copy in memory.
- `frozen_copy`: a deep copy of the starting weights, in eval mode and without gradients, for
  full fine-tuning (twice the weights' memory). Not under ZeRO-3, whose partitioned weights a
  copy would not be sharded with (see dtune/compose.py).
- `precomputed`: every training pair scored once by the starting model before the first step,
  written atomically into the run directory (`RunDir.reference_logps`, rows keyed by
  example index) with a fingerprint of the data and model, and read back on resume: the least
  memory, one extra forward pass over the data.

`auto` picks one (dtune.objectives.resolve_reference) and the start-up log says which and why.
Each kind is built before a checkpoint is loaded: the reference is the *starting* model, so a
resumed run's reference is the same as the uninterrupted run's.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load, save

from dtune.config import Config
from dtune.distributed import all_reduce_max, barrier
from dtune.errors import DtuneError
from dtune.evaluate import pair_logps
from dtune.files import read_bytes, write_atomically
from dtune.grpo import completion_logps
from dtune.loss import sequence_logps
from dtune.methods import method_spec
from dtune.objectives import objective_spec, resolve_reference
from dtune.run_dir import RunDir
from dtune.run_start import read_run_file, update_run_file

log = logging.getLogger("dtune")

class NoReference:
    """ORPO, SimPO and SFT: no reference log-probs."""

    kind = "none"

    def logps(self, engine, batch: dict, on_device: dict):
        return None


@dataclass
class AdapterDisabled:
    response_head: bool  # see dtune.loss.sequence_logps
    kind = "adapter_disabled"

    def logps(self, engine, batch: dict, on_device: dict) -> torch.Tensor:
        model = engine.module  # not the DDP wrapper: no gradient flows, nothing to reduce
        was_training = model.training
        model.eval()  # as every reference: no dropout, no recomputation for checkpointing
        try:
            with torch.no_grad(), engine.eval_context(), model.disable_adapter():
                return sequence_logps(model, on_device, self.response_head)
        finally:
            model.train(was_training)

    def token_logps(self, engine, inputs: dict, width: int, temperature: float = 1.0
                    ) -> torch.Tensor:
        """GRPO's KL reference: [N, width] log-probs of each completion token."""
        model = engine.module
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), engine.eval_context(), model.disable_adapter():
                return completion_logps(model, inputs, width, temperature)
        finally:
            model.train(was_training)


@dataclass
class FrozenCopy:
    model: torch.nn.Module
    response_head: bool
    kind = "frozen_copy"

    def logps(self, engine, batch: dict, on_device: dict) -> torch.Tensor:
        with torch.no_grad(), engine.eval_context():
            return sequence_logps(self.model, on_device, self.response_head)

    def token_logps(self, engine, inputs: dict, width: int, temperature: float = 1.0
                    ) -> torch.Tensor:
        with torch.no_grad(), engine.eval_context():
            return completion_logps(self.model, inputs, width, temperature)


@dataclass
class Precomputed:
    table: torch.Tensor  # [training pairs, 2]: chosen and rejected log-prob, by example index
    kind = "precomputed"

    def logps(self, engine, batch: dict, on_device: dict) -> torch.Tensor:
        rows = self.table[batch["pair_index"]]  # the host copy's indices: no GPU sync
        return engine.to_device({"ref": torch.cat([rows[:, 0], rows[:, 1]])})["ref"]


def build_reference(cfg: Config, engine, stream, tokenizer, run_dir: RunDir, resuming: bool,
                    response_head: bool = False):
    """The reference the objective needs (NoReference when it needs none), from the engine's
    model as it starts, before any checkpoint is loaded. `response_head`: see
    dtune.loss.sequence_logps."""
    spec = objective_spec(cfg.objective)
    # a continued adapter (model.init_from) is part of the starting model: not to be disabled
    adapter = method_spec(cfg.method).adapter and not cfg.model.continues_adapter
    if spec.online and cfg.objective.beta:  # GRPO's KL term: scored on fresh samples
        kind, why = ("adapter_disabled", "the base with adapters disabled") if adapter else \
            ("frozen_copy", "full fine-tuning: a frozen copy of the starting weights")
        log.info("GRPO's KL reference (objective.beta=%s): %s", cfg.objective.beta, why)
    elif not spec.reference:
        return NoReference()
    else:
        kind, why = resolve_reference(cfg.objective, adapter, cfg.data.streaming)
        log.info("DPO reference: %s (%s)", kind, why)
    if kind == "adapter_disabled":
        return AdapterDisabled(response_head)
    if kind == "frozen_copy":
        frozen = copy.deepcopy(engine.module)  # the policy's dtype and device, its hooks not
        frozen.requires_grad_(False)
        return FrozenCopy(frozen.eval(), response_head)
    return Precomputed(precomputed_table(cfg, engine, stream, tokenizer, run_dir, resuming,
                                         response_head))


def fingerprint(cfg: Config, tokenizer, stream) -> str:
    """What the precomputed log-probs depend on: the starting model (model and method
    settings, precision), the tokenized pairs (data settings, chat template) and their count
    and length. A resumed run checks it before reusing the file."""
    lengths = getattr(stream.examples, "lengths", None)
    facts = {"model": asdict(cfg.model), "method": asdict(cfg.method), "data": asdict(cfg.data),
             "precision": cfg.precision.name, "chat_template": tokenizer.chat_template,
             "pairs": len(stream.examples),
             "tokens": None if lengths is None else int(sum(int(n) for n in lengths))}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def read_table(path: Path) -> tuple[torch.Tensor, str]:
    data = read_bytes(path)  # not through a link planted in its place
    return load(data)["logps"], safetensors_metadata(data).get("fingerprint", "")


def safetensors_metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors file's header (an 8-byte length, then JSON)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__") or {}


def sealed_table(run_dir: RunDir) -> tuple[torch.Tensor, str] | None:
    """The stored table, if its SHA-256 is the one this run recorded when it wrote it (the
    run file): a file altered or damaged since is not used, and is recomputed."""
    path = run_dir.reference_logps
    if not path.exists() and not path.is_symlink():
        return None
    recorded = (read_run_file(run_dir) or {}).get("reference_logps_sha256")
    if recorded != hashlib.sha256(read_bytes(path)).hexdigest():
        log.warning("%s does not match the SHA-256 this run recorded when it wrote it (it was "
                    "altered or damaged since): it is not used, and the reference log-probs "
                    "are computed again from the starting model.", path)
        return None
    return read_table(path)


def precomputed_table(cfg: Config, engine, stream, tokenizer, run_dir: RunDir,
                      resuming: bool, response_head: bool = False) -> torch.Tensor:
    """The run directory's reference log-probs when their fingerprint matches, else one pass
    over every training pair with the starting model, saved atomically."""
    path, key = run_dir.reference_logps, fingerprint(cfg, tokenizer, stream)
    stored = sealed_table(run_dir)
    if stored is not None and stored[1] != key and resuming:
        raise DtuneError(
            f"{path} holds reference log-probs of other training pairs or another starting "
            "model than this resumed run's (the data, model, method or precision settings "
            "changed since it started), so DPO's reference would no longer be the one it "
            f"trained against. Resume with the original settings, or start a new run in "
            "another hydra.run.dir.")
    # Every rank joins the pass when any one lacks the file (a node without the shared disk).
    if not all_reduce_max(float(stored is None or stored[1] != key)):
        log.info("Reference log-probs of %d pairs read from %s", len(stored[0]), path)
        return stored[0]
    started = time.perf_counter()
    table = pair_logps(engine, stream, response_head).float()
    if torch.isnan(table).any():
        missing = int(torch.isnan(table[:, 0]).sum())
        raise DtuneError(f"the reference pass scored all but {missing} of {len(table)} training "
                         "pairs; this is a bug in dtune's batch stream, please report it.")
    if engine.ranks.is_main:
        data = save({"logps": table}, metadata={"fingerprint": key})
        write_atomically(path, data)
        update_run_file(run_dir, reference_logps_sha256=hashlib.sha256(data).hexdigest())
    barrier()
    log.info("Reference log-probs of %d pairs precomputed in %.1f s into %s", len(table),
             time.perf_counter() - started, path)
    return table
