"""The process group's life: set up from torchrun's environment, torn down so that every rank exits clean.

`init_distributed` and `shutdown`, or both around a block: `with distributed()
as device:`. An entry point that sets up the group itself tears it down with
`shutdown_after()`: with a barrier after success, without one after an error
(a rank failing alone must not wait for peers that wait for it).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(backend: str | None = None, timeout: timedelta = timedelta(minutes=5)) -> torch.device:
    """Initialise the default process group from torchrun's environment; return this rank's device.

    backend None: the EXPERT_PARALLEL_BACKEND environment variable if set, else
    NCCL with one GPU per local rank where CUDA is available, gloo otherwise.
    """
    backend = backend or os.environ.get("EXPERT_PARALLEL_BACKEND") or None
    use_cuda = torch.cuda.is_available() if backend is None else backend == "nccl"
    backend = backend or ("nccl" if use_cuda else "gloo")
    device = torch.device("cpu")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): start at most "
                f"one rank per GPU, or use gloo (EXPERT_PARALLEL_BACKEND=gloo)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout, **_restart_safe_store(timeout))
    return device


def _restart_safe_store(timeout: timedelta) -> dict:
    """Under torchrun, the store of this restart attempt, so that keys from earlier attempts are unseen.

    NOTE: with the c10d rendezvous torchrun's agent hosts one TCPStore for all
    restart attempts, and env:// init connects to it without a per-attempt
    prefix (torch 2.14). After a restart, a rank could then read the gloo
    address its dead predecessor published ("connectFullMesh ... Connection
    refused") or count an old attempt's arrivals in a barrier and hang. Measured:
    2 of 4 kill-and-restart runs failed that way without this prefix.
    Outside torchrun this returns {} and init_process_group does its usual thing.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        return {}
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not agent_hosts_store and rank == 0,
        timeout=timeout,
        multi_tenant=not agent_hosts_store,
    )
    store = dist.PrefixStore(f"expert_parallel/attempt_{attempt}", store)
    return {"store": store, "rank": rank, "world_size": world_size}


def shutdown(barrier: bool = True) -> None:
    """Tear down the default process group so that the process exits cleanly.

    NOTE: a gloo process that exits while autograd graphs still reference the
    group can abort (SIGABRT, "terminate called without an active exception").
    Collect those graphs, wait for every rank, then destroy the group. On an
    error path pass barrier=False: a rank that failed alone must not wait in a
    barrier while its peers wait in the layer's next collective; destroying
    its group at once makes theirs fail at once.
    """
    gc.collect()
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if barrier:
            dist.barrier()
    except RuntimeError as err:
        # A peer is gone; whatever made it go has been reported. Still tear down.
        print(
            f"expert_parallel.shutdown: barrier failed ({err}); destroying the group anyway", file=sys.stderr
        )
    finally:
        dist.destroy_process_group()


@contextmanager
def distributed(
    backend: str | None = None, timeout: timedelta = timedelta(minutes=5)
) -> Iterator[torch.device]:
    """`with distributed() as device:` init_distributed, then shutdown.

    With a barrier after success, without one after an error (see shutdown).
    """
    device = init_distributed(backend, timeout)
    with shutdown_after():
        yield device


@contextmanager
def shutdown_after() -> Iterator[None]:
    """`with shutdown_after():` run the block, then `shutdown()`; after an error, `shutdown(barrier=False)`.

    NOTE: without a barrier on the error path, so that a rank failing alone
    destroys its group at once and its peers' next collective fails at once.
    """
    try:
        yield
    except BaseException:
        shutdown(barrier=False)
        raise
    shutdown()
