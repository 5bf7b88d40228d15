"""The single-process MoELayer: the two starting designs, a per-token loop, shapes and bad input."""

import pytest
import torch
import torch.nn.functional as F
from reference_moe import ExpertRouterMoE, SimpleMoE, load_reference

from expert_parallel import MoEConfig, MoELayer, route


def test_reproduces_simple_moe_outputs_and_gradients():
    torch.manual_seed(0)
    reference = SimpleMoE(num_experts=4, d_model=64, d_hidden=128, top_k=2)
    layer = MoELayer(MoEConfig(d_model=64, d_hidden=128, num_experts=4, top_k=2))
    load_reference(layer, reference)
    x = torch.randn(33, 64)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out = reference(x_ref), layer(x_ours).out
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(out)
    (out_ref * upstream).sum().backward()
    (out * upstream).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.router.weight.grad, reference.gate.weight.grad, rtol=1e-5, atol=1e-6)
    for e, expert in enumerate(reference.experts):
        torch.testing.assert_close(layer.experts.w1.grad[e], expert[0].weight.grad.t(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.experts.b2.grad[e], expert[2].bias.grad, rtol=1e-5, atol=1e-5)


def test_reproduces_the_expert_router_moe_with_d_out_128():
    torch.manual_seed(1)
    reference = ExpertRouterMoE(d_model=64, d_out=128, num_experts=8, d_hidden=256)
    layer = MoELayer(MoEConfig(d_model=64, d_hidden=256, d_out=128, num_experts=8, top_k=1))
    load_reference(layer, reference)
    x = torch.randn(4, 64)
    out = layer(x).out
    assert out.shape == (4, 128)
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-6)
    # top-1 with renormalised weights: the output is exactly the chosen expert's output. Each expert
    # runs on the same rows as inside the layer (its tokens, in order): a GEMM over fewer rows may
    # take another kernel and round differently (seen on AVX512 with one row per call).
    chosen_T = route(layer.router(x), layer.config).expert_ids[:, 0]
    for e in chosen_T.unique().tolist():
        mine = (chosen_T == e).nonzero().squeeze(1)
        alone = layer.experts(x[mine], [mine.numel() if g == e else 0 for g in range(8)])
        assert torch.equal(out[mine], alone)


