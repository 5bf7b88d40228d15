"""One short multi-rank job that exits while autograd graphs still reference the group.

The output of a forward without backward keeps _AllToAll nodes (and so the
process group) alive until interpreter exit: the pattern that makes gloo
processes abort with SIGABRT unless shutdown() runs first.
"""

import sys

import torch
import torch.distributed as dist

import expert_parallel as ep

if __name__ == "__main__":
    ep.init_distributed()
    try:
        config = ep.MoEConfig(d_model=8, d_hidden=8, num_experts=2 * dist.get_world_size())
        layer = ep.MoELayer(config, dist.group.WORLD)
        trained = layer(torch.randn(32, 8)).out
        trained.sum().backward()
        kept_alive = layer(torch.randn(16, 8)).out  # graph holds the group at exit
        print(f"rank {dist.get_rank()} ok {tuple(kept_alive.shape)}", flush=True)
    finally:
        ep.shutdown()
    sys.exit(0)
