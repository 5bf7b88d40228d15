"""Soak: many steps of forward + backward + optimizer with random token counts and shifting skew.

    torchrun --standalone --nproc-per-node 4 -m benchmarks.soak [--steps 1000] [--max-tokens 4096]

Two stacked MoE layers (dropless with a per-expert cap, then capacity 1.25)
on every rank; each step every rank draws its own token count in
0..max_tokens (0 included: empty ranks), and every 50 steps the inputs lean
towards another expert, so the load, the drops and the all-to-all sizes keep
changing. Rank 0 prints progress, then the resident memory of every rank:
after the warm-up it must stay flat (growth under 10%). Exit code 1 if not.

NOTE: glibc keeps freed heap memory, and random tensor sizes fragment the
heap, so raw RSS creeps up (+10% over 3000 steps here) while the memory in
use stays flat to within kilobytes. Every `--sample-every` steps the soak
hands free heap back with malloc_trim(0), then samples RSS and glibc's
in-use bytes (mallinfo2): a real leak grows both.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import statistics
import sys
import time
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist

import expert_parallel as ep


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=100, help="steps before the memory baseline")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--sample-every", type=int, default=20, help="steps between memory samples")
    parser.add_argument(
        "--timeout-s", type=float, default=120, help="a collective stuck this long fails the run"
    )
    return parser.parse_args(argv)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _glibc():
    path = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    libc = ctypes.CDLL(path) if path else None
    if libc is None or not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc


def memory_sample(libc, process: psutil.Process) -> tuple[float, float]:
    """(RSS, bytes malloc has in use) in MiB, after handing free heap back; in use is NaN off glibc."""
    if libc is None:
        return process.memory_info().rss / 2**20, float("nan")
    libc.malloc_trim(0)
    info = libc.mallinfo2()
    return process.memory_info().rss / 2**20, (info.uordblks + info.hblkhd) / 2**20


def say(*parts: object) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


def build(world: int) -> tuple[torch.nn.ModuleList, torch.optim.Optimizer]:
    torch.manual_seed(0)
    shape = dict(d_model=64, d_hidden=128, num_experts=2 * world, top_k=2)
    layers = torch.nn.ModuleList(
        [
            ep.MoELayer(
                ep.MoEConfig(**shape),
                dist.group.WORLD,
                execution=ep.ExecutionConfig(max_tokens_per_expert=4096 * world),
            ),
            ep.MoELayer(ep.MoEConfig(**shape, capacity_factor=1.25, drop_policy="probs"), dist.group.WORLD),
        ]
    )
    return layers, torch.optim.AdamW(layers.parameters(), lr=1e-3)


def step(layers, optimizer, num_tokens: int, lean: torch.Tensor, generator) -> tuple[float, int, int]:
    x = torch.randn(num_tokens, 64, generator=generator) + lean
    target = torch.tanh(x.flip(-1))
    first = layers[0](x)
    hidden = x + first.out
    second = layers[1](hidden)
    out = hidden + second.out
    loss = torch.nn.functional.mse_loss(out, target) if num_tokens else out.sum()
    (loss + first.aux_loss + second.aux_loss).backward()
    for layer in layers:  # the routers are replicated: average their gradients
        for param in layer.router.parameters():
            dist.all_reduce(param.grad)
            param.grad /= dist.get_world_size()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dropped = int(first.stats.num_dropped) + int(second.stats.num_dropped)
    routed = first.stats.num_routed + second.stats.num_routed
    return loss.item(), dropped, routed


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    ep.init_distributed(backend="gloo", timeout=timedelta(seconds=args.timeout_s))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        layers, optimizer = build(world)
        generator = torch.Generator().manual_seed(100 + rank)
        process, libc = psutil.Process(), _glibc()
        samples: list[tuple[float, float]] = []  # (RSS, in use) MiB
        totals = torch.zeros(3, dtype=torch.float64)  # tokens, dropped, routed
        start = time.perf_counter()
        for index in range(1, args.steps + 1):
            num_tokens = int(torch.randint(0, args.max_tokens + 1, (), generator=generator))
            favourite = (index // 50) % 64
            lean = 1.5 * torch.nn.functional.one_hot(torch.tensor(favourite), 64).float()
            loss, dropped, routed = step(layers, optimizer, num_tokens, lean, generator)
            totals += torch.tensor([num_tokens, dropped, routed], dtype=torch.float64)
            if index % args.sample_every == 0:
                samples.append(memory_sample(libc, process))
            if index % args.log_every == 0 or index == args.steps:
                summed = totals.clone()
                dist.all_reduce(summed)
                elapsed = time.perf_counter() - start
                say(
                    f"step {index:5d}/{args.steps}  loss {loss:.4f}  tokens {summed[0]:,.0f}  "
                    f"dropped {summed[1] / max(summed[2], 1):.2%}  rank-0 RSS {samples[-1][0]:.0f} MiB  "
                    f"{elapsed:.0f} s, {elapsed / index * 1e3:.0f} ms/step"
                )
        warm = [s for i, s in enumerate(samples) if (i + 1) * args.sample_every > args.warmup] or samples
        return report(warm, time.perf_counter() - start, args.steps)
    except BaseException:
        ep.shutdown(barrier=False)  # a rank failing alone must not wait for peers that wait for it
        raise
    finally:
        ep.shutdown()  # no-op after the line above


def report(samples: list[tuple[float, float]], elapsed: float, steps: int) -> int:
    """Memory after warm-up: baseline = median of the first 5 samples, final = median of the last 5."""
    rss, in_use = [r for r, _ in samples], [u for _, u in samples]
    mine = torch.tensor(
        [
            statistics.median(rss[:5]),
            statistics.median(rss[-5:]),
            max(rss),
            statistics.median(in_use[:5]),
            statistics.median(in_use[-5:]),
        ],
        dtype=torch.float64,
    )
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    worst = 0.0
    for rank, (base, last, peak, used_base, used_last) in enumerate(t.tolist() for t in gathered):
        growth = last / base - 1
        worst = max(worst, growth)
        say(
            f"rank {rank}: RSS after warm-up {base:.0f} MiB, at the end {last:.0f} MiB ({growth:+.1%}), "
            f"peak {peak:.0f} MiB; malloc in use {used_base:.1f} -> {used_last:.1f} MiB"
        )
    verdict = "flat" if worst < 0.10 else "GROWING"
    say(
        f"soak: {steps} steps in {elapsed:.0f} s, no hang, no error; "
        f"memory {verdict} (worst growth {worst:+.1%})"
    )
    return 0 if worst < 0.10 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
