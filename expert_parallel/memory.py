"""This process's memory, as the trainer reports it: resident now, peak so far, parameters held."""

from __future__ import annotations

import resource
from pathlib import Path

import psutil
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


def rss_mib() -> float:
    """Resident set size now, MiB."""
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    """The highest resident set size of this process image, MiB.

    NOTE: Linux's VmHWM, not getrusage's ru_maxrss: ru_maxrss survives exec,
    so a process started by a larger one (pytest holding a model, say)
    reports its parent's peak at the fork. Elsewhere ru_maxrss (KiB on Linux).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def local_tensor(tensor: Tensor) -> Tensor:
    """The part of `tensor` this rank stores: a DTensor's local shard, else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def param_bytes_local(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (its shards of sharded ones), a shared one counted once."""
    return sum(local_tensor(p).nbytes for p in model.parameters())
