"""torch.compile of the layer under expert parallelism on 2 gloo ranks.

The count exchange, the token all-to-alls and the expert GEMMs between them
take host split sizes that change every step, so they run eagerly between
two graphs: one graph break per forward (the goal is at most 4), and one
more for the global-batch count sum. Backend "aot_eager", as in test_compile.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from rankpool import on_ranks
from torch._dynamo.utils import counters

import expert_parallel as ep


def _layer(scope: str, capacity_factor, dispatch: str) -> ep.MoELayer:
    config = ep.MoEConfig(
        d_model=16,
        d_hidden=32,
        num_experts=4 * dist.get_world_size(),
        top_k=2,
        capacity_factor=capacity_factor,
        aux_loss_scope=scope,
    )
    torch.manual_seed(0)
    return ep.MoELayer(config, dist.group.WORLD, execution=ep.ExecutionConfig(dispatch=dispatch))


def _tokens(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * dist.get_rank() + step)
    return torch.randn(40 + 8 * dist.get_rank(), 16, generator=generator).requires_grad_()


@pytest.mark.parametrize(
    "scope, breaks", [("micro_batch", 1), ("global_batch", 2)], ids=["micro_batch", "global_batch"]
)
@pytest.mark.parametrize("dispatch", ["per_assignment", "once_per_rank"])
@on_ranks(2)
def test_graph_breaks_per_forward(dispatch, scope, breaks):
    layer = _layer(scope, None, dispatch)
    torch._dynamo.reset()
    counters.clear()
    torch.compile(layer, backend="aot_eager")(_tokens(0))
    assert sum(counters["graph_break"].values()) == breaks  # every frame's, resumed ones too


@pytest.mark.parametrize("capacity_factor", [None, 1.25], ids=["dropless", "capacity"])
@on_ranks(2)
def test_compiled_equals_eager_and_never_recompiles(capacity_factor):
    layer = _layer("global_batch", capacity_factor, "per_assignment")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, backend="aot_eager")
    for step in range(20):
        x = _tokens(step)
        results = []
        for call in (compiled, layer):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            out = call(x)
            (out.out.square().sum() + out.aux_loss).backward()
            grads = [p.grad.clone() for p in layer.parameters()]
            results.append([out.out.detach(), out.aux_loss.detach(), x.grad.clone(), *grads])
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if step == 0:
            graphs_after_first = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs_after_first
    assert not counters["recompiles"]
