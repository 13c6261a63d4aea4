"""PyTorch's own sharding, FSDP2 (`torch.distributed.fsdp.fully_shard`): each rank keeps a
shard of every parameter, gradient and optimizer moment, and gathers one decoder layer's
weights at a time for its forward and backward.

The model loads whole on the host of every rank (in its load dtype, on no device: see
`sharded_loading`), the method adapts it there, and `create` shards it: each decoder layer,
then the root. fully_shard moves each parameter's shard to this process's device, so a GPU
never holds more than the largest layer whole. (A meta-device start with the weights
broadcast from rank 0 would spare the host memory too; host RAM, not the GPU, is what this
layout costs: one whole model per rank while it loads.)

Checkpoints go through `torch.distributed.checkpoint`: each rank writes its shards, and a
load reads whatever shards the new ranks need, so a run resumes on any number of processes.
Only tensors are written there: DCP unpickles any other value (and its metadata file) with
plain pickle, so its metadata is read here through an unpickler that rebuilds nothing but
DCP's own records (`SafeReader`). Between ranks, DCP agrees on its save and load plans
through torch's object collectives, which pickle: like every multi-node run (README,
"Launching"), an FSDP2 run across machines trusts the cluster's network.
"""
from __future__ import annotations

import contextlib
import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy,
                                    fully_shard)
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor

from dtune.checkpoint import save_final
from dtune.config import Config
from dtune.distributed import Ranks
from dtune.engines.base import (StepResult, StepStatus, adamw, compile_layers, decoder_layers,
                                lr_lambda, move_batch, param_groups, process_device)
from dtune.errors import DtuneError
from dtune.files import refuse_symlink
from dtune.methods import method_spec
from dtune.precision import AUTOCAST, read_together

DCP_FOLDER = "dcp"  # inside a checkpoint folder: one file per rank, and DCP's metadata


