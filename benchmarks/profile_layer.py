"""Where one MoE layer step spends its time: torch.profiler's top operators on rank 0.

    torchrun --standalone --nproc-per-node 2 -m benchmarks.profile_layer --dtype bf16 --malloc tuned

The layer of `benchmarks.bench --dtype bf16` (its default sizes: 1024 tokens per rank, D 256,
H 1024, 8 experts, top-2, dropless, relu), forward under autocast when bf16, backward; gloo ranks
of one thread. Prints the mean step time over `--steps` unprofiled steps, then the operators
sorted by self CPU time over `--profiled` profiled steps, per step (the profiler adds its own
overhead, and a rank's wait for its peer shows in the exchange's operators).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import expert_parallel as ep
from expert_parallel.allocator import keep_freed_memory


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--malloc", choices=("default", "tuned"), default="default")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profiled", type=int, default=5)
    parser.add_argument("--rows", type=int, default=20, help="operators to print")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.malloc == "tuned":
        keep_freed_memory()
    bf16 = args.dtype == "bf16"
    with ep.distributed():
        rank = dist.get_rank()
        config = ep.MoEConfig(
            d_model=args.d_model, d_hidden=args.d_hidden, num_experts=args.experts, top_k=args.top_k
        )
        torch.manual_seed(0)
        layer = ep.MoELayer(config, dist.group.WORLD)
        generator = torch.Generator().manual_seed(rank)
        x_TD = torch.randn(args.tokens, args.d_model, generator=generator, requires_grad=True)
        upstream_TO = torch.randn(args.tokens, config.d_out, generator=generator)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out_TO, aux, _ = layer(x_TD)
                loss = (out_TO.float() * upstream_TO).sum() + aux
            loss.backward()
            layer.zero_grad(set_to_none=True)
            x_TD.grad = None

        for _ in range(3):
            step()
        dist.barrier()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        dist.barrier()
        step_ms = (time.perf_counter() - started) / args.steps * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profiled):
                step()
        if rank == 0:
            print(f"{args.dtype}, malloc {args.malloc}: {step_ms:.1f} ms per step (2 ranks, slowest)")
            print(f"self CPU ms per step, rank 0, over {args.profiled} profiled steps:")
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            for event in events[: args.rows]:
                per_step_ms = event.self_cpu_time_total / 1e3 / args.profiled
                print(f"  {event.key:40s} {per_step_ms:7.2f}  ({event.count // args.profiled} calls)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))
