"""Balanced against standard dispatch: one MoE layer's forward + backward step time, rounds alternating.

    python -m benchmarks.balanced_dispatch [--worlds 2,4] [--rounds 5] [--tokens 2048] [--always-balance]

Runs itself under torchrun on each world size (gloo, one thread per rank).
On every rank: two layers with the same weights, dispatch "per_assignment"
(standard) and "balanced"; routing forced (RoutingStats are the layer's own):

- one: every token's first choice on expert 0, its other choices distinct
  and uniform over the rest (the issue's skew);
- zipf: K distinct experts per token, P(expert i) ∝ 1 / (i + 1)^1.2;
- uniform: K distinct experts uniformly.

Each round runs `--steps` timed steps of one layer then of the other, the
order alternating round by round; a step is barrier → forward + backward →
barrier, so its wall time is the slowest rank's. Reported per routing: the
median over rounds of each mode's mean step time, the median of the
per-round ratios balanced / standard, the busiest rank's rows / mean before
and after (RoutingStats), and the busiest rank's CPU seconds per step
(process time: what a rank computed, less sensitive to an oversubscribed
host than wall time, but gloo's waits count in it where they spin).

Also, on the smallest world, the calibration of balance_plan.WEIGHT_COST_ROWS:
seconds to lend one expert's weights (the forward exchange and its
gradient's way back) over seconds to run one row through one expert
forward and backward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import expert_parallel as ep
from expert_parallel import comm, dispatchers

from .bench_tools import machine, torchrun_result

ROUTINGS = ("one", "zipf", "uniform")
MODES = ("standard", "balanced")


def routes(routing: str, tokens: int, num_experts: int, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """[T, K] forced expert ids (see the module docstring)."""
    if routing == "one":
        rest = torch.multinomial(torch.ones(tokens, num_experts - 1), top_k - 1, generator=gen) + 1
        return torch.cat([torch.zeros(tokens, 1, dtype=torch.long), rest], dim=1)
    weights_E = torch.ones(num_experts, dtype=torch.float64)
    if routing == "zipf":
        weights_E = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** 1.2
    return torch.multinomial(weights_E.expand(tokens, num_experts), top_k, generator=gen)


def timed_step(layer: ep.MoELayer, x: torch.Tensor, upstream: torch.Tensor):
    """(wall seconds, this rank's CPU seconds, stats) of one forward + backward between barriers."""
    dist.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    out, aux, stats = layer(x)
    ((out * upstream).sum() + aux).backward()
    cpu = time.process_time() - cpu
    dist.barrier()
    wall = time.perf_counter() - wall
    layer.zero_grad(set_to_none=True)
    x.grad = None
    return wall, cpu, stats


def calibrate(layer: ep.MoELayer, repeats: int = 5) -> dict:
    """WEIGHT_COST_ROWS, measured: lending one expert (rank 0 -> rank 1, and its gradient back) in rows."""
    size, rank = dist.get_world_size(), dist.get_rank()
    experts = layer.experts
    present = [w for w in experts.weights() if w is not None]
    width = sum(w[0].numel() for w in present)
    row_W = torch.randn(1 if rank == 0 else 0, width, requires_grad=True)
    send, recv = [0] * size, [0] * size
    if rank == 0:
        send[1] = 1
    if rank == 1:
        recv[0] = 1
    lend_s = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        (got,) = comm.all_to_all_many([(row_W, recv, send)], layer.group)
        got.sum().backward()
        seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        lend_s.append(float(seconds))
    rows = 2048
    x = torch.randn(rows, layer.config.d_model, requires_grad=True)
    counts = [rows] + [0] * (experts.num_local_experts - 1)
    row_s = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        experts(x, counts).sum().backward()
        row_s.append((time.perf_counter() - start) / rows)
    lend, row = statistics.median(lend_s[1:]), statistics.median(row_s[1:])
    return {"lend_one_expert_s": lend, "one_row_s": row, "weight_cost_rows": lend / row}


def worker(args) -> None:
    size, rank = dist.get_world_size(), dist.get_rank()
    if args.always_balance:  # to find where balancing stops paying: no fallback
        dispatchers.worth_balancing = lambda plan, *_, **__: any(plan.borrowed)
    config = ep.MoEConfig(
        d_model=args.d_model, d_hidden=args.d_hidden, num_experts=args.experts, top_k=args.top_k
    )
    layers = {}
    for mode, dispatch in zip(MODES, ("per_assignment", "balanced")):
        torch.manual_seed(0)
        layers[mode] = ep.MoELayer(config, dist.group.WORLD, execution=ep.ExecutionConfig(dispatch=dispatch))
    result = {"world": size, "calibration": calibrate(layers["standard"]) if args.calibrate else None}
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, config.d_model, generator=gen).requires_grad_()
    upstream = torch.randn(args.tokens, config.d_out, generator=gen)
    for routing in args.routings.split(","):
        forced = routes(routing, args.tokens, config.num_experts, config.top_k, gen)
        for layer in layers.values():
            layer.forced_expert_ids = forced
            timed_step(layer, x, upstream)  # warm-up
        walls = {mode: [] for mode in MODES}
        cpus = {mode: [] for mode in MODES}
        stats = {}
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                wall = cpu = 0.0
                for _ in range(args.steps):
                    w, c, stats[mode] = timed_step(layers[mode], x, upstream)
                    wall, cpu = wall + w, cpu + c
                walls[mode].append(wall / args.steps)
                cpus[mode].append(cpu / args.steps)
        cpu_max = {}
        for mode in MODES:  # the busiest rank's CPU seconds per step, per round
            per_round = torch.tensor(cpus[mode], dtype=torch.float64)
            dist.all_reduce(per_round, op=dist.ReduceOp.MAX)
            cpu_max[mode] = per_round.tolist()
        ratios = [b / s for s, b in zip(walls["standard"], walls["balanced"])]
        result[routing] = {
            "standard_s": statistics.median(walls["standard"]),
            "balanced_s": statistics.median(walls["balanced"]),
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "busiest_cpu_standard_s": statistics.median(cpu_max["standard"]),
            "busiest_cpu_balanced_s": statistics.median(cpu_max["balanced"]),
            "cpu_ratio": statistics.median([b / s for s, b in zip(cpu_max["standard"], cpu_max["balanced"])]),
            "rank_rows_before": float(stats["balanced"].rank_rows_before),
            "rank_rows_after": float(stats["balanced"].rank_rows_after),
            "balanced": bool(stats["balanced"].balanced),
        }
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def table(results: list[dict]) -> str:
    lines = [
        "| ranks | routing | rows max/mean before → after | standard s/step | balanced s/step "
        "| balanced / standard (wall) | busiest rank's CPU, balanced / standard |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for routing in [r for r in ROUTINGS if r in result]:
            row = result[routing]
            after = f"{row['rank_rows_after']:.2f}" + ("" if row["balanced"] else " (fell back)")
            lines.append(
                f"| {result['world']} | {routing} | {row['rank_rows_before']:.2f} → {after} "
                f"| {row['standard_s']:.3f} | {row['balanced_s']:.3f} | **{row['ratio']:.2f}** "
                f"| {row['cpu_ratio']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("balanced_dispatch.json"))
    parser.add_argument("--routings", default=",".join(ROUTINGS))
    parser.add_argument(
        "--always-balance", action="store_true", help="no fallback: balance every call that can be"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--calibrate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        torch.set_num_threads(1)
        with ep.distributed():
            worker(args)
        return 0
    worlds = [int(w) for w in args.worlds.split(",")]
    passed = [
        *("--rounds", str(args.rounds), "--steps", str(args.steps), "--tokens", str(args.tokens)),
        *("--d-model", str(args.d_model), "--d-hidden", str(args.d_hidden)),
        *("--experts", str(args.experts), "--top-k", str(args.top_k), "--routings", args.routings),
        *(["--always-balance"] if args.always_balance else []),
    ]
    results = []
    load_start = os.getloadavg()[0]
    for world in worlds:
        extra = ["--calibrate"] if world == worlds[0] else []
        module = ["benchmarks.balanced_dispatch", "--worker", *extra, *passed]
        results.append(torchrun_result(world, module, f"balanced dispatch benchmark, {world} ranks"))
    info = {**machine(), "torch": torch.__version__, "threads_per_rank": 1, "args": passed}
    info["load_average_1min"] = [load_start, os.getloadavg()[0]]  # at the start and the end
    args.json.write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")
    print(json.dumps(info))
    print(f"calibration: {results[0]['calibration']}")
    print(table(results))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))
