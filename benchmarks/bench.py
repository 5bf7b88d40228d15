"""Benchmark: MoELayer against the dense FFN floor, fairscale and the seed's loop, on gloo CPU ranks.

    torchrun --standalone --nproc-per-node 2 -m benchmarks.bench           # layer vs floor, with a breakdown
    torchrun --standalone --nproc-per-node 2 -m benchmarks.bench --compare # side by side, one run
    torchrun --standalone --nproc-per-node 2 -m benchmarks.bench --quick   # a smoke run in seconds
    # scaling and skew (see BENCHMARKS.md for the exact commands):
    ... -m benchmarks.bench --tokens 1024,4096,16384 --impls layer,floor,loop,fairscale --capacity none
    ... -m benchmarks.bench --experts 8,16,32,64 --capacity none   # fixed top-k and H: fixed active
    ... -m benchmarks.bench --skew uniform,zipf,one --capacity none,1.25
    torchrun --standalone --nproc-per-node 1 -m benchmarks.bench --impls layer,floor,breakdown --capacity none
    # execution choices, each a layer timed round-robin with the others in one run:
    ... -m benchmarks.bench --dispatch per_assignment,once_per_rank   # or --chunks 1,2,4 (one list at a time)
    ... -m benchmarks.bench --impls layer,floor --compile             # the layer eager and torch.compile'd
    ... -m benchmarks.bench --impls layer,floor --malloc default,tuned  # the allocator toggled round by round

Every case (a token count, an expert count, a skew) builds its implementations
on the same tokens and runs them round-robin, so that a shared host's drifting
speed reaches them alike; each is timed as the slowest rank's forward +
backward per round (all-gathered), median over rounds. Implementations (--impls):
- layer: MoELayer per capacity setting (--capacity, "none" = dropless) on T
  random tokens per rank (requiring grad, as inside a model); loss
  (out * upstream).sum() + aux_loss.
- floor: on each rank, one dense FFN relu(x @ w1 + b1) @ w2 + b2 over the S rows
  that rank's experts computed in the layer's forward: the GEMMs the layer cannot avoid.
- floor_a2a: the floor with the layer's two all-to-alls around it (the same rows between
  the same ranks, in the dtype the layer sends them: bf16 under autocast), and their
  backward: everything an expert-parallel layer cannot avoid. Issue M's floor.
- breakdown: (of each --dispatch mode) the layer's own parts (routing, its dispatcher's count exchange,
  dispatch and combine, its experts) called one by one, phase by phase (see
  instrumented_step and bench_tools.PhaseTape); no phase is charged for
  waiting on a slower peer, so a rank's sum of phases is its own work.
- fairscale: fairscale's MOELayer with Top2Gate (capacity 2T/E), with its own
  breakdown; skipped with a note where fairscale is not installed, or where
  its [T, E, C] tensors would not fit in memory.
- loop: the seed's SimpleMoE, a boolean-mask pass per expert, all E experts on every rank.
Variants of the layer, each timed round-robin with the rest: one layer per
--dispatch mode or per --chunks count (the first is the layer of record,
which the floor and breakdown follow), and with --compile the layer of
record under torch.compile ("layer <setting> compiled", compiled in an
untimed step first). Each variant's "x its floor" is the median over rounds
of its ratio to the floor in the same round, with the range.
Allocator (--malloc): "tuned" keeps freed memory (allocator.keep_freed_memory),
"default" leaves glibc alone. With "default,tuned" every round runs every
step under both, switched by mallopt in alternating order, each step once
untimed after a switch; "default" is then glibc's initial values
(M_MMAP_MAX 65536, mmap and trim thresholds 128 KiB) held fixed: once
set, glibc no longer raises the thresholds after large frees, as its
untouched default does (up to 32 MiB). The memory pass fixes them the same
way, so under "default" alone only the first case runs untouched glibc.
Memory: after timing, each implementation's step runs once more while a
thread samples RSS, with glibc told to return freed memory (so RSS follows
the live tensors): the step's peak above the RSS before it, per rank.
All-to-all efficiency: the layer's data exchanges (bytes each rank sends to
other ranks, 4 exchanges per step) per second, over the rate of a plain
all_to_all_single of the same size between the same ranks, in the same run.

Legend: T tokens on this rank, D d_model, H d_hidden, O d_out, E experts, e
local experts, K top-k, R rows this rank sends (kept assignments), S rows its
own experts compute (received), P ranks.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

import expert_parallel as ep
from benchmarks import bench_peers
from benchmarks.bench_tools import (
    SKEWS,
    PhaseTape,
    cpu_model,
    even_splits,
    forced_expert_ids,
    plain_all_to_all_seconds,
    rss_peak,
    timed_step,
)
from expert_parallel.allocator import keep_freed_memory, return_freed_memory, trim
from expert_parallel.checks import InputCheck
from expert_parallel.comm import all_to_all
from expert_parallel.config import DISPATCH_MODES
from expert_parallel.lifecycle import shutdown_after
from expert_parallel.plan import plan_call

PHASES = bench_peers.PHASES
COMPILE_BACKENDS = ("inductor", "aot_eager")
MALLOC_MODES = ("default", "tuned")
IMPLS = ("layer", "floor", "floor_a2a", "breakdown", "fairscale", "loop")
QUICK = {"tokens": [256], "d_model": 64, "d_hidden": 128, "steps": 2, "warmup": 1}
# bf16 GEMMs run about 13x slower than fp32 on an AVX2-only CPU (benchmarks.bench_gemm): smaller defaults.
BF16_SIZES = {"tokens": [1024], "d_model": 256, "d_hidden": 1024}
FP32_SIZES = {"tokens": [4096], "d_model": 512, "d_hidden": 2048}
GOALS = {
    "layer / fairscale": 0.35,
    "layer / fairscale (cpu)": 0.35,
    "layer / floor": 1.05,
    "layer / floor (cpu)": 1.05,
    "bf16 layer / bf16 floor": 1.10,
    "layer / floor_a2a": 1.05,
    "bf16 layer / bf16 floor_a2a": 1.10,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )

    def ints(text: str) -> list[int]:
        return [int(v) for v in text.split(",")]

    parser.add_argument("--tokens", type=ints, help="tokens per rank; a comma list sweeps (default 4096)")
    parser.add_argument("--d-model", type=int, help="default 512")
    parser.add_argument("--d-hidden", type=int, help="default 2048")
    parser.add_argument("--experts", type=ints, default=[8], help="E; a comma list sweeps")
    parser.add_argument("--top-k", type=ints, default=[2], help="K; a comma list sweeps")
    parser.add_argument(
        "--fine-grained",
        action="store_true",
        help="with an --experts sweep, scale d_hidden by E0/E and top-k by E/E0 (E0 the first "
        "count): total and active parameters both fixed (default: top-k and d_hidden fixed, "
        "so active parameters fixed and total parameters growing with E)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument(
        "--capacity",
        help='comma list of factors; "none" = dropless (default none,1.25; --compare none,1.0,1.25)',
    )
    parser.add_argument("--compare", action="store_true", help="every implementation side by side")
    parser.add_argument(
        "--impls", help=f"comma list of {IMPLS} (default layer,floor,floor_a2a,breakdown; --compare all)"
    )
    parser.add_argument("--skew", default="router", help=f"comma list of {SKEWS}; router = its own choice")
    parser.add_argument(
        "--cap-factor",
        type=float,
        default=2.0,
        help="dropless all-to-one: also show ExecutionConfig.max_tokens_per_expert = this x the fair "
        "share P*T*K/E refusing the forward",
    )
    parser.add_argument(
        "--gemm", choices=("auto", "loop", "grouped_mm"), default="auto", help="the experts' GEMM"
    )
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help=f"bf16: also the layer and the floor under torch.autocast(cpu, bf16), beside fp32, with "
        f"the output and gradient difference against fp32; default sizes then {BF16_SIZES}",
    )
    parser.add_argument(
        "--dispatch",
        default="per_assignment",
        help=f"comma list of ExecutionConfig.dispatch modes {DISPATCH_MODES}, each a layer of its own; "
        "the floor and breakdown follow the first",
    )
    parser.add_argument(
        "--chunks",
        type=ints,
        default=[1],
        help="comma list of ExecutionConfig.exchange_chunks, each a layer of its own (1: no overlap); "
        "the floor and breakdown follow the first; only one of --dispatch and --chunks may list several",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        choices=COMPILE_BACKENDS,
        help="also the layer of record under torch.compile with this backend (default inductor)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per rank (torchrun sets 1 only for 2+ ranks)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    parser.add_argument("--json", type=Path, help="write the results here (rank 0)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    parser.add_argument(
        "--malloc",
        default="tuned",
        help=f"comma list of {MALLOC_MODES}: tuned keeps freed memory for reuse "
        "(expert_parallel.allocator.keep_freed_memory), default leaves glibc as it is; "
        "default,tuned alternates them round by round (see above)",
    )
    parser.add_argument("--malloc-default", action="store_true", help="the same as --malloc default")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    for key, value in (BF16_SIZES if args.dtype == "bf16" else FP32_SIZES).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    capacity = args.capacity or ("none,1.0,1.25" if args.compare else "none,1.25")
    args.capacity = [None if c.strip().lower() == "none" else float(c) for c in capacity.split(",")]
    impls = args.impls or (",".join(IMPLS) if args.compare else "layer,floor,floor_a2a,breakdown")
    args.impls = [name.strip() for name in impls.split(",")]
    args.skew = [name.strip() for name in args.skew.split(",")]
    for name in args.impls:
        if name not in IMPLS:
            parser.error(f"--impls: unknown {name!r}, expected some of {IMPLS}")
    for name in args.skew:
        if name not in SKEWS:
            parser.error(f"--skew: unknown {name!r}, expected some of {SKEWS}")
    args.dispatch = [name.strip() for name in args.dispatch.split(",")]
    for name in args.dispatch:
        if name not in DISPATCH_MODES:
            parser.error(f"--dispatch: unknown {name!r}, expected some of {DISPATCH_MODES}")
    if len(args.dispatch) > 1 and len(args.chunks) > 1:
        parser.error("--dispatch and --chunks: only one of them may list several values")
    if "once_per_rank" in args.dispatch and max(args.chunks) > 1:
        parser.error("--chunks > 1 needs --dispatch per_assignment (once_per_rank rows are not chunked)")
    args.malloc = ["default"] if args.malloc_default else [m.strip() for m in args.malloc.split(",")]
    for name in args.malloc:
        if name not in MALLOC_MODES:
            parser.error(f"--malloc: unknown {name!r}, expected some of {MALLOC_MODES}")
    if len(set(args.malloc)) != len(args.malloc):
        parser.error(f"--malloc: {','.join(args.malloc)} names a mode twice")
    return args


def say(*parts: object) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": psutil.cpu_count(logical=True),
        "torch": torch.__version__,
        "world_size": dist.get_world_size(),
        "threads_per_rank": torch.get_num_threads(),
        "load_average": list(psutil.getloadavg()),
    }


def gather(values: list[float]) -> list[list[float]]:
    """[P][len(values)]: every rank's values."""
    mine = torch.tensor(values, dtype=torch.float64)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [row.tolist() for row in gathered]


