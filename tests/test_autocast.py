"""bf16 autocast: the router stays in fp32 and chooses what fp32 chooses; tokens and experts run in bf16,
and under expert parallelism the rows travel in bf16.

Kept tiny: on an AVX2-only CPU a bf16 GEMM runs about 100x slower than fp32.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from asserts import assert_close
from rankpool import on_ranks
from torch import nn

import expert_parallel as ep
from expert_parallel.parallel import shard_experts
from expert_parallel.router import route

CONFIG = ep.MoEConfig(d_model=16, d_hidden=32, num_experts=4, top_k=2, activation="swiglu")


def near_tied_layer_and_tokens() -> tuple[ep.MoELayer, torch.Tensor]:
    """A router whose experts 0 and 1 (and 2 and 3) differ by ~1e-4 in logit: below bf16's resolution."""
    torch.manual_seed(0)
    layer = ep.MoELayer(CONFIG)
    x = torch.randn(64, 16)
    with torch.no_grad():
        base = torch.randn(2, 16)
        tiny = torch.randn(2, 16) * 1e-4
        layer.router.weight.copy_(torch.stack([base[0], base[0] + tiny[0], base[1], base[1] + tiny[1]]))
        layer.router.bias.zero_()
    return layer, x


def test_near_ties_choose_the_same_experts_under_autocast():
    layer, x = near_tied_layer_and_tokens()
    fp32_ids = route(layer._router_logits(x), CONFIG).expert_ids
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_logits = layer._router_logits(x)
    assert autocast_logits.dtype == torch.float32
    assert torch.equal(route(autocast_logits, CONFIG).expert_ids, fp32_ids)
    # The check can fail: a bf16 router flips some of these near-ties.
    bf16_logits = F.linear(x.bfloat16(), layer.router.weight.bfloat16()).float()
    assert not torch.equal(route(bf16_logits, CONFIG).expert_ids, fp32_ids)


def test_under_autocast_the_layer_runs_bf16_close_to_fp32_with_fp32_gradients():
    layer, x = near_tied_layer_and_tokens()
    upstream = torch.randn(64, 16)
    x32 = x.clone().requires_grad_(True)
    out32, _, stats32 = layer(x32)
    (out32 * upstream).sum().backward()
    grads32 = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()

    x16 = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, _, stats16 = layer(x16)
        (out16.float() * upstream).sum().backward()
    assert out16.dtype == torch.bfloat16
    assert torch.equal(stats16.tokens_per_expert, stats32.tokens_per_expert)  # the same choices
    scale = out32.abs().max()
    assert (out16.float() - out32).abs().max() / scale < 2e-2
    for name, param in layer.named_parameters():
        assert param.grad.dtype == torch.float32, name
        relative = (param.grad - grads32[name]).norm() / grads32[name].norm()
        assert relative < 5e-2, f"{name}: relative gradient difference {relative:.3g}"
    assert (x16.grad.float() - x32.grad).norm() / x32.grad.norm() < 5e-2


@on_ranks(2)
def test_under_autocast_the_rows_travel_in_bf16_and_expert_parallel_equals_one_process():
    """The rows are cast once, after the router (the GEMMs would cast them anyway): every exchange
    of rows carries bf16, half the bytes, and the sharded layer computes what one process computes
    over both ranks' tokens: the bf16 output, the fp32 gradients."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    one = nn.ModuleDict({"moe": ep.MoELayer(CONFIG)})
    two = copy.deepcopy(one)
    shard_experts(two, dist.group.WORLD)
    inputs = [torch.randn(2, 40 + 3 * r, 16, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    mine = slice(sum(len(x) for x, _ in inputs[:rank]), sum(len(x) for x, _ in inputs[: rank + 1]))
    exchanged = []
    exchange = dist.all_to_all_single

    def recording(out, x, *args, **kwargs):
        exchanged.append(x.dtype)
        return exchange(out, x, *args, **kwargs)

    results = []
    for model, (x, upstream) in ((one, torch.cat(inputs, dim=1)), (two, inputs[rank])):
        x = x.clone().requires_grad_(True)
        dist.all_to_all_single = recording
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model["moe"](x)[0]
                (out.float() * upstream).sum().backward()
        finally:
            dist.all_to_all_single = exchange
        results.append((out, x.grad))
    rows = [dtype for dtype in exchanged if dtype != torch.long]
    assert rows and all(dtype == torch.bfloat16 for dtype in rows), exchanged  # forward and backward
    (out_one, grad_one), (out_two, grad_two) = results
    assert out_two.dtype == torch.bfloat16
    assert_close("output", out_two.float(), out_one[mine].float(), 1e-6)
    assert_close("input grad", grad_two, grad_one[mine], 1e-6)
    local = torch.tensor(list(two["moe"].local_expert_ids))
    for name, param in two["moe"].named_parameters():
        got, want = param.grad, one["moe"].get_parameter(name).grad
        if name.startswith("experts."):  # every rank's tokens, brought home by the exchange
            assert_close(f"grad {name}", got, want[local], 1e-6)
        else:  # this rank's tokens: summed over the ranks, as the trainer does. NOTE: the router's
            # gradient comes through the bf16 outputs, summed in another order: a bf16 rounding apart
            dist.all_reduce(got := got.clone())
            assert_close(f"grad {name}", got, want, 2e-2 * float(want.abs().max()))
