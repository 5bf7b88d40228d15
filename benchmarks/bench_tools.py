"""Measuring helpers for benchmarks.bench: phase clocks, memory sampling, the allocator, forced routing.

Legend: T tokens on this rank, E experts, K top-k.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

SKEWS = ("router", "uniform", "zipf", "one")
REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        with open("/proc/cpuinfo") as handle:
            models = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    except OSError:
        models = []
    return models[0] if models else "unknown"


def machine() -> dict:
    """What the figures were measured on: CPU model, torch's CPU capability, cores."""
    return {
        "cpu": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
    }


def torchrun_result(world: int, module_args: list[str], what: str) -> object:
    """Run `python -m <module_args>` on `world` torchrun ranks; the JSON after its rank 0's "RESULT ".

    A job that fails, or prints no result, ends the benchmark naming `what` and quoting its output.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([*cmd, "-m", *module_args], cwd=REPO, capture_output=True, text=True, env=env)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode or line is None:
        raise SystemExit(f"{what} on {world} ranks failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


class PhaseTape:
    """Times a forward phase by phase, then its backward phase by phase in reverse order.

    Each phase runs on detached copies of its inputs (`cut`), so that its
    backward can be run and timed on its own, handing each gradient on by
    hand. A barrier (untimed) precedes each all-to-all phase, so that waiting
    for a slower peer is charged to no phase: a rank's sum of phases is its
    own work. `also` adds a phase's seconds to a second key as well.
    """

    def __init__(self, phases: tuple[str, ...], group=None, exchange_clock=None):
        self.seconds = {f"{phase} {way}": 0.0 for phase in phases for way in ("fwd", "bwd")}
        self.group = group
        self.exchange_clock = exchange_clock  # a layer's comm.ExchangeClock, or None
        self._tape = []  # (phase, barrier, also, outputs, their detached leaves), in forward order

    @contextmanager
    def clock(self, phase: str, way: str = "fwd", barrier: bool = False, also: str | None = None):
        """Time a phase. With an exchange clock, the seconds it saw inside another phase's
        collectives move to "all-to-all" and "exchange" (a dispatcher call holds both)."""
        if barrier:
            dist.barrier(self.group)
        in_collectives = self.exchange_clock.seconds if self.exchange_clock is not None else 0.0
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        if self.exchange_clock is not None and phase != "all-to-all":
            moved = self.exchange_clock.seconds - in_collectives
            seconds -= moved
            for key in (f"all-to-all {way}", f"exchange {way}"):
                self.seconds[key] = self.seconds.get(key, 0.0) + moved
        self.seconds[f"{phase} {way}"] += seconds
        if also is not None:
            self.seconds[f"{also} {way}"] = self.seconds.get(f"{also} {way}", 0.0) + seconds

    def cut(self, phase: str, *outputs: torch.Tensor, barrier: bool = False, also: str | None = None):
        leaves = tuple(t.detach().requires_grad_(t.requires_grad) for t in outputs)
        self._tape.append((phase, barrier, also, outputs, leaves))
        return leaves if len(leaves) > 1 else leaves[0]

    def backward(self, loss: torch.Tensor) -> dict[str, float]:
        """Run the backward of every phase, last first; returns seconds per "<phase> fwd|bwd"."""
        self._tape.append(("loss", False, None, (loss,), ()))
        for phase, barrier, also, outputs, leaves in reversed(self._tape):
            if not leaves:
                pairs = [(output, None) for output in outputs]
            else:
                pairs = [(o, leaf.grad) for o, leaf in zip(outputs, leaves) if leaf.grad is not None]
            with self.clock(phase, "bwd", barrier, also):
                if pairs:
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs] if leaves else None)
        self._tape.clear()
        return self.seconds


@contextmanager
def rss_peak(interval_s: float = 0.0005) -> Iterator[dict]:
    """Samples this process's RSS on a thread while the block runs: yields {"before", "peak"} bytes.

    Meaningful only while freed memory leaves the process (return_freed_memory):
    otherwise a block reuses what an earlier one left and shows no growth.
    """
    process, done, result = psutil.Process(), threading.Event(), {}
    result["before"] = result["peak"] = process.memory_info().rss

    def sample() -> None:
        while not done.is_set():
            result["peak"] = max(result["peak"], process.memory_info().rss)
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result["peak"] = max(result["peak"], process.memory_info().rss)


def timed_step(forward: Callable[[], torch.Tensor], drop: tuple) -> Callable[[], dict[str, float]]:
    """A step that runs `forward()` to a scalar loss and its backward, timing each; then drops the
    gradients of `drop` (modules: zero_grad(set_to_none=True); tensors: .grad = None)."""

    def step() -> dict[str, float]:
        start = time.perf_counter()
        loss = forward()
        middle = time.perf_counter()
        loss.backward()
        seconds = {"fwd": middle - start, "bwd": time.perf_counter() - middle}
        for item in drop:
            if isinstance(item, torch.nn.Module):
                item.zero_grad(set_to_none=True)
            else:
                item.grad = None
        return seconds

    return step


def forced_expert_ids(skew: str, tokens: int, num_experts: int, top_k: int, generator) -> torch.Tensor | None:
    """[T, K] distinct expert ids per token for a skewed load, or None for the router's own choice.

    uniform: K distinct experts uniformly at random.
    zipf: K distinct experts drawn without replacement with P(expert i) ∝ 1 / (i + 1) (Zipf, s = 1).
    one: every token's first choice is expert 0, its others experts 1 .. K-1
        (with E / P ≥ K local experts, all on rank 0): all-to-one.
    """
    if skew == "router":
        return None
    if skew == "one":
        return torch.arange(top_k).expand(tokens, top_k).clone()
    if skew == "uniform":
        weights_E = torch.ones(num_experts)
    elif skew == "zipf":
        weights_E = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64)
    else:
        raise ValueError(f"skew {skew!r}: expected one of {SKEWS}")
    if tokens == 0:
        return torch.empty(0, top_k, dtype=torch.long)
    return torch.multinomial(weights_E.expand(tokens, num_experts), top_k, generator=generator)


def plain_all_to_all_seconds(
    send_splits: list[int], recv_splits: list[int], group=None, repeats: int = 5
) -> float:
    """Median seconds of one all_to_all_single of fp32 with these splits (elements per rank):
    the slowest rank's, after a barrier."""
    send, recv = torch.ones(sum(send_splits)), torch.empty(sum(recv_splits))
    times = []
    for _ in range(repeats + 1):
        dist.barrier(group)
        start = time.perf_counter()
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
        seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX, group=group)
        times.append(float(seconds))
    return statistics.median(times[1:])


def even_splits(elements: int, group=None) -> list[int]:
    """`elements` spread evenly over the other ranks of the group, none to this rank."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    per_peer = math.ceil(elements / max(size - 1, 1))
    return [0 if peer == rank else per_peer for peer in range(size)]