def malloc_key(name: str, mode: str | None) -> str:
    """A step's result key under an alternated allocator mode (None: not alternated)."""
    return name if mode is None else f"{name} malloc {mode}"


def set_allocator(mode: str) -> None:
    """tuned: keep freed memory; default: glibc's initial values, fixed (see the module docstring)."""
    if mode == "tuned":
        keep_freed_memory()
    else:
        return_freed_memory()


def measure(
    steps: dict, warmup: int, repeats: int, malloc: list[str] | None = None
) -> dict[str, list[dict[str, list[float]]]]:
    """Per step, its `repeats` timed rounds: {key: [value per rank]} for each key of its dict,
    "total" (their sum), "cpu", "sys" and "minor_faults".

    Each step returns this rank's wall seconds per part ("exchange..." parts
    repeat time inside other parts, so they stay out of "total"). "cpu" is the CPU
    seconds the rank's process (all its threads, gloo's included) spent in
    the step: on a shared host, time spent waiting for a core is not in it,
    so its ratios hold where wall-clock ones scatter. "sys": the part of it
    in the kernel; "minor_faults": the process's minor page faults in the
    step (fresh pages touched).
    The steps run round-robin, so that drift in a shared host's speed reaches
    them alike; an untimed barrier lines the ranks up before each call.
    With `malloc` (several modes), each round runs every step under every
    mode, keyed malloc_key(step, mode), the modes in turn first; after each
    switch every step runs once untimed, so that a tuned heap has grown back.
    """
    modes = malloc or [None]
    samples = {malloc_key(name, mode): [] for mode in modes for name in steps}
    for index in range(warmup + repeats):
        done = []
        for mode in modes[index % len(modes) :] + modes[: index % len(modes)]:
            if mode is not None:
                set_allocator(mode)
                for step in steps.values():
                    dist.barrier()
                    step()
            for name, step in steps.items():
                key = malloc_key(name, mode)
                dist.barrier()
                cpu, before = time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
                seconds = step()
                cpu, after = time.process_time() - cpu, resource.getrusage(resource.RUSAGE_SELF)
                # "exchange ..." keys repeat seconds already in other keys (see PhaseTape's `also`).
                seconds["total"] = sum(v for k, v in seconds.items() if not k.startswith("exchange"))
                seconds["cpu"] = cpu
                seconds["sys"] = after.ru_stime - before.ru_stime
                seconds["minor_faults"] = after.ru_minflt - before.ru_minflt
                per_rank = gather(list(seconds.values()))
                samples[key].append({k: [row[i] for row in per_rank] for i, k in enumerate(seconds)})
                done.append(f"{key} {max(samples[key][-1]['total']) * 1e3:.0f}")
        which = f"{index + 1}/{warmup + repeats}{' (warmup)' if index < warmup else ''}"
        say(f"  round {which} ms: {', '.join(done)}")
    return {name: rows[warmup:] for name, rows in samples.items()}


