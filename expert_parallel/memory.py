"""This process's memory, as the trainer reports it: resident now, peak so far, parameters held."""

from __future__ import annotations

import resource

import psutil
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


def rss_mib() -> float:
    """Resident set size now, MiB."""
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    """The highest resident set size since the process started, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def local_tensor(tensor: Tensor) -> Tensor:
    """The part of `tensor` this rank stores: a DTensor's local shard, else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def param_bytes_local(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (its shards of sharded ones), a shared one counted once."""
    return sum(local_tensor(p).nbytes for p in model.parameters())
