"""torch.compile of the layer on one process: graph breaks, recompiles, and outputs equal to eager.

Graph breaks and recompiles are dynamo's, whatever the backend, so most tests
compile with "aot_eager" (traced forward and backward, no code generation:
seconds). One test runs inductor, which fuses and so reorders sums: equal to
eager to 1e-5. The 2-rank counts are in test_compile_ep.py.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import expert_parallel as ep

CAPACITY = ep.MoEConfig(d_model=16, d_hidden=32, num_experts=4, top_k=2, capacity_factor=1.25, min_capacity=1)
DROPLESS = ep.MoEConfig(d_model=16, d_hidden=32, num_experts=4, top_k=2)


def _layer(config: ep.MoEConfig) -> ep.MoELayer:
    torch.manual_seed(0)
    return ep.MoELayer(config)


def _tokens(step: int, num_tokens: int = 48) -> torch.Tensor:
    return torch.randn(num_tokens, 16, generator=torch.Generator().manual_seed(step)).requires_grad_()


def _graph_breaks(layer: ep.MoELayer, x: torch.Tensor) -> int:
    """Graph breaks dynamo records while compiling one forward (every frame, resumed ones too)."""
    torch._dynamo.reset()
    counters.clear()
    torch.compile(layer, backend="aot_eager")(x)
    return sum(counters["graph_break"].values())


def test_capacity_compiles_to_one_graph_with_fullgraph():
    layer = _layer(CAPACITY)
    assert _graph_breaks(layer, _tokens(0)) == 0
    torch._dynamo.reset()
    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(_tokens(0))  # raises on any break
    assert out.out.shape == (48, 16) and out.stats.capacity == CAPACITY.capacity(48)


def test_dropless_breaks_once_for_the_experts_host_sizes():
    # The goal is at most 2; the one break is the eager island around the per-expert GEMMs.
    assert _graph_breaks(_layer(DROPLESS), _tokens(0)) == 1


@pytest.mark.parametrize("config", [CAPACITY, DROPLESS], ids=["capacity", "dropless"])
def test_no_recompiles_over_twenty_steps_with_the_same_token_count(config):
    layer = _layer(config)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, backend="aot_eager")
    for step in range(20):
        out = compiled(_tokens(step))
        (out.out.square().sum() + out.aux_loss).backward()
        if step == 0:
            frames_after_first = counters["stats"]["unique_graphs"]
    assert frames_after_first >= 1
    assert counters["stats"]["unique_graphs"] == frames_after_first
    assert not counters["recompiles"]


def _outputs_and_grads(layer: ep.MoELayer, call, x: torch.Tensor) -> dict[str, torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = call(x)
    (out.out.square().sum() + out.aux_loss).backward()
    results = {"out": out.out.detach(), "aux": out.aux_loss.detach(), "x.grad": x.grad}
    results["tokens_per_expert"] = out.stats.tokens_per_expert
    results.update({f"{n}.grad": p.grad for n, p in layer.named_parameters()})
    return results


def _assert_close(got: dict, want: dict, tolerance: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=tolerance, atol=tolerance, msg=name)


@pytest.mark.parametrize("config", [CAPACITY, DROPLESS], ids=["capacity", "dropless"])
def test_compiled_equals_eager_aot_eager(config):
    layer = _layer(config)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager")
    x = _tokens(3)
    _assert_close(_outputs_and_grads(layer, compiled, x), _outputs_and_grads(layer, layer, x), 1e-5)


@pytest.mark.slow
def test_compiled_equals_eager_inductor():
    """Inductor's fused kernels reorder sums: outputs and gradients equal to 1e-5 (capacity, one graph)."""
    layer = _layer(CAPACITY)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    x = _tokens(4)
    _assert_close(_outputs_and_grads(layer, compiled, x), _outputs_and_grads(layer, layer, x), 1e-5)


def test_compiled_forward_writes_nothing_to_the_layer():
    layer = _layer(DROPLESS)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager")  # marks the layer as compiled
    before = dict(vars(layer))
    compiled(_tokens(5))
    assert vars(layer).keys() == before.keys()
    assert all(vars(layer)[k] is v for k, v in before.items() if k != "_decisions")
    assert len(layer._decisions) == 0  # no recompute bookkeeping inside the graph
