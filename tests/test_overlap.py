"""The chunked, overlapped exchange (ExecutionConfig.exchange_chunks) on real gloo ranks.

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
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from asserts import assert_equal
from rankpool import on_ranks

import expert_parallel as ep
from expert_parallel import comm
from expert_parallel.placement import balance


def chunked(chunks: int) -> ep.ExecutionConfig:
    return ep.ExecutionConfig(exchange_chunks=chunks)


def step(layer: ep.MoELayer, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward + backward; everything that must not depend on the chunk count."""
    x = x.detach().clone().requires_grad_(True)
    out, aux_loss, stats = layer(x)
    ((out * upstream).sum() + aux_loss).backward()
    results = {
        "output": out.detach(),
        "input grad": x.grad,
        "aux loss": aux_loss.detach(),
        "tokens per expert": stats.tokens_per_expert,
        "choices per expert": stats.choices_per_expert,
        "dropped": stats.num_dropped,
        "rows sent to other ranks": stats.rows_sent_to_other_ranks,
    }
    layer.sync_replica_grads()
    for name, param in layer.named_parameters():
        results[f"grad {name}"] = param.grad.clone()
    layer.zero_grad(set_to_none=True)
    return results


BASE = dict(d_model=16, d_hidden=32, top_k=2)
CASES = (
    "dropless-relu",
    "capacity1-swiglu-nobias",
    "rank1-no-tokens",
    "experts-with-no-rows",
    "top3-replicas",
)


@pytest.mark.parametrize("case", CASES)
@on_ranks(2, 4)
def test_any_chunk_count_is_bitwise_equal(case):
    rank, world = dist.get_rank(), dist.get_world_size()
    config = ep.MoEConfig(**BASE, num_experts=4 * world)
    num_tokens, forced, placement = 37 + 13 * rank, None, None
    if case == "capacity1-swiglu-nobias":
        config = replace(config, capacity_factor=1.0, min_capacity=1, activation="swiglu", bias=False)
    elif case == "rank1-no-tokens":
        num_tokens = 0 if rank == 1 else num_tokens
    elif case == "experts-with-no-rows":  # half the experts get no rows: every rank sends only to even ones
        scores = torch.rand(num_tokens, 2 * world, generator=torch.Generator().manual_seed(rank))
        forced = 2 * scores.argsort(dim=1)[:, :2]
    elif case == "top3-replicas":
        config = replace(config, top_k=3)
        placement = balance(1.0 / torch.arange(1.0, 4 * world + 1), world, world)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(num_tokens, config.d_model, generator=gen)
    upstream = torch.randn(num_tokens, config.d_out, generator=gen)
    local_experts = (
        config.num_experts // world if placement is None else placement.physical_to_logical.shape[1]
    )
    assert local_experts >= 2
    runs = {}
    for chunks in range(1, local_experts + 2):
        torch.manual_seed(7)
        layer = ep.MoELayer(config, dist.group.WORLD, execution=chunked(chunks), placement=placement)
        layer.forced_expert_ids = forced
        runs[chunks] = step(layer, x, upstream)
    if case == "experts-with-no-rows":
        assert int(runs[1]["tokens per expert"][1::2].sum()) == 0
    for chunks, results in runs.items():
        for key, value in results.items():
            assert_equal(f"{chunks} chunks, {key}", value, runs[1][key])


@on_ranks(2, 4)
def test_training_steps_with_chunks_are_bitwise_equal():
    rank = dist.get_rank()
    config = ep.MoEConfig(d_model=16, d_hidden=24, num_experts=4 * dist.get_world_size(), top_k=2)
    final = {}
    for chunks in (1, 3):
        torch.manual_seed(11)
        layer = ep.MoELayer(config, dist.group.WORLD, execution=chunked(chunks))
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(200 + rank)
        for _ in range(3):
            x = torch.randn(40, config.d_model, generator=gen)
            out, aux_loss, _ = layer(x)
            (out.square().mean() + aux_loss).backward()
            for param in layer.router.parameters():  # the router saw only this rank's tokens
                dist.all_reduce(param.grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        final[chunks] = {name: p.detach().clone() for name, p in layer.named_parameters()}
    for name, value in final[3].items():
        assert_equal(f"3 SGD steps, 3 chunks vs 1: {name}", value, final[1][name])


@on_ranks(2, 4)
def test_no_grad_forward_with_chunks():
    rank = dist.get_rank()
    config = ep.MoEConfig(d_model=8, d_hidden=8, num_experts=4 * dist.get_world_size())
    torch.manual_seed(3)
    layer = ep.MoELayer(config, dist.group.WORLD, execution=chunked(4))
    x = torch.randn(30 + rank, 8, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        quiet = layer(x).out
    assert_equal("no_grad forward, 4 chunks", quiet, layer(x).out.detach())


@on_ranks(2, 4)
def test_pipeline_order():
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

    config = ep.MoEConfig(d_model=8, d_hidden=8, num_experts=3 * dist.get_world_size())
    torch.manual_seed(4)
    layer = ep.MoELayer(config, dist.group.WORLD, execution=chunked(3))
    layer.experts.register_forward_pre_hook(lambda *_: events.append("experts"))
    comm.Exchange.launch, comm.Exchange.wait = traced_launch, traced_wait
    try:
        x = torch.randn(24, 8, generator=torch.Generator().manual_seed(dist.get_rank()), requires_grad=True)
        layer(x).out.sum().backward()
    finally:
        comm.Exchange.launch, comm.Exchange.wait = launch, wait
    at = events.index
    experts_at = [i for i, e in enumerate(events) if e == "experts"]
    assert len(experts_at) == 3, events
    forward = all(at(f"launch dispatch {c} forward") < experts_at[0] for c in range(3)) and all(
        experts_at[c] < at(f"wait dispatch {c + 1} forward") for c in range(2)
    )
    assert forward, f"forward: dispatches start first, chunk c computes before chunk c+1 arrives: {events}"
    backward = all(
        at(f"launch combine {c - 1} backward")
        < at(f"launch dispatch {c} backward")
        < at(f"wait combine {c - 1} backward")
        for c in (1, 2)
    )
    assert backward, f"backward: chunk c's experts run while chunk c-1's gradient travels: {events}"