@dataclass
class FSDP2Engine:
    model: torch.nn.Module  # the model itself: fully_shard works in place
    module: torch.nn.Module
    root: Any  # the outermost FSDP module: the transformers model (under PEFT's wrapper)
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ranks: Ranks
    max_norm: float
    adapter: bool  # checkpoints and final/ hold what trains alone: the base is the model's
    scaler: Optional[ShardedGradScaler] = None  # fp16
    synced_forward: bool = True  # every rank gathers each layer: every rank joins each forward

    @classmethod
    def create(cls, cfg: Config, model, ranks: Ranks, total_steps: int) -> "FSDP2Engine":
        device = process_device(ranks)
        mesh = init_device_mesh(device.type, (ranks.world_size,))
        precision = cfg.precision.name
        if precision == "bf16_pure":
            model.to(torch.bfloat16)  # cast before it moves: bf16 weights, gradients, moments
        options: dict = {"mesh": mesh}
        if precision in AUTOCAST:  # weights gathered in the compute dtype, reduced in fp32
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=AUTOCAST[precision],
                                                        reduce_dtype=torch.float32)
        if cfg.parallelism.offload:  # shards and the optimizer step live in host memory
            options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        if cfg.train.compile:
            compile_layers(model)
        for layer in decoder_layers(model):
            fully_shard(layer, **options)
        # The root holds the embeddings, the final norm and the LM head. Under PEFT it is the
        # transformers model inside the wrapper, not the wrapper: generate() calls that model
        # directly, and its root hooks must gather them there too. Every adapter lives inside
        # it (soft prompts, which would not, are refused: EngineSpec.soft_prompts).
        root = model.get_base_model() if hasattr(model, "get_base_model") else model
        fully_shard(root, **options)
        # the optimizer runs where the shards are: on the host when offloaded
        optimizer = adamw(cfg, param_groups(model, cfg.train.weight_decay),
                          torch.device("cpu") if cfg.parallelism.offload else device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
        scaler = None
        if precision == "fp16":  # its found-inf flag is agreed across ranks
            scaler = ShardedGradScaler(device.type, init_scale=cfg.precision.init_loss_scale,
                                       growth_interval=cfg.precision.growth_interval)
        return cls(model, model, root, device, optimizer, scheduler, ranks,
                   cfg.train.max_grad_norm or math.inf, method_spec(cfg.method).adapter, scaler)

    def to_device(self, batch: dict) -> dict:
        return move_batch(batch, self.device)

    def forward_context(self, last_in_window: bool):
        # Gradients of a window's earlier micro-batches accumulate unsharded on each rank; the
        # last one's backward reduce-scatters the sum once.
        self.root.set_requires_gradient_sync(last_in_window)  # the root and every layer
        return contextlib.nullcontext()

    def eval_context(self):
        return contextlib.nullcontext()  # the mixed-precision policy casts as it gathers

    def backward(self, loss: torch.Tensor) -> None:
        # FSDP averages gradients over ranks; the loss is this rank's share of a global sum.
        loss = loss * self.ranks.world_size
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, loss: torch.Tensor) -> StepResult:
        """Clip by the norm of the whole gradient (every rank's shards), then step unless
        something was not finite; the norm and the loss are read together, once."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None],
                                             foreach=self.device.type == "cuda")
        if isinstance(norm, DTensor):  # each rank's share of the sum of squares: reduced
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm,
                                             foreach=self.device.type == "cuda")
        norm_value, loss_value = read_together(norm, loss)
        status = StepStatus.APPLIED
        if self.scaler is not None:
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # does nothing when an inf/nan was found
            self.scaler.update()
            if self.scaler.get_scale() < before or not math.isfinite(norm_value):
                status = StepStatus.OVERFLOW
        elif math.isfinite(norm_value) and math.isfinite(loss_value):
            self.optimizer.step()
        else:
            status = StepStatus.NONFINITE
        if status is StepStatus.APPLIED:  # a skipped step moved no weight: the schedule waits
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm_value, status, loss_value)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def loss_scale(self) -> Optional[float]:
        return self.scaler.get_scale() if self.scaler else None

    def state_dicts(self) -> dict:
        """This rank's shards, keyed by parameter name: what a checkpoint holds. An adapter's
        frozen base is left out (it is the model's own). The optimizer's hyperparameters are
        not: they are the config's, and the learning rate the scheduler's (`load_state`)."""
        reshard(self.module)
        options = StateDictOptions(ignore_frozen_params=self.adapter)
        optimizer = get_optimizer_state_dict(self.module, self.optimizer, options=options)
        return {"model": get_model_state_dict(self.module, options=options),
                "optimizer": optimizer["state"]}

    def save_state(self, folder: Path, extra: dict) -> None:
        if self.scaler is not None:
            extra["loss_scaler"] = self.scaler.state_dict()
        state = self.state_dicts()
        check_only_tensors(state)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(folder / DCP_FOLDER))
        if self.ranks.is_main:
            torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")

    def load_state(self, folder: Path, extra: dict) -> None:
        refuse_symlink(folder / DCP_FOLDER)
        state = self.state_dicts()
        dcp.load(state, storage_reader=SafeReader(folder / DCP_FOLDER))
        options = StateDictOptions(ignore_frozen_params=self.adapter, strict=not self.adapter)
        set_model_state_dict(self.module, state["model"], options=options)
        groups = get_optimizer_state_dict(self.module, self.optimizer)["param_groups"]
        set_optimizer_state_dict(self.module, self.optimizer,
                                 {"state": state["optimizer"], "param_groups": groups},
                                 options=options)
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu",
                                                  weights_only=True))
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # where the schedule stood at the save
        if self.scaler is not None and "loss_scaler" in extra:
            self.scaler.load_state_dict(extra["loss_scaler"])

    def save_final(self, out_dir: Path, tokenizer) -> None:
        # Every rank takes part; rank 0 receives each weight whole, in host memory.
        reshard(self.module)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                                   ignore_frozen_params=self.adapter)
        state_dict = get_model_state_dict(self.module, options=options)
        if self.ranks.is_main:
            save_final(self.module, tokenizer, out_dir, state_dict=state_dict)


create = FSDP2Engine.create  # what dtune.engines.build_engine calls


@contextlib.contextmanager
def sharded_loading(cfg: Config, ranks: Ranks):
    """Nothing to hold while the model loads: it loads whole, on the host, and `create`
    shards it (see the module's docstring)."""
    yield None


def checkpoint_weights(folder: Path, model) -> dict:
    """The weights that trained, whole, read from every rank's shards in this one process (no
    process group): `model` is the plain (unsharded) model with the method applied, and its
    parameter names are those the shards were saved under."""
    refuse_symlink(folder / DCP_FOLDER)
    wanted = {name: torch.empty_like(param, device="cpu")
              for name, param in model.named_parameters() if param.requires_grad}
    state = {"model": wanted}
    dcp.load(state, storage_reader=SafeReader(folder / DCP_FOLDER), no_dist=True)
    return state["model"]


def reshard(model) -> None:
    """Put the shards back in place of any weights a forward left gathered: the root keeps its
    own after a forward (backward needs them next), and an eval's forward has no backward.
    The state-dict functions read the registered parameters, and find the optimizer's there."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def check_only_tensors(state: dict, where: str = "") -> None:
    """DCP pickles any value that is not a tensor, and would unpickle it on resume."""
    for key, value in state.items():
        if isinstance(value, dict):
            check_only_tensors(value, f"{where}{key}.")
        elif not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}{key} is a {type(value).__name__}, not a tensor")


# What DCP's metadata file may rebuild: its own records, and torch's dtypes and sizes.
DCP_RECORDS = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
               "torch.distributed.checkpoint.planner")
TORCH_VALUES = {"Size", "device", *(name for name in dir(torch) if isinstance(
    getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)))}


# a layout by its name, a checkpoint's relative path, an ordered mapping: nothing that runs
PLAIN_VALUES = {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in DCP_RECORDS or (module == "torch" and name in TORCH_VALUES) \
                or (module, name) in PLAIN_VALUES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not one of DCP's records")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, reading the metadata through MetadataUnpickler and refusing a
    checkpoint that holds anything but tensors (DCP would unpickle it with plain pickle)."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

        path = Path(self.path) / ".metadata"
        refuse_symlink(path)
        try:
            metadata = MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except pickle.UnpicklingError as exc:
            raise DtuneError(
                f"the checkpoint file {path} asks to rebuild objects other than "
                f"torch.distributed.checkpoint's records ({exc}), so dtune will not load it: "
                "unpickling them could run code. Delete that checkpoint folder, or set "
                "train.resume=false.") from None
        others = [key for key, entry in metadata.state_dict_metadata.items()
                  if not isinstance(entry, TensorStorageMetadata)]
        if others:
            raise DtuneError(
                f"the checkpoint {path.parent} holds values other than tensors ({others[0]}), "
                "which torch.distributed.checkpoint would unpickle, so dtune will not load it. "
                "Delete that checkpoint folder, or set train.resume=false.")
        outside = [info.relative_path for info in (metadata.storage_data or {}).values()
                   if Path(info.relative_path).name != info.relative_path]
        if outside:  # each rank's file sits beside the metadata, named by DCP
            raise DtuneError(
                f"the checkpoint {path.parent} names a file outside its folder "
                f"({outside[0]!r}), so dtune will not load it. Delete that checkpoint folder, "
                "or set train.resume=false.")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