def medians_ms(rows: list[dict[str, list[float]]]) -> dict[str, float]:
    """Median over rounds of the slowest rank's seconds, per key, in ms."""
    return {
        key: statistics.median(max(row[key]) for row in rows) * 1e3
        for key in rows[0]
        if key != "minor_faults"
    }


def rank_medians_ms(rows: list[dict[str, list[float]]], key: str = "total") -> list[float]:
    """Median over rounds of each rank's own seconds for `key`, in ms."""
    return [statistics.median(row[key][r] for row in rows) * 1e3 for r in range(len(rows[0][key]))]


def memory_pass(steps: dict, keep_after: bool) -> dict[str, list[float]]:
    """Each step once more, its RSS peak above the RSS before it, per rank, in MiB (see rss_peak)."""
    gc.collect()
    return_freed_memory()
    peaks = {}
    for name, step in steps.items():
        trim()
        dist.barrier()
        with rss_peak() as rss:
            step()
        peaks[name] = [row[0] for row in gather([(rss["peak"] - rss["before"]) / 2**20])]
    if keep_after:
        keep_freed_memory()
    return peaks


def layer_step(
    layer: ep.MoELayer,
    x_TD: torch.Tensor,
    upstream_TO: torch.Tensor,
    bf16: bool = False,
    last: dict | None = None,
    call=None,
):
    """Forward (under bf16 autocast with `bf16`) and backward of the layer; grads dropped after.

    Also "exchange": the seconds the layer's own clock saw in its collectives,
    forward and backward; with an overlapped exchange (exchange_chunks > 1)
    only the part left waiting. `last["stats"]`: the last forward's RoutingStats.
    `call`: what runs the forward instead of the layer itself (its torch.compile'd module).
    """
    call = layer if call is None else call

    def forward() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = call(x_TD)
        if last is not None:
            last["stats"] = out.stats
        return (out.out * upstream_TO).sum() + out.aux_loss

    step = timed_step(forward, drop=(layer, x_TD))

    def step_and_exchange() -> dict[str, float]:
        layer.exchange_clock.reset()
        seconds = step()
        seconds["exchange"] = layer.exchange_clock.reset()
        return seconds

    return step_and_exchange


def rows_computed_here(layer: ep.MoELayer, stats: ep.RoutingStats) -> int:
    """S: rows this rank's experts computed in the forward of `stats` (every rank's tokens)."""
    load_E = stats.tokens_per_expert.clone()
    dist.all_reduce(load_E)
    return int(load_E[layer.first_expert : layer.first_expert + layer.num_local_experts].sum())


def dense_ffn(config: ep.MoEConfig, generator: torch.Generator):
    """The floors' FFN: (its weights w1, b1, w2, b2, drawn in that order; relu(x @ w1 + b1) @ w2 + b2).

    relu runs in place, as the layer's experts run it.
    """
    d, h, o = config.d_model, config.d_hidden, config.d_out
    w1_DH, b1_H, w2_HO, b2_O = (
        scaled_leaf(config, generator, *shape) for shape in ((d, h), (h,), (h, o), (o,))
    )

    def ffn(x_SD: torch.Tensor) -> torch.Tensor:
        return torch.addmm(b2_O, torch.addmm(b1_H, x_SD, w1_DH).relu_(), w2_HO)

    return (w1_DH, b1_H, w2_HO, b2_O), ffn


def scaled_leaf(config: ep.MoEConfig, generator: torch.Generator, *shape: int, dtype=torch.float32):
    """N(0, 1 / d_model) of `shape` in `dtype`, a leaf that requires grad."""
    return (torch.randn(*shape, generator=generator) * config.d_model**-0.5).to(dtype).requires_grad_()


def floor_step(num_rows: int, config: ep.MoEConfig, generator: torch.Generator, bf16: bool = False):
    """One dense FFN over `num_rows` rows: a single GEMM per weight matrix, forward and backward.

    With `bf16`, the forward runs under bf16 autocast, as nn.Linear layers would.
    """
    weights, ffn = dense_ffn(config, generator)
    x_SD = scaled_leaf(config, generator, num_rows, config.d_model)
    upstream_SO = torch.randn(num_rows, config.d_out, generator=generator)

    def forward() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return (ffn(x_SD) * upstream_SO).sum()

    return timed_step(forward, drop=(*weights, x_SD))


def rows_sent_per_rank(layer: ep.MoELayer, stats: ep.RoutingStats) -> list[int]:
    """The rows this rank's dispatch sent to each rank (itself included) in the forward of `stats`:
    its kept assignments per expert, summed over each rank's experts (contiguous placement)."""
    size = dist.get_world_size()
    if layer.num_local_experts * size != layer.config.num_experts or layer.placement is not None:
        raise ValueError("floor_a2a: needs the contiguous placement, e experts on every rank, no replicas")
    return stats.tokens_per_expert.view(size, layer.num_local_experts).sum(dim=1).tolist()


def floor_a2a_step(
    send_rows: list[int], config: ep.MoEConfig, generator: torch.Generator, bf16: bool = False
):
    """The floor's FFN over the rows this rank receives, between the layer's two all-to-alls:
    `send_rows[r]` rows of D go to rank r, the FFN runs over what arrives, its S rows of O go back.

    The rows start (and travel) in bf16 with `bf16`, as the layer's do under autocast; the
    backward runs the two reverse exchanges, as the layer's does.
    """
    counts = torch.tensor(send_rows)
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts)
    recv_rows = received.tolist()
    weights, ffn = dense_ffn(config, generator)
    x_RD = scaled_leaf(
        config, generator, sum(send_rows), config.d_model, dtype=torch.bfloat16 if bf16 else torch.float32
    )
    upstream_RO = torch.randn(sum(send_rows), config.d_out, generator=generator)

    def forward() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            x_SD = all_to_all(x_RD, recv_rows, send_rows, dist.group.WORLD, "floor dispatch")
            y_RO = all_to_all(ffn(x_SD), send_rows, recv_rows, dist.group.WORLD, "floor combine")
            return (y_RO.float() * upstream_RO).sum()

    return timed_step(forward, drop=(*weights, x_RD))


