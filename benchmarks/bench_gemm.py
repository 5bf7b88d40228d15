"""Benchmark: the local experts' GEMMs, per-expert loop against torch's grouped_mm, on one process.

    python -m benchmarks.bench_gemm                       # fp32, the layer benchmark's per-rank sizes
    python -m benchmarks.bench_gemm --dtype bf16 --rows 1024 --d-model 128 --d-hidden 512

Times forward + backward of `Experts` (relu, biases) over R rows split
evenly-ish over e local experts (one expert left empty with --empty), with
gemm="loop" and gemm="grouped_mm", and the dense floor: the same FFN with one
GEMM per matrix over all R rows. The three run round-robin on one thread, so
that a shared host's drifting speed reaches them alike; medians over rounds.
The choice `gemm="auto"` makes per device and dtype (experts.py) quotes these figures.

Legend: R rows, D d_model, H d_hidden, e local experts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from expert_parallel import MoEConfig
from expert_parallel.experts import Experts, grouped_mm_fits

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=8192, help="R: rows the local experts compute")
    parser.add_argument("--experts", type=int, default=4, help="e: local experts")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-hidden", type=int, default=2048)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--empty", action="store_true", help="leave expert 0 without rows")
    return parser.parse_args(argv)


def split_rows(rows: int, experts: int, empty: bool) -> list[int]:
    """R rows over e experts, as even as possible (expert 0 empty with `empty`)."""
    busy = experts - 1 if empty else experts
    sizes = [rows // busy + (g < rows % busy) for g in range(busy)]
    return [0, *sizes] if empty else sizes


def experts_step(experts: Experts, x_RD: torch.Tensor, dy_RO: torch.Tensor, rows: list[int], gemm: str):
    def step() -> float:
        experts.gemm = gemm
        experts.zero_grad(set_to_none=True)
        start = time.perf_counter()
        experts(x_RD, rows).backward(dy_RO)
        return time.perf_counter() - start

    return step


def dense_step(experts: Experts, x_RD: torch.Tensor, dy_RO: torch.Tensor):
    w1_DH, b1_H, w2_HO, b2_O = (
        p[0].detach().clone().requires_grad_() for p in (experts.w1, experts.b1, experts.w2, experts.b2)
    )

    def step() -> float:
        for tensor in (w1_DH, b1_H, w2_HO, b2_O, x_RD):
            tensor.grad = None
        start = time.perf_counter()
        h_RH = torch.relu(torch.addmm(b1_H, x_RD, w1_DH))
        torch.addmm(b2_O, h_RH, w2_HO).backward(dy_RO)
        return time.perf_counter() - start

    return step


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    config = MoEConfig(d_model=args.d_model, d_hidden=args.d_hidden, num_experts=args.experts, top_k=1)
    torch.manual_seed(0)
    experts = Experts(config, args.experts).to(dtype)
    for local_id in range(args.experts):
        experts.reset_expert(local_id, torch.Generator().manual_seed(local_id))
    rows = split_rows(args.rows, args.experts, args.empty)
    x_RD = torch.randn(args.rows, args.d_model, dtype=dtype).requires_grad_()
    dy_RO = torch.randn(args.rows, args.d_model, dtype=dtype)
    steps = {"loop": experts_step(experts, x_RD, dy_RO, rows, "loop")}
    if grouped_mm_fits(x_RD, experts.w1):
        steps["grouped_mm"] = experts_step(experts, x_RD, dy_RO, rows, "grouped_mm")
    else:
        print("grouped_mm: not available for these operands (torch without it, or widths unaligned)")
    steps["dense"] = dense_step(experts, x_RD, dy_RO)
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); {args.dtype}, R {args.rows} rows over e {args.experts} "
        f"experts {rows}, D {args.d_model}, H {args.d_hidden}; forward + backward, ms"
    )
    times = {name: [] for name in steps}
    for index in range(args.rounds + 1):  # round 0 warms up
        for name, step in steps.items():
            seconds = step()
            if index:
                times[name].append(seconds)
    flops = 3 * 2 * 2 * args.rows * args.d_model * args.d_hidden  # 2 matrices, fwd + 2 bwd GEMMs
    dense = statistics.median(times["dense"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"  {name:<11} median {median * 1e3:8.1f}  min {min(values) * 1e3:8.1f}  "
            f"x dense {median / dense:5.3f}  {flops / median / 1e9:6.1f} GFLOP/s"
        )
    if "grouped_mm" in times:
        paired = [g / lo for g, lo in zip(times["grouped_mm"], times["loop"])]
        print(
            f"grouped_mm / loop per round: {' '.join(f'{r:.3f}' for r in paired)} "
            f"(median {statistics.median(paired):.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
