"""Decode step time: the fixed dispatch against the count-exchanging dispatch, by batch per rank.

    torchrun --standalone --nproc-per-node 2 -m benchmarks.decode [--batches 1,4,8,16,24,32]

Builds the byte-level model (4 blocks, every feed-forward an MoE layer of
--experts experts, top-2) with its experts sharded over the world, prefills
16 tokens per row, then times --steps one-token steps with the KV cache:
per-assignment dispatch (count all-gather, host sync, two all-to-alls per
layer) and, from the same weights, dispatch = "fixed" with the batch as its
bound (two all-to-alls per layer, whatever the automatic rule). Prints per
batch the best of --rounds rounds of the slowest rank's milliseconds per
step (ms), and the padded rows per rank and exchange (E' x batch) that
dispatchers.AUTO_FIXED_MAX_ROWS compares.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

import expert_parallel as ep
from expert_parallel.model import ModelConfig, Transformer
from expert_parallel.parallel import shard_experts


def step_ms(model: Transformer, prompt_BS: torch.Tensor, bound: int | None, steps: int) -> float:
    """The slowest rank's milliseconds per one-token step, after a prefill of `prompt_BS`."""
    logits_BSV, cache = model.decode(prompt_BS)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        next_B1 = logits_BSV[:, -1:].argmax(dim=-1)
        logits_BSV, cache = model.decode(next_B1, cache, tokens_per_rank=bound)
    seconds = torch.tensor((time.perf_counter() - start) / steps, dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return 1e3 * float(seconds)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,4,8,16,24,32", help="prompts per rank")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with ep.distributed() as device:
        rank, size = dist.get_rank(), dist.get_world_size()
        moe = ep.MoEConfig(d_model=args.d_model, d_hidden=2 * args.d_model, num_experts=args.experts)
        config = ModelConfig(seq_len=16 + args.steps, d_model=args.d_model, n_layers=4, n_heads=4, moe=moe)
        models = {}
        for dispatch in ("per_assignment", "fixed"):
            torch.manual_seed(0)
            models[dispatch] = Transformer(config, ep.ExecutionConfig(dispatch=dispatch)).to(device)
            shard_experts(models[dispatch], dist.group.WORLD)
            models[dispatch].eval()  # after sharding: the sharded layers are new modules
        if rank == 0:
            print(f"{size} ranks, {args.experts} experts, d_model {args.d_model}, {args.steps} steps")
            print("| batch per rank | padded rows per rank | count exchange | fixed | fixed / count |")
            print("|---|---|---|---|---|")
        with torch.no_grad():
            for batch in [int(b) for b in args.batches.split(",")]:
                generator = torch.Generator().manual_seed(rank)
                prompt_BS = torch.randint(0, 256, (batch, 16), generator=generator).to(device)
                normal, fixed = (
                    min(step_ms(models[dispatch], prompt_BS, bound, args.steps) for _ in range(args.rounds))
                    for dispatch, bound in (("per_assignment", None), ("fixed", batch))
                )
                if rank == 0:
                    rows = args.experts * batch
                    print(f"| {batch} | {rows} | {normal:.2f} | {fixed:.2f} | {fixed / normal:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
