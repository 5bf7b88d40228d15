"""All-to-all volume: rows per token and exchange time, per-assignment vs once-per-rank dispatch.

    torchrun --standalone --nproc-per-node 4 -m benchmarks.volume [--experts 64 --top-k 8 --tokens 2048]

For each routing (plain top-k, and group-limited with groups = ranks keeping
half of them, then one), runs forward + backward of the layer with both
dispatch modes on the same tokens and weights, and prints, summed over ranks:
rows per token sent (all destinations, own rank included), rows per token
sent to other ranks, and the slowest rank's seconds in collectives per step
(count exchange included, median of --steps). Random router weights give
near-uniform scores, as the issue's reference figures assume.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

import expert_parallel as ep
from expert_parallel.router import route


def measure(layer: ep.MoELayer, x: torch.Tensor, steps: int) -> tuple[float, float, float]:
    """(rows per token, rows per token to other ranks, seconds in collectives), over all ranks."""
    times = []
    for _ in range(steps):
        layer.zero_grad(set_to_none=True)
        layer.exchange_clock.reset()
        out = layer(x).out
        out.square().mean().backward()
        seconds = torch.tensor(layer.exchange_clock.reset(), dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        times.append(float(seconds))
    config, size = layer.config, layer.group_size
    with torch.no_grad():
        routing = route(layer._router_logits(x), config)
    owner_TK = routing.expert_ids // (config.num_experts // size)
    if layer.execution.dispatch == "once_per_rank":
        owned_TP = torch.zeros(x.shape[0], size, dtype=torch.bool).scatter_(1, owner_TK, True)
        rows, rows_away = owned_TP.sum(), owned_TP.sum() - owned_TP[:, layer.rank].sum()
    else:
        rows, rows_away = owner_TK.numel(), (owner_TK != layer.rank).sum()
    counts = torch.tensor([float(rows), float(rows_away), float(x.shape[0])], dtype=torch.float64)
    dist.all_reduce(counts)
    return float(counts[0] / counts[2]), float(counts[1] / counts[2]), statistics.median(times)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    with ep.distributed() as device:
        size, rank = dist.get_world_size(), dist.get_rank()
        base = ep.MoEConfig(
            d_model=args.d_model,
            d_hidden=args.d_hidden,
            num_experts=args.experts,
            top_k=args.top_k,
            score_func="sigmoid",
            bias=False,
        )
        routings = [("top-k of all experts", base)]
        if size > 1:
            for keep in sorted({max(1, size // 2), 1}, reverse=True):
                if keep * args.experts // size >= args.top_k:
                    routings.append(
                        (
                            f"groups = {size} ranks, keep {keep}",
                            replace(base, num_groups=size, group_topk=keep),
                        )
                    )
        x = torch.randn(args.tokens, args.d_model, generator=torch.Generator().manual_seed(rank)).to(device)
        if rank == 0:
            print(
                f"{size} gloo ranks, {args.tokens} tokens per rank, E={args.experts}, top-{args.top_k}, "
                f"d_model {args.d_model}, fp32; torch {torch.__version__}, "
                f"{torch.backends.cpu.get_cpu_capability()}"
            )
            print(f"{'routing':32} {'dispatch':15} {'rows/token':>10} {'to others':>10} {'a2a s/step':>11}")
        for label, config in routings:
            for dispatch in ("per_assignment", "once_per_rank"):
                torch.manual_seed(0)
                execution = ep.ExecutionConfig(dispatch=dispatch)
                layer = ep.MoELayer(config, dist.group.WORLD, execution=execution).to(device)
                measure(layer, x, 1)  # warm-up
                rows, away, seconds = measure(layer, x, args.steps)
                if rank == 0:
                    print(f"{label:32} {dispatch:15} {rows:10.2f} {away:10.2f} {seconds:11.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
