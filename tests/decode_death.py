"""A rank that dies mid-decode while its peers wait in the fixed dispatch's all-to-all.

Every rank builds the same byte-level model with its MoE layers sharded over
the world, prefills a prompt and decodes two tokens with the KV cache (the
one-token steps pick the fixed dispatch). Then the victim (the last rank)
writes `<ready_dir>/victim.pid` and sleeps; the survivors decode on and block
in the first MoE layer's all-to-all until the test kills the victim. A
survivor must raise CollectiveError naming that exchange, print it, and exit
with code 3.
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
from expert_parallel.model import ModelConfig, Transformer
from expert_parallel.parallel import shard_experts

SURVIVOR_EXIT = 3


def run_rank(ready_dir: str, timeout_s: float) -> int:
    ep.init_distributed(timeout=timedelta(seconds=timeout_s))
    rank, size = dist.get_rank(), dist.get_world_size()
    moe = ep.MoEConfig(d_model=16, d_hidden=16, num_experts=2 * size)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(seq_len=32, d_model=16, n_layers=2, n_heads=2, moe=moe))
    shard_experts(model, dist.group.WORLD)
    model.eval()  # after sharding: the sharded layers are new modules
    tokens = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(rank))
    started = None
    try:
        with torch.no_grad():
            logits, cache = model.decode(tokens)
            for step in range(20):
                if step == 2 and rank == size - 1:
                    Path(ready_dir, "victim.pid").write_text(str(os.getpid()))
                    time.sleep(600)
                    return 0
                started = time.monotonic()
                next_B1 = logits[:, -1].argmax(dim=-1, keepdim=True)
                logits, cache = model.decode(next_B1, cache, tokens_per_rank=2)
    except ep.CollectiveError as err:
        print(f"rank {rank} raised after {time.monotonic() - started:.1f} s: {err}", flush=True)
        return SURVIVOR_EXIT
    except BaseException:
        ep.shutdown(barrier=False)  # a rank failing alone must not wait for peers that wait for it
        raise
    finally:
        ep.shutdown()  # no-op after the line above
    return 0


if __name__ == "__main__":
    sys.exit(run_rank(sys.argv[1], float(sys.argv[2])))