def loop_reference(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Per token, per kept choice: weight * expert(x), or expert(weight * x) with
    scale_expert_input, written out from the stacked weights."""
    cfg, ex = layer.config, layer.experts
    routing = route(layer.router(x), cfg)
    out = x.new_zeros(x.shape[0], cfg.d_out)
    for t in range(x.shape[0]):
        for k in range(cfg.top_k):
            if not routing.keep[t, k]:
                continue
            e, weight = routing.expert_ids[t, k], routing.weights[t, k]
            x_t = weight * x[t] if cfg.scale_expert_input else x[t]
            a = x_t @ ex.w1[e] + (ex.b1[e] if cfg.bias else 0)
            u = x_t @ ex.w3[e] + (ex.b3[e] if cfg.bias else 0) if ex.w3 is not None else None
            y = hidden(cfg, a, u) @ ex.w2[e] + (ex.b2[e] if cfg.bias else 0)
            out[t] += y if cfg.scale_expert_input else weight * y
    return out


def hidden(cfg: MoEConfig, a: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    if cfg.activation == "clamped_swiglu":  # GPT-OSS: c = min(a, L); c * sigmoid(alpha c) * (clamp(u) + 1)
        limit = cfg.swiglu_limit
        c = torch.minimum(a, torch.tensor(limit))
        return c * torch.sigmoid(cfg.swiglu_alpha * c) * (torch.clamp(u, -limit, limit) + 1)
    h = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swiglu": F.silu}[cfg.activation](a)
    return h * u if cfg.activation == "swiglu" else h


CLAMPED = {"activation": "clamped_swiglu", "swiglu_alpha": 1.702, "swiglu_limit": 0.4}
# Llama 4's routing: sigmoid of the chosen logits, not renormalised, on the experts' input.
ON_INPUT = {"scale_expert_input": True, "score_func": "sigmoid", "normalize_weights": False}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"activation": "gelu", "capacity_factor": 0.5, "min_capacity": 0},
        {"activation": "silu", "score_func": "sigmoid", "drop_policy": "probs", "capacity_factor": 0.7},
        {"activation": "swiglu", "bias": False, "router_bias": False, "top_k": 3, "d_out": 5},
        {"activation": "swiglu", "normalize_weights": False, "score_func": "sigmoid"},
        {**CLAMPED, "capacity_factor": 0.7, "top_k": 2},
        {**ON_INPUT, "activation": "swiglu", "bias": False, "top_k": 1},
        {**ON_INPUT, "activation": "gelu", "top_k": 3, "capacity_factor": 0.6, "min_capacity": 0},
    ],
)
def test_equals_a_per_token_loop(overrides):
    torch.manual_seed(2)
    layer = MoELayer(MoEConfig(**{"d_model": 8, "d_hidden": 12, "num_experts": 6, **overrides}))
    x = torch.randn(25, 8)
    torch.testing.assert_close(layer(x).out, loop_reference(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides,compiled",
    [
        (CLAMPED, False),
        ({**ON_INPUT, "activation": "swiglu", "top_k": 2}, False),
        ({**ON_INPUT, **CLAMPED, "top_k": 3, "capacity_factor": 0.6, "min_capacity": 0}, False),
        # torch.compile's capacity path: E * C padded slots and batched GEMMs (Experts.padded)
        ({**ON_INPUT, **CLAMPED, "top_k": 2, "capacity_factor": 0.6, "min_capacity": 0}, True),
    ],
)
def test_weights_on_the_input_and_the_clamped_swiglu_have_the_loops_gradients(overrides, compiled):
    torch.manual_seed(4)
    layer = MoELayer(MoEConfig(**{"d_model": 8, "d_hidden": 12, "num_experts": 6, **overrides}))
    x = torch.randn(25, 8)
    upstream = torch.randn(25, layer.config.d_out)
    run = torch.compile(layer, backend="aot_eager", fullgraph=True) if compiled else layer
    grads = []
    for forward in (lambda x: run(x).out, lambda x: loop_reference(layer, x)):
        layer.zero_grad(set_to_none=True)
        x_leaf = x.clone().requires_grad_()
        out = forward(x_leaf)
        (out * upstream).sum().backward()
        grads.append([out.detach(), x_leaf.grad, *(p.grad for p in layer.parameters())])
    torch._dynamo.reset()
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_parameter_layout_is_the_documented_one():
    config = MoEConfig(d_model=8, d_hidden=12, d_out=5, num_experts=6, activation="swiglu")
    shapes = {name: tuple(p.shape) for name, p in MoELayer(config).named_parameters()}
    assert shapes == {
        "router.weight": (6, 8),
        "router.bias": (6,),
        "experts.w1": (6, 8, 12),
        "experts.w2": (6, 12, 5),
        "experts.w3": (6, 8, 12),
        "experts.b1": (6, 12),
        "experts.b2": (6, 5),
        "experts.b3": (6, 12),
    }


def test_init_follows_the_seed_and_nn_linear_bounds():
    config = MoEConfig(d_model=16, d_hidden=64, num_experts=4)
    torch.manual_seed(3)
    a = MoELayer(config)
    torch.manual_seed(3)
    b = MoELayer(config)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.experts.w1.abs().max() <= 16**-0.5 and a.experts.w2.abs().max() <= 64**-0.5
    assert not torch.equal(a.experts.w1[0], a.experts.w1[1])


def test_leading_dimensions_are_kept_and_stats_report_drops():
    layer = MoELayer(
        MoEConfig(d_model=8, d_hidden=8, num_experts=4, top_k=2, capacity_factor=0.5, min_capacity=0)
    )
    out, aux_loss, stats = layer(torch.randn(3, 10, 8))
    assert out.shape == (3, 10, 8)
    assert stats.num_routed == 60 and stats.capacity == 8
    assert stats.num_dropped.shape == () and stats.rows_sent_to_other_ranks.shape == ()
    assert int(stats.num_dropped) == 60 - int(stats.tokens_per_expert.sum()) > 0
    assert int(stats.rows_sent_to_other_ranks) == 0  # no group: nothing travels
    # Choices count before drops: every token's K choices.
    assert int(stats.choices_per_expert.sum()) == 60
    assert (stats.choices_per_expert >= stats.tokens_per_expert).all()
    assert aux_loss.requires_grad and aux_loss.item() > 0


def test_zero_tokens_give_an_empty_output_with_gradients():
    layer = MoELayer(MoEConfig(d_model=8, d_hidden=8, num_experts=4))
    x = torch.zeros(0, 8, requires_grad=True)
    out, aux_loss, _ = layer(x)
    assert out.shape == (0, 8)
    (out.sum() + aux_loss).backward()
    assert x.grad.shape == (0, 8)


def test_bad_input_is_rejected_clearly():
    layer = MoELayer(MoEConfig(d_model=8, d_hidden=8, num_experts=4))
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="float64"):
        layer(torch.randn(3, 8, dtype=torch.double))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[0.0] * 8])
    nan = torch.randn(3, 8)
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(nan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_finite_check_is_exact_though_it_reads_a_sum_first(dtype):
    """all_finite reads one fp32 sum; a sum that overflows from finite values must not fail the
    check, and NaN, Inf or -Inf anywhere must."""
    from expert_parallel.checks import all_finite

    big = torch.full((4, 8), torch.finfo(dtype).max, dtype=dtype)
    overflows = not bool(torch.isfinite(big.sum(dtype=torch.float32)))
    assert all_finite(big) and overflows == (dtype != torch.float16)  # fp16's max sums fine in fp32
    assert all_finite(torch.randn(5, 8).to(dtype)) and all_finite(torch.empty(0, 8, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(5, 8).to(dtype)
        x[3, 6] = bad
        assert not all_finite(x), bad
    both = torch.randn(5, 8).to(dtype)
    both[0, 0], both[4, 7] = float("inf"), -float("inf")  # a NaN sum
    assert not all_finite(both)
    layer = MoELayer(MoEConfig(d_model=8, d_hidden=8, num_experts=4))
    with pytest.raises(ValueError, match=r"NaN or Inf \(1 tokens\)"):
        layer(torch.cat([torch.randn(2, 8), torch.full((1, 8), -float("inf"))]))
