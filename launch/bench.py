"""Benchmark: the expert-parallel MoELayer against the dense FFN its experts amount to, on gloo CPU ranks.

    torchrun --standalone --nproc-per-node 2 -m launch.bench [--capacity none,1.25] [--json PATH]
    torchrun --standalone --nproc-per-node 2 -m launch.bench --quick        # a smoke run in seconds

Per capacity setting ("none" = dropless), three forward + backward steps, run
round-robin so that a shared host's drifting speed reaches them alike; each is
timed as the slowest rank's seconds per round (all_reduce MAX), median over rounds:
- layer: MoELayer on T random tokens per rank (requiring grad, as inside a model),
  loss (out * upstream).sum() + aux_loss.
- floor: on each rank, one dense FFN relu(x @ w1 + b1) @ w2 + b2 over the S rows
  that rank's experts computed in the layer's forward: the GEMMs the layer cannot avoid.
- breakdown: an instrumented pass through the library functions the layer calls,
  with the layer's own weights. Each phase runs on detached copies of its inputs,
  so its backward can be run and timed on its own, in reverse order, handing each
  gradient on by hand. A barrier (untimed) precedes each all-to-all phase, so that
  waiting for a slower peer is not charged to the exchange; each phase is charged
  to its slowest rank. The sum is printed beside the layer's time as a check.
The ratio layer / floor is of the two medians; the per-round ratios show the noise.

Legend: T tokens on this rank, D d_model, H d_hidden, O d_out, K top-k, R rows this
rank sends (kept assignments), S rows its own experts compute (received).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

import expert_parallel as ep
from expert_parallel import comm, dispatch
from expert_parallel.router import route

PHASES = ("routing", "permutation", "all-to-all", "experts", "combine", "loss")
QUICK = {"tokens": 256, "d_model": 64, "d_hidden": 128, "steps": 2, "warmup": 1}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--capacity", default="none,1.25", help='comma list of factors; "none" = dropless')
    parser.add_argument("--json", type=Path, help="write the results here (rank 0)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    parser.add_argument(
        "--malloc-default",
        action="store_true",
        help="leave glibc malloc as it is (by default freed memory is kept for reuse; see keep_freed_memory)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    args.capacity = [None if c.strip().lower() == "none" else float(c) for c in args.capacity.split(",")]
    return args


def say(*parts: object) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


def machine() -> dict:
    with open("/proc/cpuinfo") as handle:
        models = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    return {
        "cpu": models[0] if models else "unknown",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "world_size": dist.get_world_size(),
        "threads_per_rank": torch.get_num_threads(),
    }


def measure(steps: dict, warmup: int, repeats: int) -> tuple[dict[str, list[dict]], int]:
    """Per step, the `repeats` timed rounds of its slowest-rank seconds, per key of its dict plus "total".

    Each step returns this rank's seconds per part; "total" is their sum, and
    every key is reduced to its slowest rank (all_reduce MAX). The steps run
    round-robin, so that drift in a shared host's speed reaches them alike; an
    untimed barrier lines the ranks up before each call. Also returns this
    rank's peak RSS in bytes, sampled after each call (ru_maxrss: the kernel's high-water mark).
    """
    samples, peak_rss = {name: [] for name in steps}, 0
    for index in range(warmup + repeats):
        for name, step in steps.items():
            dist.barrier()
            seconds = step()
            seconds["total"] = sum(seconds.values())
            peak_rss = max(peak_rss, psutil.Process().memory_info().rss)
            slowest = torch.tensor(list(seconds.values()), dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            samples[name].append(dict(zip(seconds, slowest.tolist())))
        done = ", ".join(f"{name} {samples[name][-1]['total'] * 1e3:.0f} ms" for name in steps)
        say(f"  round {index + 1}/{warmup + repeats}{' (warmup)' if index < warmup else ''}: {done}")
    return {name: rows[warmup:] for name, rows in samples.items()}, peak_rss


def medians_ms(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(row[key] for row in rows) * 1e3 for key in rows[0]}


def layer_step(layer: ep.MoELayer, x_TD: torch.Tensor, upstream_TO: torch.Tensor):
    def step() -> dict[str, float]:
        layer.zero_grad(set_to_none=True)
        x_TD.grad = None
        start = time.perf_counter()
        loss = (layer(x_TD) * upstream_TO).sum() + layer.aux_loss
        middle = time.perf_counter()
        loss.backward()
        return {"fwd": middle - start, "bwd": time.perf_counter() - middle}

    return step


def rows_computed_here(layer: ep.MoELayer) -> int:
    """S: rows this rank's experts computed in the layer's last forward (every rank's tokens)."""
    load_E = layer.stats.tokens_per_expert.clone()
    dist.all_reduce(load_E)
    return int(load_E[layer.first_expert : layer.first_expert + layer.num_local_experts].sum())


def floor_step(num_rows: int, config: ep.MoEConfig, generator: torch.Generator):
    """One dense FFN over `num_rows` rows: a single GEMM per weight matrix, forward and backward."""
    d, h, o = config.d_model, config.d_hidden, config.d_out

    def param(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * d**-0.5).requires_grad_()

    w1_DH, b1_H, w2_HO, b2_O, x_SD = param(d, h), param(h), param(h, o), param(o), param(num_rows, d)
    upstream_SO = torch.randn(num_rows, o, generator=generator)

    def step() -> dict[str, float]:
        for tensor in (w1_DH, b1_H, w2_HO, b2_O, x_SD):
            tensor.grad = None
        start = time.perf_counter()
        h_SH = torch.relu(torch.addmm(b1_H, x_SD, w1_DH))
        loss = (torch.addmm(b2_O, h_SH, w2_HO) * upstream_SO).sum()
        middle = time.perf_counter()
        loss.backward()
        return {"fwd": middle - start, "bwd": time.perf_counter() - middle}

    return step


def instrumented_step(layer: ep.MoELayer, x_TD: torch.Tensor, upstream_TO: torch.Tensor):
    """Phase by phase through the calls of MoELayer.forward and _run_on_owners: seconds per "<phase> fwd|bwd".

    Mirrors layer.py, so keep the two in step. Left out, as too small to show:
    the layer's input checks (one isfinite pass over x) and its stats record.
    """
    config, group, size, e = layer.config, layer.group, layer.group_size, layer.num_local_experts

    def step() -> dict[str, float]:
        layer.zero_grad(set_to_none=True)
        seconds = {f"{phase} {way}": 0.0 for phase in PHASES for way in ("fwd", "bwd")}
        tape = []  # (phase, barrier, outputs, their detached leaves), in forward order

        @contextmanager
        def clock(phase: str, way: str = "fwd", barrier: bool = False):
            if barrier:
                dist.barrier(group)
            start = time.perf_counter()
            yield
            seconds[f"{phase} {way}"] += time.perf_counter() - start

        def cut(phase: str, *outputs: torch.Tensor, barrier: bool = False):
            leaves = tuple(t.detach().requires_grad_() for t in outputs)
            tape.append((phase, barrier, outputs, leaves))
            return leaves if len(leaves) > 1 else leaves[0]

        x = x_TD.detach().requires_grad_()
        with clock("routing"):
            routing = route(layer.router(x), config)
            plan = dispatch.plan_dispatch(routing)
            aux_loss = config.aux_loss_coef * routing.aux_loss + config.z_loss_coef * routing.z_loss
        weights_TK, aux_loss = cut("routing", routing.weights, aux_loss)
        with clock("all-to-all", barrier=True):
            rows_PE, _ = comm.gather_counts(routing.tokens_per_expert, [0, 0], group)
        with clock("permutation"):
            rows_from_Pe = [row[layer.first_expert : layer.first_expert + e] for row in rows_PE]
            send = [sum(plan.rows_per_expert[p * e : (p + 1) * e]) for p in range(size)]
            recv = [sum(row) for row in rows_from_Pe]
            rows_per_local_expert = [sum(column) for column in zip(*rows_from_Pe)]
            by_expert_S = dispatch.source_to_expert_order(rows_from_Pe, x.device) if e > 1 else None
            by_source_S = dispatch.inverse_permutation(by_expert_S) if e > 1 else None
            x_RD = cut("permutation", dispatch.permute(x, plan))
        with clock("all-to-all", barrier=True):
            x_SD = cut("all-to-all", comm.all_to_all(x_RD, recv, send, group, "dispatch"), barrier=True)
        if by_expert_S is not None:  # the layer skips the regroup for one local expert
            with clock("permutation"):
                x_SD = cut("permutation", dispatch.permute_rows(x_SD, by_expert_S, by_source_S))
        with clock("experts"):
            y_SO = cut("experts", layer.experts(x_SD, rows_per_local_expert))
        if by_expert_S is not None:
            with clock("permutation"):
                y_SO = cut("permutation", dispatch.permute_rows(y_SO, by_source_S, by_expert_S))
        with clock("all-to-all", barrier=True):
            y_RO = cut("all-to-all", comm.all_to_all(y_SO, send, recv, group, "combine"), barrier=True)
        with clock("combine"):
            out_TO = cut("combine", dispatch.combine(y_RO, weights_TK, plan))
        with clock("loss"):
            loss = (out_TO * upstream_TO).sum() + aux_loss
        tape.append(("loss", False, (loss,), ()))

        for phase, barrier, outputs, leaves in reversed(tape):
            grads = [leaf.grad for leaf in leaves] or None
            with clock(phase, "bwd", barrier):
                torch.autograd.backward(outputs, grads)
        return seconds

    return step


def rank_stats(layer: ep.MoELayer, rows_here: int, rss_before: int, peak_rss: int) -> list[dict]:
    """Every rank's routing outcome and memory, gathered (the stats are of the layer's last forward)."""
    stats = layer.stats
    mine = [
        rows_here,
        stats.rows_sent_to_other_ranks,
        stats.num_dropped / max(stats.num_routed, 1),
        rss_before / 2**20,
        peak_rss / 2**20,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,  # KiB on Linux
    ]
    gathered = [torch.empty(len(mine), dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor(mine, dtype=torch.float64))
    keys = ("rows_computed", "rows_sent_to_other_ranks", "dropped_fraction")
    keys += ("rss_before_mib", "peak_rss_sampled_mib", "ru_maxrss_mib")
    return [dict(zip(keys, values.tolist())) for values in gathered]


def bench_setting(args: argparse.Namespace, factor: float | None) -> dict:
    """Layer, floor and breakdown for one capacity factor (None: dropless)."""
    name = "dropless" if factor is None else f"capacity {factor:g}"
    shape = dict(d_model=args.d_model, d_hidden=args.d_hidden, num_experts=args.experts, top_k=args.top_k)
    config = ep.MoEConfig(**shape, capacity_factor=factor, activation="relu", bias=True)
    torch.manual_seed(0)
    layer = ep.MoELayer(config, group=dist.group.WORLD)
    generator = torch.Generator().manual_seed(1000 + dist.get_rank())
    x_TD = torch.randn(args.tokens, config.d_model, generator=generator).requires_grad_()
    upstream_TO = torch.randn(args.tokens, config.d_out, generator=generator)
    rss_before = psutil.Process().memory_info().rss

    layer_step(layer, x_TD, upstream_TO)()  # untimed: S comes from this forward's routing
    rows_here = rows_computed_here(layer)
    say(f"[{name}] layer, floor over S = {rows_here} rows (rank 0), instrumented layer; round-robin:")
    steps = {
        "layer": layer_step(layer, x_TD, upstream_TO),
        "floor": floor_step(rows_here, config, generator),
        "breakdown": instrumented_step(layer, x_TD, upstream_TO),
    }
    samples, peak_rss = measure(steps, args.warmup, args.steps)
    layer_ms, floor_ms = medians_ms(samples["layer"]), medians_ms(samples["floor"])
    paired = [lay["total"] / flo["total"] for lay, flo in zip(samples["layer"], samples["floor"])]
    return {
        "setting": name,
        "layer_ms": layer_ms,
        "floor_ms": floor_ms,
        "ratio": layer_ms["total"] / floor_ms["total"],
        "ratio_per_round": paired,
        "ratio_paired_median": statistics.median(paired),
        "phases_ms": medians_ms(samples["breakdown"]),
        "ranks": rank_stats(layer, rows_here, rss_before, peak_rss),
    }


def print_result(result: dict) -> None:
    layer_ms, floor_ms, phases = result["layer_ms"], result["floor_ms"], result["phases_ms"]
    verdict = "meets" if result["ratio"] <= 1.10 else "MISSES"
    say(f"\n== {result['setting']} ==   (ms: slowest rank per step, median over steps)")
    say(f"{'':<14} {'fwd':>9} {'bwd':>9} {'total':>9} {'% layer':>8}")
    for name, row in (("layer", layer_ms), ("floor", floor_ms)):
        say(f"{name:<14} {row['fwd']:9.1f} {row['bwd']:9.1f} {row['total']:9.1f}")
    say(
        f"ratio layer / floor {result['ratio']:.3f} ({verdict} the <= 1.10 target); "
        f"median of the per-round ratios {result['ratio_paired_median']:.3f}; "
        f"per round {' '.join(f'{r:.2f}' for r in result['ratio_per_round'])}"
    )
    say("breakdown (instrumented pass):")
    for phase in PHASES:
        fwd, bwd = phases[f"{phase} fwd"], phases[f"{phase} bwd"]
        share = 100 * (fwd + bwd) / layer_ms["total"]
        say(f"  {phase:<12} {fwd:9.1f} {bwd:9.1f} {fwd + bwd:9.1f} {share:7.1f}%")
    total = sum(fwd_or_bwd for key, fwd_or_bwd in phases.items() if key != "total")
    share = 100 * total / layer_ms["total"]
    say(f"  {'sum':<12} {'':9} {'':9} {total:9.1f} {share:7.1f}%   (layer measured {layer_ms['total']:.1f})")
    for rank, stats in enumerate(result["ranks"]):
        say(
            f"rank {rank}: S {stats['rows_computed']:.0f} rows computed, "
            f"{stats['rows_sent_to_other_ranks']:.0f} sent to other ranks per step, "
            f"dropped {stats['dropped_fraction']:.2%}; RSS {stats['rss_before_mib']:.0f} MiB before, "
            f"peak {stats['peak_rss_sampled_mib']:.0f} MiB sampled after steps, "
            f"{stats['ru_maxrss_mib']:.0f} MiB ru_maxrss"
        )


def keep_freed_memory() -> str:
    """Ask glibc malloc to keep freed memory for reuse instead of returning it to the OS.

    NOTE: by default glibc serves blocks over 128 KiB-32 MiB with mmap and
    trims the heap after frees, so every step maps fresh pages and pays a
    page fault per 4 KiB on first touch (about 65-100K faults, 200-500 ms of
    system time per step here). That cost lands in whichever op first touches
    the memory, at random, and is the allocator's, not the layer's. Turned
    off, both the layer and the floor run on warm memory.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "allocator unchanged (no glibc)"
    m_trim_threshold, m_mmap_max = -1, -4
    if libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**30):
        return "glibc malloc keeps freed memory (M_MMAP_MAX 0, M_TRIM_THRESHOLD 1 GiB)"
    return "allocator unchanged (mallopt refused)"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    allocator = "glibc malloc defaults" if args.malloc_default else keep_freed_memory()
    # gloo even where CUDA is present: this benchmark measures CPU ranks.
    ep.init_distributed(backend="gloo")
    try:
        start = time.perf_counter()
        info = machine()
        say(
            f"CPU {info['cpu']} ({info['cpu_capability']}), torch {info['torch']}, "
            f"{info['world_size']} gloo ranks x {info['threads_per_rank']} thread(s)"
        )
        say(
            f"T {args.tokens} tokens/rank, D {args.d_model}, H {args.d_hidden}, E {args.experts}, "
            f"top-{args.top_k}, fp32 relu with biases; {args.warmup} warmup + {args.steps} timed steps"
        )
        say(f"allocator: {allocator}")
        info["allocator"] = allocator
        results = [bench_setting(args, factor) for factor in args.capacity]
        for result in results:
            print_result(result)
        say(f"\nbenchmark took {time.perf_counter() - start:.1f} s")
        if args.json and dist.get_rank() == 0:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            report = {"machine": info, "args": {**vars(args), "json": str(args.json)}, "results": results}
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    except BaseException:
        ep.shutdown(barrier=False)  # a rank failing alone must not wait for peers that wait for it
        raise
    finally:
        ep.shutdown()  # no-op after the line above


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
