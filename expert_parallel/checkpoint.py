"""Checkpoints through torch.distributed.checkpoint, keyed by global expert id so that they reshard.

Layout of the flat state: dense parameters under their names; each expert
tensor split per global expert, `<layer>.experts.<w>.<g>` ([D, H] for w1 of
expert g); optimizer moments the same way under `optim.`; the step and the
RNG state under `trainer.`. A rank holds only its local experts' keys, so a
checkpoint saved at one ep size loads at any other that divides the expert
count: each rank asks for the experts it now owns. With redundant experts (a
placement, see MoELayer) a rank saves one copy per logical expert it holds
(ranks holding the same expert write the same key; DCP keeps one) and loads
it into all its replicas, so runs with and without replicas share checkpoints.

Saves are atomic: every rank writes `step_<N>.partial/`, then rank 0 renames
it to `step_<N>/` once all have finished; a crash in between leaves the
previous checkpoint as the latest.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor, Shard

from .layer import MoELayer
from .materialize import held_slices

_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read: missing, truncated, corrupted or unsafe. Names the path."""


def expert_tensor_names(model: nn.Module) -> dict[str, list[int]]:
    """Parameter name -> the logical expert id of each local expert, for every stacked expert parameter."""
    return {
        f"{layer_name}.experts.{pname}": layer.local_expert_ids
        for layer_name, layer in model.named_modules()
        if isinstance(layer, MoELayer)
        for pname, _ in layer.experts.named_parameters()
    }


def _split(key: str, tensor: Tensor, expert_ids: list[int] | None) -> dict[str, Tensor]:
    """{key: tensor}, or for stacked expert tensors one view per local expert keyed by its logical id
    (the first of its replicas on this rank: `_fill_replicas` copies it to the others after a load)."""
    if expert_ids is None or tensor.dim() == 0:
        return {key: tensor}
    if isinstance(tensor, DTensor):
        return _split_sharded(key, tensor, expert_ids)
    state: dict[str, Tensor] = {}
    for j, expert in enumerate(expert_ids):
        state.setdefault(f"{key}.{expert}", tensor[j])
    return state


def _split_sharded(key: str, tensor_eX: DTensor, expert_ids: list[int]) -> dict[str, Tensor]:
    """Per-expert entries of an expert tensor FSDP shards over dp (build.apply_fsdp).

    Sharded over experts (dim 0): the whole experts this rank holds, as plain
    tensors. Sharded over dim d > 0: every expert, each a DTensor whose local
    part is this rank's slice of it (Shard(d - 1)), so DCP writes and reads
    only that slice and the keys stay those of an unsharded run.
    """
    (shard,) = tensor_eX.placements
    local_eX = tensor_eX.to_local()
    if shard.dim == 0:
        start = _held_start(tensor_eX)
        return {f"{key}.{expert_ids[start + j]}": local_eX[j] for j in range(local_eX.shape[0])}
    shape_X = tensor_eX.shape[1:]
    return {
        f"{key}.{expert}": DTensor.from_local(
            local_eX[j],
            tensor_eX.device_mesh,
            [Shard(shard.dim - 1)],
            run_check=False,
            shape=shape_X,
            stride=torch.empty(shape_X, device="meta").stride(),
        )
        for j, expert in enumerate(expert_ids)
    }


def _held_start(tensor: DTensor) -> int:
    held = held_slices(tensor)
    return 0 if held is None else held[1][0].start


