"""A rank that dies while its peers wait in the layer's collectives.

Each rank builds a layer; the victim (the last rank) announces itself by
writing `<ready_dir>/victim.pid` and then never calls forward; the survivors
call forward and block in the count exchange until the test kills the victim
with psutil. A survivor must raise CollectiveError naming the collective and
its peers, print it, and exit with code 3.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import expert_parallel as ep

SURVIVOR_EXIT = 3


def run_rank(ready_dir: str, timeout_s: float) -> int:
    ep.init_distributed(timeout=timedelta(seconds=timeout_s))
    rank, size = dist.get_rank(), dist.get_world_size()
    layer = ep.MoELayer(ep.MoEConfig(d_model=8, d_hidden=8, num_experts=2 * size), dist.group.WORLD)
    if rank == size - 1:
        Path(ready_dir, "victim.pid").write_text(str(os.getpid()))
        time.sleep(600)
        return 0
    started = time.monotonic()
    try:
        layer(torch.randn(16, 8))
    except ep.CollectiveError as err:
        print(f"rank {rank} raised after {time.monotonic() - started:.1f} s: {err}", flush=True)
        return SURVIVOR_EXIT
    except BaseException:
        ep.shutdown(barrier=False)  # a rank failing alone must not wait for peers that wait for it
        raise
    finally:
        ep.shutdown()  # no-op after the line above
    return 0


def mp_worker(rank: int, world_size: int, port: int, ready_dir: str, timeout_s: float) -> None:
    """Entry point for torch.multiprocessing: the env:// variables, then the same rank body."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    sys.exit(run_rank(ready_dir, timeout_s))


if __name__ == "__main__":
    sys.exit(run_rank(sys.argv[1], float(sys.argv[2])))
