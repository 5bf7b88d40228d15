"""The chunked, overlapped exchange (MoEConfig.exchange_chunks) on real ranks; tests/test_overlap.py runs it.

- For every chunk count from 1 to one past the local expert count, the
  layer's outputs, input gradient, aux loss, statistics and every parameter's
  gradient are bitwise equal to those with exchange_chunks=1: dropless and
  with drops, relu with biases and swiglu without, a rank with no tokens,
  experts that receive no rows, redundant experts (a placement).
- Three SGD steps with 3 chunks leave parameters bitwise equal to 3 steps with 1.
- Forward under no_grad works and equals the graph-building forward.
- The pipeline order, from a trace of the exchanges: chunk c's experts run
  while chunk c + 1's rows travel (forward) and while chunk c - 1's
  gradient travels (backward): the overlap, shown without timing anything.
- Chunking sends the same rows: rows_sent_to_other_ranks is the same.

Usage: overlap_checks.py
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ep_checks import Checks  # noqa: E402

import expert_parallel as ep  # noqa: E402
from expert_parallel import comm  # noqa: E402
from expert_parallel.placement import balance  # noqa: E402


def step(layer: ep.MoELayer, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward + backward; everything that must not depend on the chunk count."""
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    ((out * upstream).sum() + layer.aux_loss).backward()
    results = {
        "output": out.detach(),
        "input grad": x.grad,
        "aux loss": layer.aux_loss.detach(),
        "tokens per expert": layer.stats.tokens_per_expert,
        "rows sent to other ranks": torch.tensor(layer.stats.rows_sent_to_other_ranks),
    }
    layer.sync_replica_grads()
    for name, param in layer.named_parameters():
        results[f"grad {name}"] = param.grad.clone()
    layer.zero_grad(set_to_none=True)
    return results


def check_chunk_counts_bitwise_equal(
    checks: Checks, name: str, config, num_tokens, forced=None, placement=None
):
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(num_tokens, config.d_model, generator=gen)
    upstream = torch.randn(num_tokens, config.d_out, generator=gen)
    runs = {}
    local_experts = (
        config.num_experts // world if placement is None else placement.physical_to_logical.shape[1]
    )
    for chunks in range(1, local_experts + 2):
        torch.manual_seed(7)
        layer = ep.MoELayer(replace(config, exchange_chunks=chunks), dist.group.WORLD, placement=placement)
        layer.forced_expert_ids = forced
        runs[chunks] = step(layer, x, upstream)
    for chunks, results in runs.items():
        for key, value in results.items():
            checks.equal(f"{name}: {chunks} chunks, {key}", value, runs[1][key])
    checks.true(f"{name}: the check ran on {local_experts} local experts", local_experts >= 2)


