"""Initial values written into parameters that may live on the meta device or be sharded.

A model is built on `torch.device("meta")` (no memory), its experts sharded
and its dense part wrapped by FSDP2, then given real storage with
`to_empty`. Its `reset_parameters` draws each tensor's full values from a
seeded CPU generator and writes through `write_held` only the part this rank
holds: all of a plain tensor, this rank's shard of a DTensor, nothing of a
meta tensor. So the values never depend on the layout: a sharded build holds
exactly its slice of the one-process build.
"""

from __future__ import annotations

import hashlib

from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def derive_seed(seed: int, name: str) -> int:
    """A seed for the tensor or module `name`, from the model's seed: independent of construction order."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # < 2**62, what torch.Generator.manual_seed takes


def held_slices(target: Tensor) -> tuple[Tensor, tuple[slice, ...]] | None:
    """(the local tensor, the slices of the global tensor it holds); None for a meta tensor."""
    if target.is_meta:
        return None
    if not isinstance(target, DTensor):
        return target, tuple(slice(0, n) for n in target.shape)
    local = target.to_local()
    if local.is_meta:
        return None
    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    return local, tuple(slice(o, o + n) for o, n in zip(offset, shape))


def holds(target: Tensor, index: int) -> bool:
    """Whether this rank holds any of `target[index]` (so a caller can skip drawing values it would drop)."""
    held = held_slices(target)
    return held is not None and held[1][0].start <= index < held[1][0].stop


def write_held(target: Tensor, values: Tensor, index: int | None = None) -> None:
    """Copy into `target` (or into `target[index]`) the part of the full `values` this rank holds.

    `values` has the global shape of `target` (of `target[index]`); it is
    converted to the target's dtype and device.
    """
    held = held_slices(target)
    if held is None:
        return
    local, slices = held
    if index is not None:
        first, slices = slices[0], slices[1:]
        if not first.start <= index < first.stop:
            return
        local = local[index - first.start]
    local.copy_(values[slices])