def instrumented_step(layer: ep.MoELayer, x_TD: torch.Tensor, upstream_TO: torch.Tensor):
    """Phase by phase through the layer's own parts: seconds per "<phase> fwd|bwd".

    The parts MoELayer.forward calls, in its order (its steps 1-5): `_route` (routing), the
    dispatcher's `exchange_counts` and `dispatch` (permutation), the experts,
    the dispatcher's `combine` (combine), then the loss. Time the layer's
    exchange clock sees inside the token exchanges is charged to
    "all-to-all" (and "exchange"), the rest of a dispatcher call to its
    phase; the count exchange is "all-to-all" too. Left out, as too small to
    show: the input checks (one isfinite pass over x) and the stats.
    """
    plan = plan_call(layer.config, layer.dispatcher, None, training=layer.training, grad_enabled=True)
    dispatcher, device, good = plan.dispatcher, layer.router.weight.device, InputCheck()

    def step() -> dict[str, float]:
        tape = PhaseTape(PHASES, layer.group, exchange_clock=layer.exchange_clock)
        x = x_TD.detach().requires_grad_()
        with tape.clock("routing"):
            rows_TD, routing, _ = layer._route(x, good, plan, None)
            aux_loss = layer._aux_loss(routing, None)
        rows_TD, weights_TK, aux_loss = tape.cut("routing", rows_TD, routing.weights, aux_loss)
        routing = replace(routing, weights=weights_TK)
        with tape.clock("all-to-all", barrier=True):
            counts = dispatcher.exchange_counts(x, routing, good, device)
        with tape.clock("permutation", barrier=True):
            chunks, record = dispatcher.dispatch(rows_TD, routing, counts, layer.experts)
            chunks = list(chunks)  # waits for every chunk's rows
        arrived = tape.cut("permutation", *[chunk.x for chunk in chunks])
        arrived = arrived if isinstance(arrived, tuple) else (arrived,)
        with tape.clock("experts"):
            y_chunks = [
                layer.experts(x_SD, chunk.rows_per_expert, chunk.borrowed)
                for x_SD, chunk in zip(arrived, chunks)
            ]
        y_chunks = tape.cut("experts", *y_chunks)
        with tape.clock("combine", barrier=True):
            out_TO = dispatcher.combine(y_chunks if isinstance(y_chunks, tuple) else (y_chunks,), record)
        out_TO = tape.cut("combine", out_TO)
        with tape.clock("loss"):
            loss = (out_TO * upstream_TO).sum() + aux_loss
        seconds = tape.backward(loss)
        layer.zero_grad(set_to_none=True)
        return seconds

    return step


def bf16_difference(layer: ep.MoELayer, x_TD: torch.Tensor, upstream_TO: torch.Tensor) -> dict:
    """The layer under bf16 autocast against fp32: ||difference|| / ||fp32||, output and gradients (worst).

    Also whether both chose the same experts (the router runs in fp32 under
    autocast): the kept rows per expert of the two forwards, all ranks.
    """
    runs = []
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out_TO, _, stats = layer(x_TD)
        (out_TO.float() * upstream_TO).sum().backward()
        grads = {"x": x_TD.grad, **{n: p.grad for n, p in layer.named_parameters() if p.grad is not None}}
        runs.append((out_TO.detach().float(), grads, stats.tokens_per_expert.clone()))
        layer.zero_grad(set_to_none=True)
        x_TD.grad = None

    def relative(got: torch.Tensor, want: torch.Tensor) -> float:
        return float((got.float() - want).norm() / want.norm().clamp_min(1e-30)) if want.numel() else 0.0

    (out32, grads32, load32), (out16, grads16, load16) = runs
    mine = [relative(out16, out32), max(relative(grads16[n], g) for n, g in grads32.items())]
    mine.append(float(torch.equal(load32, load16)))
    per_rank = gather(mine)
    return {
        "output": max(row[0] for row in per_rank),
        "gradients": max(row[1] for row in per_rank),
        "same_experts": all(row[2] == 1.0 for row in per_rank),
    }


def setting_name(factor: float | None) -> str:
    return "dropless" if factor is None else f"capacity {factor:g}"