def check_training_steps(checks: Checks) -> None:
    rank = dist.get_rank()
    config = ep.MoEConfig(d_model=16, d_hidden=24, num_experts=4 * dist.get_world_size(), top_k=2)
    final = {}
    for chunks in (1, 3):
        torch.manual_seed(11)
        layer = ep.MoELayer(replace(config, exchange_chunks=chunks), dist.group.WORLD)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(200 + rank)
        for _ in range(3):
            x = torch.randn(40, config.d_model, generator=gen)
            (layer(x).square().mean() + layer.aux_loss).backward()
            for param in layer.router.parameters():  # the router saw only this rank's tokens
                dist.all_reduce(param.grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        final[chunks] = {name: p.detach().clone() for name, p in layer.named_parameters()}
    for name, value in final[3].items():
        checks.equal(f"3 SGD steps, 3 chunks vs 1: {name}", value, final[1][name])


def check_no_grad(checks: Checks) -> None:
    rank = dist.get_rank()
    config = ep.MoEConfig(d_model=8, d_hidden=8, num_experts=4 * dist.get_world_size(), exchange_chunks=4)
    torch.manual_seed(3)
    layer = ep.MoELayer(config, dist.group.WORLD)
    x = torch.randn(30 + rank, 8, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        quiet = layer(x)
    checks.equal("no_grad forward, 4 chunks", quiet, layer(x).detach())


def check_pipeline_order(checks: Checks) -> None:
    """The exchanges start and finish in the pipelined order, forward and backward.

    Forward: every chunk's dispatch starts before chunk 0's experts run, and
    chunk c's experts run before chunk c + 1's dispatch is waited for.
    Backward: chunk c's expert backward (whose end launches chunk c's reverse
    dispatch) runs while chunk c - 1's reverse combine is in flight.
    """
    events = []
    launch, wait = comm.Exchange.launch, comm.Exchange.wait
    names = {}

    def name(exchange) -> str:
        kind = exchange.what
        names.setdefault(id(exchange), f"{kind} {sum(1 for n in names.values() if n.startswith(kind))}")
        return names[id(exchange)]

    def traced_launch(self, out, x, output_splits, input_splits, way):
        events.append(f"launch {name(self)} {way}")
        return launch(self, out, x, output_splits, input_splits, way)

    def traced_wait(self, way):
        events.append(f"wait {name(self)} {way}")
        return wait(self, way)

    config = ep.MoEConfig(d_model=8, d_hidden=8, num_experts=3 * dist.get_world_size(), exchange_chunks=3)
    torch.manual_seed(4)
    layer = ep.MoELayer(config, dist.group.WORLD)
    layer.experts.register_forward_pre_hook(lambda *_: events.append("experts"))
    comm.Exchange.launch, comm.Exchange.wait = traced_launch, traced_wait
    try:
        x = torch.randn(24, 8, generator=torch.Generator().manual_seed(dist.get_rank()), requires_grad=True)
        layer(x).sum().backward()
    finally:
        comm.Exchange.launch, comm.Exchange.wait = launch, wait
    at = events.index
    forward = all(at(f"launch dispatch {c} forward") < at("experts") for c in range(3)) and all(
        [i for i, e in enumerate(events) if e == "experts"][c] < at(f"wait dispatch {c + 1} forward")
        for c in range(2)
    )
    checks.true(
        "forward: dispatches start first, chunk c computes before chunk c+1 arrives", forward, str(events)
    )
    backward = all(
        at(f"launch combine {c - 1} backward")
        < at(f"launch dispatch {c} backward")
        < at(f"wait combine {c - 1} backward")
        for c in (1, 2)
    )
    checks.true("backward: chunk c's experts run while chunk c-1's gradient travels", backward, str(events))


def main() -> int:
    with ep.distributed(timeout=timedelta(seconds=60)):
        rank, world = dist.get_rank(), dist.get_world_size()
        checks = Checks()
        try:
            base = ep.MoEConfig(d_model=16, d_hidden=32, num_experts=4 * world, top_k=2)
            tokens = 37 + 13 * rank
            # Half the experts get no rows at all: every rank sends only to even experts.
            scores = torch.rand(tokens, 2 * world, generator=torch.Generator().manual_seed(rank))
            even_only = 2 * scores.argsort(dim=1)[:, :2]
            cases = [
                ("dropless relu", base, tokens, None, None),
                (
                    "capacity 1.0 swiglu no bias",
                    replace(base, capacity_factor=1.0, min_capacity=1, activation="swiglu", bias=False),
                    tokens,
                    None,
                    None,
                ),
                ("rank 1 has no tokens", base, 0 if rank == 1 else tokens, None, None),
                ("experts with no rows", base, tokens, even_only, None),
                (
                    "top-3 with replicas",
                    replace(base, top_k=3),
                    tokens,
                    None,
                    balance(1.0 / torch.arange(1.0, 4 * world + 1), world, world),
                ),
            ]
            for name, config, num_tokens, forced, placement in cases:
                if forced is not None and num_tokens != forced.shape[0]:
                    forced = None
                check_chunk_counts_bitwise_equal(checks, name, config, num_tokens, forced, placement)
            check_training_steps(checks)
            check_no_grad(checks)
            check_pipeline_order(checks)
            return checks.verdict(rank)
        except Exception:
            traceback.print_exc()
            return 1


if __name__ == "__main__":
    sys.exit(main())