@torch.no_grad()
def _fill_replicas(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Copy each expert's first local replica, which a load wrote, into its other replicas on this rank."""
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        ids = layer.local_expert_ids
        first = [ids.index(expert) for expert in ids]
        if first == list(range(len(ids))):
            continue
        source = torch.tensor(first)
        for param in layer.experts.parameters():
            tensors = [param.data]
            if optimizer is not None:
                slots = optimizer.state.get(param, {}).values()
                tensors += [v for v in slots if isinstance(v, Tensor) and v.shape == param.shape]
            for tensor in tensors:
                tensor.copy_(tensor.index_select(0, source.to(tensor.device)))


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's flat state on this rank: views into the live parameters and persistent buffers.

    Buffers: e.g. an MoE layer's selection bias, which is the same on every rank.
    """
    experts = expert_tensor_names(model)
    state: dict[str, Tensor] = {}
    for name, param in model.named_parameters():
        state.update(_split(name, param.data, experts.get(name)))
    persistent = model.state_dict(keep_vars=True).keys()
    state.update({name: buf for name, buf in model.named_buffers() if name in persistent})
    return state


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Tensor]:
    """Model, optimizer, step and RNG on this rank: views into the live tensors, loaded in place."""
    experts = expert_tensor_names(model)
    names = {id(p): n for n, p in model.named_parameters()}
    state = model_state(model)
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            slots = optimizer.state[param]
            if not slots:  # before the first step: AdamW's initial state, so there is something to load into
                slots.update(
                    step=torch.tensor(0.0),
                    exp_avg=torch.zeros_like(param),
                    exp_avg_sq=torch.zeros_like(param),
                )
            for slot, value in slots.items():
                state.update(_split(f"optim.{name}.{slot}", value, experts.get(name)))
    state["trainer.step"] = torch.tensor(step)
    state["trainer.rng"] = torch.get_rng_state()
    return state


def save(directory: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """Write `<directory>/step_<step>/` atomically from every rank; returns its path."""
    final = directory / f"step_{step}"
    partial = directory / f"step_{step}.partial"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    with _quiet_single_process():
        dcp.save(
            training_state(model, optimizer, step), checkpoint_id=partial, no_dist=not dist.is_initialized()
        )
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    _barrier()
    return final


def latest(directory: Path) -> Path | None:
    """The complete checkpoint with the highest step under `directory`, if any."""
    if not directory.is_dir():
        return None
    found = [
        (int(m.group(1)), path)
        for path in directory.iterdir()
        if (m := _STEP_DIR.match(path.name)) and (path / ".metadata").is_file()
    ]
    return max(found)[1] if found else None


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load a checkpoint into the live model (and optimizer, and RNG) in any ep layout; returns its step."""
    if optimizer is None:
        state = {**model_state(model), "trainer.step": torch.tensor(0)}
    else:
        state = training_state(model, optimizer, step=0)
    _load_into(path, state)
    _fill_replicas(model, optimizer)
    if optimizer is not None:
        torch.set_rng_state(state["trainer.rng"])
    return int(state["trainer.step"])


def _load_into(path: Path, state: dict[str, Tensor]) -> None:
    metadata = _read_metadata_safely(path / ".metadata")
    _check_data_files_complete(path, metadata)
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as err:  # DCP raises many kinds; the user needs the path
        raise CheckpointError(f"cannot load checkpoint {path}: {err}") from err


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles only DCP's metadata classes, torch sizes, dtypes and layouts, and builtin containers."""

    def find_class(self, module: str, name: str):
        # NOTE: no dotted names: pickle resolves "os.system" inside any module that imported os.
        allowed = "." not in name and (
            (module, name) in _SAFE_CLASSES
            or (module == "builtins" and name in _SAFE_BUILTINS)
            or (module == "torch" and name in _SAFE_TORCH)
        )
        if not allowed:
            raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which no checkpoint needs")
        return super().find_class(module, name)


_SAFE_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # torch.strided, by name
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}
_SAFE_BUILTINS = {
    "dict",
    "list",
    "tuple",
    "set",
    "frozenset",
    "int",
    "float",
    "str",
    "bytes",
    "bool",
    "slice",
}
_SAFE_TORCH = {"Size", "strided", "contiguous_format", "preserve_format"} | {
    name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)
}


def _read_metadata_safely(metadata: Path):
    """NOTE: DCP reads its .metadata with plain pickle.load, which can run code. Read it first with an
    unpickler that only builds DCP's own metadata classes, so a hostile file fails here instead."""
    try:
        raw = metadata.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint metadata {metadata}: {err}") from err
    try:
        return _PlainDataUnpickler(io.BytesIO(raw)).load()
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"checkpoint metadata {metadata} is truncated or corrupted: {err}") from err


def _check_data_files_complete(path: Path, metadata) -> None:
    """Every byte range the metadata points at must exist: name the file a truncated save left short."""
    needed: dict[str, int] = {}
    for info in getattr(metadata, "storage_data", {}).values():
        name = str(info.relative_path)
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        actual = file.stat().st_size if file.is_file() else None
        if actual is None or actual < size:
            have = "is missing" if actual is None else f"holds {actual} bytes"
            raise CheckpointError(f"checkpoint data file {file} {have}; the metadata needs {size}")


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it assumes one process when there is no group, which is exactly what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