def parameter_mib(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20


def shapes(args: argparse.Namespace) -> list[tuple[int, int, int, int]]:
    """(T, E, H, K) of every case's shape."""
    first = args.experts[0]
    cases = []
    for tokens in args.tokens:
        for experts in args.experts:
            for top_k in args.top_k:
                hidden = args.d_hidden
                if args.fine_grained:
                    hidden, top_k = args.d_hidden * first // experts, top_k * experts // first
                cases.append((tokens, experts, hidden, top_k))
    return cases


def layer_variants(args: argparse.Namespace) -> list[tuple[str, ep.ExecutionConfig]]:
    """(result-key suffix, execution) of each layer per setting: one per --dispatch mode or per
    --chunks count; the first, suffix "", is the layer of record."""
    if len(args.dispatch) > 1:
        pairs = [(f" {mode}", dict(dispatch=mode, exchange_chunks=args.chunks[0])) for mode in args.dispatch]
    else:
        pairs = [(f" chunks {n}", dict(dispatch=args.dispatch[0], exchange_chunks=n)) for n in args.chunks]
    return [
        ("" if index == 0 else suffix, ep.ExecutionConfig(**choice, gemm=args.gemm))
        for index, (suffix, choice) in enumerate(pairs)
    ]


def compile_untimed(step, key: str) -> float:
    """Run a compiled layer's first step (forward and backward compile there): the slowest rank's seconds."""
    dist.barrier()
    start = time.perf_counter()
    step()
    seconds = max(row[0] for row in gather([time.perf_counter() - start]))
    say(f"  {key}: first step (compiling) {seconds:.1f} s")
    return seconds


def run_case(args: argparse.Namespace, tokens: int, experts: int, hidden: int, top_k: int, skew: str) -> dict:
    """Every implementation of --impls on one shape and skew: timings, memory, routing outcome."""
    rank, size = dist.get_rank(), dist.get_world_size()
    shape = dict(d_model=args.d_model, d_hidden=hidden, num_experts=experts, top_k=top_k)
    generator = torch.Generator().manual_seed(1000 + rank)
    x_TD = torch.randn(tokens, args.d_model, generator=generator).requires_grad_()
    upstream_TO = torch.randn(tokens, args.d_model, generator=generator)
    forced_TK = forced_expert_ids(skew, tokens, experts, top_k, generator)
    steps, settings, notes, params, compile_seconds = {}, {}, [], {}, {}
    for factor in args.capacity:
        name = setting_name(factor)
        config = ep.MoEConfig(**shape, capacity_factor=factor, activation="relu", bias=True)
        layers = {}  # result-key suffix -> its layer, the first (suffix "") the layer of record
        for suffix, execution in layer_variants(args):
            torch.manual_seed(0)
            layers[suffix] = ep.MoELayer(config, group=dist.group.WORLD, execution=execution)
            layers[suffix].forced_expert_ids = forced_TK
        layer, last = layers[""], {}
        layer_step(layer, x_TD, upstream_TO, last=last)()  # untimed: S comes from this forward's routing
        rows_here = rows_computed_here(layer, last["stats"])
        settings[name] = {"layer": layer, "stats": last["stats"], "rows_here": rows_here, "variants": []}
        if "layer" in args.impls:
            for suffix, variant in layers.items():
                params[f"layer {name}{suffix}"] = parameter_mib(variant)
                steps[f"layer {name}{suffix}"] = layer_step(variant, x_TD, upstream_TO)
                settings[name]["variants"].append(suffix)
            if args.compile:
                # The same module as the layer of record (the same weights), traced by dynamo.
                key = f"layer {name} compiled"
                compiled = torch.compile(layer, backend=args.compile)
                steps[key] = layer_step(layer, x_TD, upstream_TO, call=compiled)
                params[key] = parameter_mib(layer)
                compile_seconds[key] = compile_untimed(steps[key], key)
                settings[name]["variants"].append(" compiled")
        if "floor" in args.impls:
            steps[f"floor {name}"] = floor_step(rows_here, config, generator)
        send_rows = rows_sent_per_rank(layer, last["stats"]) if "floor_a2a" in args.impls else None
        if send_rows is not None:
            steps[f"floor_a2a {name}"] = floor_a2a_step(send_rows, config, generator)
        if "breakdown" in args.impls:
            # Every dispatch mode's breakdown (where modes vary); otherwise the layer of record's.
            for suffix, variant in layers.items() if len(args.dispatch) > 1 else [("", layer)]:
                steps[f"breakdown {name}{suffix}"] = instrumented_step(variant, x_TD, upstream_TO)
        if args.dtype == "bf16":
            settings[name]["bf16_vs_fp32"] = bf16_difference(layer, x_TD, upstream_TO)
            steps[f"layer {name} bf16"] = layer_step(layer, x_TD, upstream_TO, bf16=True)
            steps[f"floor {name} bf16"] = floor_step(rows_here, config, generator, bf16=True)
            if send_rows is not None:
                steps[f"floor_a2a {name} bf16"] = floor_a2a_step(send_rows, config, generator, bf16=True)
    if "fairscale" in args.impls:
        why_not = bench_peers.fairscale_missing()
        need = bench_peers.fairscale_dense_bytes(tokens, experts) * size
        if why_not is None and skew != "router":
            why_not = "Top2Gate routes by itself (no forced routing)"
        if why_not is None and (tokens % experts or tokens % max(experts // size, 1)):
            why_not = f"Top2Gate needs T ({tokens}) divisible by E ({experts}) and by e"
        if why_not is None and need > psutil.virtual_memory().available / 2:
            why_not = (
                f"its [T, E, C] tensors would take over {need / 2**30:.1f} GiB over {size} ranks, "
                f"more than half of the {psutil.virtual_memory().available / 2**30:.1f} GiB available"
            )
        if why_not is None:
            torch.manual_seed(1)
            moe = bench_peers.build_fairscale(experts, args.d_model, hidden, dist.group.WORLD)
            params["fairscale"] = parameter_mib(moe)
            steps["fairscale"] = bench_peers.fairscale_step(moe, x_TD, upstream_TO)
            if "breakdown" in args.impls:
                steps["breakdown fairscale"] = bench_peers.fairscale_instrumented_step(moe, x_TD, upstream_TO)
        else:
            notes.append(f"fairscale skipped: {why_not}")
    if "loop" in args.impls:
        if skew == "router":
            torch.manual_seed(2)
            simple = bench_peers.SimpleMoE(experts, args.d_model, hidden, top_k)
            params["loop"] = parameter_mib(simple)
            steps["loop"] = bench_peers.simple_moe_step(simple, x_TD, upstream_TO)
        else:
            notes.append("loop skipped: SimpleMoE routes by itself (no forced routing)")
    refusal = None
    if skew == "one" and None in args.capacity:
        refusal = refuse_all_to_one(args, shape, x_TD, forced_TK)
    for note in notes:
        say(f"  note: {note}")

    alternate = args.malloc if len(args.malloc) > 1 else None
    samples = measure(steps, args.warmup, args.steps, malloc=alternate)
    memory = (
        {}
        if args.no_memory
        else memory_pass(
            {name: step for name, step in steps.items() if not name.startswith("breakdown")},
            keep_after=args.malloc == ["tuned"],
        )
    )
    results = {}
    for mode in alternate or [None]:
        for name in steps:
            rows = samples[malloc_key(name, mode)]
            results[malloc_key(name, mode)] = {
                "ms": medians_ms(rows),
                "rank_ms": rank_medians_ms(rows),
                "per_round_ms": [max(row["total"]) * 1e3 for row in rows],
                "per_round_cpu_ms": [max(row["cpu"]) * 1e3 for row in rows],
                "minor_faults": statistics.median(max(row["minor_faults"]) for row in rows),
                "step_peak_mib": memory.get(name),
                "params_mib": params.get(name),
            }
    layers = {}
    for name, setting in settings.items():
        layers[name] = setting_outcome(args, name, setting, results, tokens, top_k)
    return {
        "variants": variant_ratios(settings, results, alternate),
        "compile_seconds": compile_seconds,
        "case": {"tokens": tokens, "experts": experts, "d_hidden": hidden, "top_k": top_k, "skew": skew},
        "ranks": size,
        "notes": notes,
        "impls": results,
        "layers": layers,
        "refusal": refusal,
        "ru_maxrss_mib": [row[0] for row in gather([rusage_maxrss_mib()])],
    }


def paired(results: dict, key: str, over: str, cpu: bool = False) -> dict | None:
    """results[key] / results[over] round by round: median, min, max and every round's ratio."""
    if key not in results or over not in results:
        return None
    field = "per_round_cpu_ms" if cpu else "per_round_ms"
    ratios = [a / b for a, b in zip(results[key][field], results[over][field])]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "per_round": ratios}


def variant_ratios(settings: dict, results: dict, malloc: list[str] | None) -> dict[str, dict]:
    """Per layer variant and floor (and allocator mode): its ms, exchange ms and minor faults, its
    ratio to the floor of its setting in the same round (and mode), wall and CPU, and its ratio
    to the layer of record (a floor: to the floor) under the first mode."""
    modes = malloc or [None]
    table = {}
    for name, setting in settings.items():
        for mode in modes:
            floor = malloc_key(f"floor {name}", mode)
            for suffix in setting["variants"]:
                key = malloc_key(f"layer {name}{suffix}", mode)
                if key not in results:
                    continue
                result = results[key]
                table[key] = {
                    "setting": name,
                    "variant": suffix.strip() or "record",
                    "malloc": mode,
                    "ms": result["ms"]["total"],
                    "exchange_ms": result["ms"].get("exchange"),
                    "sys_ms": result["ms"]["sys"],
                    "minor_faults": result["minor_faults"],
                    "x floor": paired(results, key, floor),
                    "x floor (cpu)": paired(results, key, floor, cpu=True),
                    "x record": paired(results, key, malloc_key(f"layer {name}", modes[0])),
                    "x record (cpu)": paired(results, key, malloc_key(f"layer {name}", modes[0]), cpu=True),
                }
            if floor in results:
                table[floor] = {
                    "setting": name,
                    "variant": "floor",
                    "malloc": mode,
                    "ms": results[floor]["ms"]["total"],
                    "exchange_ms": None,
                    "sys_ms": results[floor]["ms"]["sys"],
                    "minor_faults": results[floor]["minor_faults"],
                    "x floor": None,
                    "x floor (cpu)": None,
                    "x record": paired(results, floor, malloc_key(f"floor {name}", modes[0])),
                    "x record (cpu)": paired(results, floor, malloc_key(f"floor {name}", modes[0]), cpu=True),
                }
    return table


def rusage_maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def setting_outcome(args, name: str, setting: dict, results: dict, tokens: int, top_k: int) -> dict:
    """One layer setting's routing outcome per rank, its ratios and all-to-all efficiency."""
    layer, stats = setting["layer"], setting["stats"]
    kept = stats.num_routed - int(stats.num_dropped)
    sent = int(stats.rows_sent_to_other_ranks)
    per_rank = gather([setting["rows_here"], sent, kept, stats.num_routed])
    rows_computed = [row[0] for row in per_rank]
    outcome = {
        "rows_computed": rows_computed,
        "rows_sent_to_other_ranks": [row[1] for row in per_rank],
        "dropped_fraction": 1 - sum(row[2] for row in per_rank) / max(sum(row[3] for row in per_rank), 1),
        "capacity": stats.capacity,
    }
    lay, flo = results.get(f"layer {name}"), results.get(f"floor {name}")
    if lay and flo:
        outcome["layer / floor"] = lay["ms"]["total"] / flo["ms"]["total"]
        paired = [a / b for a, b in zip(lay["per_round_ms"], flo["per_round_ms"])]
        outcome["layer / floor per round"] = paired
        outcome["layer / floor paired median"] = statistics.median(paired)
        outcome["layer / floor (cpu)"] = lay["ms"]["cpu"] / flo["ms"]["cpu"]
        paired = [a / b for a, b in zip(lay["per_round_cpu_ms"], flo["per_round_cpu_ms"])]
        outcome["layer / floor (cpu) per round"] = paired
    for suffix in ("", " bf16"):
        lay_here, exchanging = results.get(f"layer {name}{suffix}"), results.get(f"floor_a2a {name}{suffix}")
        if lay_here and exchanging:
            key = f"{'bf16 layer / bf16' if suffix else 'layer /'} floor_a2a"
            per_round = [a / b for a, b in zip(lay_here["per_round_ms"], exchanging["per_round_ms"])]
            outcome[key], outcome[f"{key} per round"] = statistics.median(per_round), per_round
    lay16, flo16 = results.get(f"layer {name} bf16"), results.get(f"floor {name} bf16")
    if lay16 and flo16:
        outcome["bf16 layer / bf16 floor"] = lay16["ms"]["total"] / flo16["ms"]["total"]
        outcome["bf16 / fp32 layer"] = lay16["ms"]["total"] / lay["ms"]["total"] if lay else math.nan
        outcome["bf16 / fp32 floor"] = flo16["ms"]["total"] / flo["ms"]["total"] if flo else math.nan
        outcome["bf16_vs_fp32"] = setting["bf16_vs_fp32"]
    for peer in ("fairscale", "loop"):
        if lay and peer in results:
            outcome[f"layer / {peer}"] = lay["ms"]["total"] / results[peer]["ms"]["total"]
            outcome[f"layer / {peer} (cpu)"] = lay["ms"]["cpu"] / results[peer]["ms"]["cpu"]
    breakdown = results.get(f"breakdown {name}")
    if breakdown:
        # Each rank's own work: its sum of phases, waits for peers excluded.
        work = breakdown["rank_ms"]
        outcome["rank_work_ms"] = work
        outcome["slowest / mean rank"] = max(work) / statistics.mean(work) if statistics.mean(work) else 1.0
    if breakdown and layer.group is not None:
        # Bytes each rank sends to other ranks per step: dispatch rows x D and the rows it
        # computed for other ranks x O coming back, forward and again backward.
        elem = 4
        sent_back = [
            s - (k - r)
            for s, r, k in zip(
                rows_computed, outcome["rows_sent_to_other_ranks"], [row[2] for row in per_rank]
            )
        ]
        bytes_per_rank = [
            2 * elem * (r * args.d_model + b * layer.config.d_out)
            for r, b in zip(outcome["rows_sent_to_other_ranks"], sent_back)
        ]
        mean_bytes = statistics.mean(bytes_per_rank)
        seconds = (breakdown["ms"].get("exchange fwd", 0) + breakdown["ms"].get("exchange bwd", 0)) / 1e3
        # One of the 4 exchanges, two ways: the same bytes spread evenly over the other
        # ranks, and the layer's own dispatch splits, its rows for itself included.
        elements = int(mean_bytes / 4 / elem)
        plain = plain_all_to_all_seconds(even_splits(elements), even_splits(elements), layer.group)
        send_P, recv_P = dispatch_splits(layer, stats)
        same = plain_all_to_all_seconds(
            [n * args.d_model for n in send_P], [n * args.d_model for n in recv_P], layer.group
        )
        outcome["exchange"] = exchange = {
            "bytes_per_rank_per_step": bytes_per_rank,
            "layer_seconds": seconds,
            "layer_gb_per_s": mean_bytes / seconds / 1e9 if seconds else math.nan,
            "plain_gb_per_s": mean_bytes / 4 / plain / 1e9 if plain else math.nan,
            "plain_same_splits_gb_per_s": mean_bytes / 4 / same / 1e9 if same else math.nan,
        }
        exchange["efficiency"] = exchange["layer_gb_per_s"] / exchange["plain_gb_per_s"]
        exchange["efficiency_same_splits"] = (
            exchange["layer_gb_per_s"] / exchange["plain_same_splits_gb_per_s"]
        )
    return outcome


def dispatch_splits(layer: ep.MoELayer, stats: ep.RoutingStats) -> tuple[list[int], list[int]]:
    """This rank's dispatch all-to-all splits in rows ([P] sent, [P] received) in the forward of `stats`."""
    e, rank = layer.num_local_experts, layer.rank
    rows_PE = [[int(v) for v in row] for row in gather(stats.tokens_per_expert.tolist())]
    send = [sum(rows_PE[rank][p * e : (p + 1) * e]) for p in range(layer.group_size)]
    recv = [sum(rows_PE[q][rank * e : (rank + 1) * e]) for q in range(layer.group_size)]
    return send, recv


def refuse_all_to_one(args, shape: dict, x_TD: torch.Tensor, forced_TK: torch.Tensor) -> dict:
    """Dropless all-to-one under ExecutionConfig.max_tokens_per_expert: the forward refuses on every rank."""
    size, tokens = dist.get_world_size(), x_TD.shape[0]
    fair = size * tokens * shape["top_k"] / shape["num_experts"]
    cap = math.ceil(args.cap_factor * fair)
    config = ep.MoEConfig(**shape, capacity_factor=None)
    torch.manual_seed(0)
    layer = ep.MoELayer(
        config, group=dist.group.WORLD, execution=ep.ExecutionConfig(max_tokens_per_expert=cap)
    )
    layer.forced_expert_ids = forced_TK
    try:
        with torch.no_grad():
            layer(x_TD)
        message = None
    except ValueError as err:
        message = str(err)
    say(
        f"  dropless all-to-one with max_tokens_per_expert={cap} ({args.cap_factor:g} x the fair share): "
        + (f"refused: {message}" if message else "NOT refused")
    )
    return {"max_tokens_per_expert": cap, "error": message}


def print_case(args: argparse.Namespace, case: dict) -> None:
    c, impls = case["case"], case["impls"]
    say(
        f"\n##### T {c['tokens']} tokens/rank, E {c['experts']}, H {c['d_hidden']}, top-{c['top_k']}, "
        f"skew {c['skew']}, {case['ranks']} rank(s) #####"
    )
    for note in case["notes"]:
        say(f"note: {note}")
    for name, outcome in case["layers"].items():
        print_setting(name, outcome, impls)
    say(
        f"\nside by side (ms: slowest rank per step, median of {args.steps} rounds; "
        "memory per rank, max over ranks):"
    )
    width = max(len(name) for name in impls) if impls else 22
    say(
        f"{'':<{width}} {'fwd':>8} {'bwd':>8} {'total':>8} {'cpu':>8} {'x dropless':>10} "
        f"{'params MiB':>10} {'step peak MiB':>13} {'sum MiB':>8}"
    )
    base = impls.get("layer dropless")
    for name, result in impls.items():
        if name.startswith("breakdown"):
            continue
        ms, peak, par = result["ms"], result["step_peak_mib"], result["params_mib"]
        relative = f"{ms['total'] / base['ms']['total']:10.3f}" if base else f"{'':>10}"
        peak_text = f"{max(peak):13.0f}" if peak else f"{'':>13}"
        par_text = f"{par:10.1f}" if par is not None else f"{'':>10}"
        both = f"{max(peak) + par:8.0f}" if peak and par is not None else f"{'':>8}"
        say(
            f"{name:<{width}} {ms['fwd']:8.1f} {ms['bwd']:8.1f} {ms['total']:8.1f} {ms['cpu']:8.1f} "
            f"{relative} {par_text} {peak_text} {both}"
        )
    for name, outcome in case["layers"].items():
        for key, goal in GOALS.items():
            if key in outcome:
                verdict = "meets" if outcome[key] <= goal else "MISSES"
                say(f"{key} ({name}): {outcome[key]:.3f} ({verdict} the <= {goal} goal)")
        for key in ("layer / loop", "layer / loop (cpu)"):
            if key in outcome:
                say(f"{key} ({name}): {outcome[key]:.3f}")
        if "bf16_vs_fp32" in outcome:
            diff, slower = outcome["bf16_vs_fp32"], outcome["bf16 / fp32 layer"]
            say(
                f"bf16 ({name}): layer bf16 / fp32 {slower:.2f}, floor bf16 / fp32 "
                f"{outcome['bf16 / fp32 floor']:.2f}"
                + (" -- bf16 is SLOWER than fp32 on this CPU" if slower > 1 else "")
                + f"; bf16 vs fp32: output {diff['output']:.1e}, gradients {diff['gradients']:.1e} "
                f"(||diff|| / ||fp32||, worst tensor), same experts chosen: {diff['same_experts']}"
            )
    if len(args.chunks) > 1:
        print_overlap(args, case)
    if len(args.dispatch) > 1 or args.compile or len(args.malloc) > 1:
        print_variants(args, case)
    for name in case["layers"]:
        for mode in args.dispatch[1:]:
            breakdown, layer = impls.get(f"breakdown {name} {mode}"), impls.get(f"layer {name} {mode}")
            if breakdown and layer:
                say(f"breakdown ({name} {mode}, instrumented pass):")
                print_phases(breakdown["ms"], layer["ms"]["total"])
    if "fairscale" in impls and impls["fairscale"]["step_peak_mib"]:
        fair = impls["fairscale"]
        fair_mib = max(fair["step_peak_mib"]) + fair["params_mib"]
        for name in case["layers"]:
            lay = impls.get(f"layer {name}")
            if lay and lay["step_peak_mib"]:
                mine = max(lay["step_peak_mib"]) + lay["params_mib"]
                verdict = "below" if mine < fair_mib else "NOT below"
                say(f"memory ({name}): {mine:.0f} MiB vs fairscale {fair_mib:.0f} MiB per rank ({verdict})")
    if "breakdown fairscale" in impls:
        say("fairscale breakdown (instrumented pass):")
        print_phases(impls["breakdown fairscale"]["ms"], impls["fairscale"]["ms"]["total"])
    if case["refusal"]:
        say(
            f"dropless all-to-one, max_tokens_per_expert={case['refusal']['max_tokens_per_expert']}: "
            f"{'refused' if case['refusal']['error'] else 'NOT refused'}"
        )
    say(
        "ru_maxrss per rank (whole process so far): "
        f"{' '.join(f'{v:.0f}' for v in case['ru_maxrss_mib'])} MiB"
    )


def print_overlap(args: argparse.Namespace, case: dict) -> None:
    """Per setting and chunk count: step time, the exchange time left exposed, the rest, against the first."""
    impls = case["impls"]
    say(f"\noverlap (ExecutionConfig.exchange_chunks; ms, slowest rank, median of {args.steps} rounds):")
    say(f"{'':<30} {'total':>8} {'exchange':>9} {'rest':>8} {'x first':>8} {'paired':>8}")
    for name in case["layers"]:
        first = impls.get(f"layer {name}")
        for chunks in args.chunks:
            key = f"layer {name}" + (f" chunks {chunks}" if chunks != args.chunks[0] else "")
            result = impls.get(key)
            if not (result and first):
                continue
            ms = result["ms"]
            paired = statistics.median(a / b for a, b in zip(result["per_round_ms"], first["per_round_ms"]))
            say(
                f"{name + f' chunks {chunks}':<30} {ms['total']:8.1f} {ms['exchange']:9.1f} "
                f"{ms['total'] - ms['exchange']:8.1f} {ms['total'] / first['ms']['total']:8.3f} {paired:8.3f}"
            )


def print_variants(args: argparse.Namespace, case: dict) -> None:
    """The variants' table: ms, exchange ms, faults, x its floor and x the layer of record, with ranges."""

    def ratio(r: dict | None) -> str:
        return f"{r['median']:.3f} [{r['min']:.2f}-{r['max']:.2f}]" if r else ""

    say(
        f"\nvariants (ms: slowest rank, median of {args.steps} rounds; ratios: median of the "
        "per-round ratios [min-max]; sys: kernel CPU ms, faults: minor page faults per step, slowest rank):"
    )
    width = max(len(key) for key in case["variants"]) if case["variants"] else 0
    say(
        f"{'':<{width}} {'total':>8} {'exchange':>9} {'sys':>7} {'faults':>8} {'x its floor':>19} "
        f"{'cpu x floor':>19} {'x record':>19} {'cpu x record':>19}"
    )
    for key, row in case["variants"].items():
        exchange = f"{row['exchange_ms']:9.1f}" if row["exchange_ms"] is not None else f"{'':>9}"
        say(
            f"{key:<{width}} {row['ms']:8.1f} {exchange} {row['sys_ms']:7.1f} {row['minor_faults']:8.0f} "
            f"{ratio(row['x floor']):>19} {ratio(row['x floor (cpu)']):>19} {ratio(row['x record']):>19} "
            f"{ratio(row['x record (cpu)']):>19}"
        )
    for key, seconds in case["compile_seconds"].items():
        say(f"{key}: first step {seconds:.1f} s (compilation, untimed)")


def print_phases(phases: dict[str, float], total_ms: float) -> None:
    for phase in PHASES:
        fwd, bwd = phases[f"{phase} fwd"], phases[f"{phase} bwd"]
        say(f"  {phase:<12} {fwd:9.1f} {bwd:9.1f} {fwd + bwd:9.1f} {100 * (fwd + bwd) / total_ms:7.1f}%")
    total = sum(phases[f"{phase} {way}"] for phase in PHASES for way in ("fwd", "bwd"))
    say(
        f"  {'sum':<12} {'':9} {'':9} {total:9.1f} {100 * total / total_ms:7.1f}%   (measured {total_ms:.1f})"
    )


def print_setting(name: str, outcome: dict, impls: dict) -> None:
    layer, floor, breakdown = (
        impls.get(f"layer {name}"),
        impls.get(f"floor {name}"),
        impls.get(f"breakdown {name}"),
    )
    say(f"\n== {name} ==   (ms: slowest rank per step, median over steps)")
    say(f"{'':<14} {'fwd':>9} {'bwd':>9} {'total':>9} {'% layer':>8} {'cpu':>9}")
    rows = [("layer", layer), ("floor", floor), ("floor_a2a", impls.get(f"floor_a2a {name}"))]
    for label, result in rows:
        if result:
            row = result["ms"]
            say(
                f"{label:<14} {row['fwd']:9.1f} {row['bwd']:9.1f} {row['total']:9.1f} "
                f"{'':>8} {row['cpu']:9.1f}"
            )
    if "layer / floor" in outcome:
        ratio = outcome["layer / floor"]
        verdict = "meets" if ratio <= GOALS["layer / floor"] else "MISSES"
        say(
            f"ratio layer / floor {ratio:.3f} ({verdict} the <= {GOALS['layer / floor']} goal); "
            f"median of the per-round ratios {outcome['layer / floor paired median']:.3f}; "
            f"per round {' '.join(f'{r:.2f}' for r in outcome['layer / floor per round'])}"
        )
        say(
            f"cpu time layer / floor {outcome['layer / floor (cpu)']:.3f}; per round "
            f"{' '.join(f'{r:.2f}' for r in outcome['layer / floor (cpu) per round'])}"
        )
    if breakdown and layer:
        say("breakdown (instrumented pass):")
        print_phases(breakdown["ms"], layer["ms"]["total"])
    for rank, rows in enumerate(outcome["rows_computed"]):
        work = outcome.get("rank_work_ms")
        say(
            f"rank {rank}: S {rows:.0f} rows computed, {outcome['rows_sent_to_other_ranks'][rank]:.0f} "
            f"sent to other ranks per step"
            + (f", own work {work[rank]:.1f} ms" if work else "")
            + (
                f", step peak {layer['step_peak_mib'][rank]:.0f} MiB"
                if layer and layer["step_peak_mib"]
                else ""
            )
        )
    say(
        f"dropped {outcome['dropped_fraction']:.2%} of assignments (all ranks)"
        + (
            f"; slowest / mean rank work {outcome['slowest / mean rank']:.2f}"
            if "slowest / mean rank" in outcome
            else ""
        )
    )
    if "exchange" in outcome:
        ex = outcome["exchange"]
        say(
            f"all-to-all: {statistics.mean(ex['bytes_per_rank_per_step']) / 2**20:.1f} MiB per rank per step "
            f"to other ranks in {ex['layer_seconds'] * 1e3:.1f} ms = {ex['layer_gb_per_s']:.2f} GB/s; "
            f"plain all_to_all_single {ex['plain_gb_per_s']:.2f} GB/s (even, to other ranks), "
            f"{ex['plain_same_splits_gb_per_s']:.2f} GB/s (the layer's splits, its own rows included); "
            f"efficiency {ex['efficiency']:.2f}, {ex['efficiency_same_splits']:.2f}"
        )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.malloc == ["tuned"]:
        allocator = keep_freed_memory()
    elif args.malloc == ["default"]:
        allocator = "glibc malloc as it is (dynamic thresholds until the first memory pass)"
    else:
        allocator = (
            f"alternated each round: {', '.join(args.malloc)} (default = glibc's initial values, "
            "fixed: M_MMAP_MAX 65536, M_MMAP_THRESHOLD and M_TRIM_THRESHOLD 128 KiB)"
        )
    # gloo even where CUDA is present: this benchmark measures CPU ranks.
    ep.init_distributed(backend="gloo")
    torch.set_num_threads(args.threads)
    with shutdown_after():
        start = time.perf_counter()
        info = machine()
        say(
            f"CPU {info['cpu']} ({info['cpu_capability']}, {info['cores']} logical cores), "
            f"torch {info['torch']}, "
            f"{info['world_size']} gloo rank(s) x {info['threads_per_rank']} thread(s), "
            f"load average {' '.join(f'{v:.2f}' for v in info['load_average'])}"
        )
        say(
            f"D {args.d_model}, relu experts with biases, fp32"
            f"{' and bf16 autocast' if args.dtype == 'bf16' else ''}, gemm {args.gemm}; "
            f"impls {','.join(args.impls)}; dispatch {','.join(args.dispatch)}; "
            f"chunks {','.join(map(str, args.chunks))}; compile {args.compile or 'no'}; "
            f"capacity {','.join(setting_name(f) for f in args.capacity)}; "
            f"{args.warmup} warmup + {args.steps} timed rounds"
        )
        say(f"allocator: {allocator}")
        info["allocator"] = allocator
        cases = []
        for tokens, experts, hidden, top_k in shapes(args):
            for skew in args.skew:
                say(f"\n[T {tokens}, E {experts}, H {hidden}, top-{top_k}, skew {skew}]")
                case = run_case(args, tokens, experts, hidden, top_k, skew)
                cases.append(case)
                gc.collect()
        for case in cases:
            print_case(args, case)
        info["load_average_end"] = list(psutil.getloadavg())
        say(
            f"\nbenchmark took {time.perf_counter() - start:.1f} s; load average at the end "
            f"{' '.join(f'{v:.2f}' for v in info['load_average_end'])}"
        )
        if args.json and dist.get_rank() == 0:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            report = {
                "machine": info,
                "argv": argv,
                "args": {**vars(args), "json": str(args.json)},
                "cases": cases,
            }
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
