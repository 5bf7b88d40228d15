"""The local experts: torch's grouped_mm path equals the per-expert loop, forward and every gradient.

Both paths run the same products per group; only the bias is fused (addmm) in
the loop and added after the GEMM in grouped_mm, so they agree to rounding.
"""

import pytest
import torch
from torch.func import functional_call

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.experts import _GROUPED_MM, Experts, grouped_linear, grouped_mm_fits

needs_grouped_mm = pytest.mark.skipif(_GROUPED_MM is None, reason="this torch has no grouped_mm")

# Empty experts first, in the middle, last, and everywhere (no rows at all).
ROW_SPLITS = [[3, 0, 5, 1], [0, 4, 4, 0], [7, 0, 0, 9], [0, 0, 0, 0], [1, 1, 1, 1]]


# GPT-OSS's constants but a limit that the test's pre-activations cross (their std is about 0.6).
CLAMPED = dict(swiglu_alpha=1.702, swiglu_limit=0.3)


def make_experts(activation: str, bias: bool, dtype=torch.float32, d=16, h=32) -> Experts:
    constants = CLAMPED if activation == "clamped_swiglu" else {}
    config = MoEConfig(
        d_model=d, d_hidden=h, num_experts=4, top_k=1, activation=activation, bias=bias, **constants
    )
    experts = Experts(config, 4)
    for local_id in range(4):
        experts.reset_expert(local_id, torch.Generator().manual_seed(local_id))
    return experts.to(dtype)


def run(experts: Experts, x: torch.Tensor, rows: list[int], gemm: str, upstream: torch.Tensor | None):
    """Output and gradients (x first, then each parameter by name) of one forward + backward."""
    experts.gemm = gemm
    experts.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = experts(x, rows)
    if upstream is None:
        out.sum().backward()  # an expanded (stride-0) gradient arrives at the last GEMM
    else:
        out.backward(upstream)
    grads = {"x": x.grad, **{name: p.grad for name, p in experts.named_parameters()}}
    return out.detach(), grads


@needs_grouped_mm
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", ROW_SPLITS)
@pytest.mark.parametrize("expanded", [False, True])
def test_grouped_mm_equals_the_loop_forward_and_all_gradients(activation, bias, rows, expanded):
    torch.manual_seed(0)
    experts = make_experts(activation, bias)
    x = torch.randn(sum(rows), 16)
    upstream = None if expanded else torch.randn(sum(rows), 16)
    out_loop, grads_loop = run(experts, x, rows, "loop", upstream)
    out_mm, grads_mm = run(experts, x, rows, "grouped_mm", upstream)
    torch.testing.assert_close(out_mm, out_loop, rtol=1e-5, atol=1e-6)
    assert grads_mm.keys() == grads_loop.keys()
    for name, grad in grads_loop.items():
        assert grads_mm[name] is not None and grads_mm[name].shape == grad.shape, name
        torch.testing.assert_close(grads_mm[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    for g, n in enumerate(rows):
        if n == 0:  # an expert with no rows gets exactly zero gradient on both paths
            for name, grad in grads_mm.items():
                if name != "x":
                    assert not grad[g].any() and not grads_loop[name][g].any(), (name, g)


@needs_grouped_mm
def test_grouped_mm_equals_the_loop_in_bf16():
    torch.manual_seed(0)
    rows = [5, 0, 6, 5]
    experts = make_experts("relu", True, torch.bfloat16)
    x = torch.randn(16, 16, dtype=torch.bfloat16)
    upstream = torch.randn(16, 16, dtype=torch.bfloat16)
    out_loop, grads_loop = run(experts, x, rows, "loop", upstream)
    out_mm, grads_mm = run(experts, x, rows, "grouped_mm", upstream)
    torch.testing.assert_close(out_mm, out_loop, rtol=2e-2, atol=2e-2)
    for name, grad in grads_loop.items():
        torch.testing.assert_close(grads_mm[name], grad, rtol=2e-2, atol=2e-2, msg=name)


def test_grouped_linear_equals_written_out_products_on_both_paths():
    torch.manual_seed(0)
    rows = [3, 0, 5, 0]
    x, w, b = torch.randn(8, 8), torch.randn(4, 8, 4), torch.randn(4, 4)
    want = torch.cat([x_g @ w[g] + b[g] for g, x_g in enumerate(x.split(rows))])
    gemms = ["loop", "auto"] + (["grouped_mm"] if _GROUPED_MM is not None else [])
    for gemm in gemms:
        torch.testing.assert_close(grouped_linear(x, w, b, rows, gemm), want, msg=gemm)


@needs_grouped_mm
def test_grouped_mm_requirements_are_checked_and_auto_falls_back_to_the_loop():
    rows = [2, 2]
    # grouped_mm needs row strides in multiples of 16 bytes: 4 fp32 columns, 8 bf16 ones.
    assert grouped_mm_fits(torch.randn(4, 8), torch.randn(2, 8, 4))
    assert not grouped_mm_fits(torch.randn(4, 6), torch.randn(2, 6, 4))
    bf16, double = torch.bfloat16, torch.double
    assert not grouped_mm_fits(torch.randn(4, 8, dtype=bf16), torch.randn(2, 8, 4, dtype=bf16))
    assert not grouped_mm_fits(torch.randn(4, 8, dtype=double), torch.randn(2, 8, 4, dtype=double))
    assert not grouped_mm_fits(torch.randn(8, 4).t(), torch.randn(2, 8, 4))
    x, w = torch.randn(4, 6, dtype=torch.double), torch.randn(2, 6, 3, dtype=torch.double)
    with pytest.raises(ValueError, match="grouped_mm cannot take"):
        grouped_linear(x, w, None, rows, "grouped_mm")
    auto, loop = grouped_linear(x, w, None, rows, "auto"), grouped_linear(x, w, None, rows, "loop")
    torch.testing.assert_close(auto, loop)
    with pytest.raises(ValueError, match="gemm='fast'"):
        grouped_linear(x, w, None, rows, "fast")
    with pytest.raises(ValueError, match="gemm='fast'"):
        Experts(MoEConfig(d_model=8, d_hidden=8, num_experts=2, top_k=1), 2, gemm="fast")


@pytest.mark.parametrize("gemm", ["loop", "grouped_mm"])
def test_autocast_runs_the_experts_in_bf16_with_fp32_gradients(gemm):
    if gemm == "grouped_mm" and _GROUPED_MM is None:
        pytest.skip("this torch has no grouped_mm")
    torch.manual_seed(0)
    rows = [6, 0, 5, 5]
    experts = make_experts("swiglu", True)
    x, upstream = torch.randn(16, 16), torch.randn(16, 16)
    out_fp32, grads_fp32 = run(experts, x, rows, "loop", upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16, grads_bf16 = run(experts, x.bfloat16(), rows, gemm, upstream.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), out_fp32, rtol=0.05, atol=0.05)
    for name, grad in grads_fp32.items():
        if name != "x":
            assert grads_bf16[name].dtype == torch.float32, name
        torch.testing.assert_close(grads_bf16[name].float(), grad, rtol=0.05, atol=0.05, msg=name)


@needs_grouped_mm
def test_layer_with_grouped_mm_experts_equals_the_loop():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_hidden=32, num_experts=4, top_k=2))
    x = torch.randn(2, 12, 16, requires_grad=True)
    outs, grads = [], []
    for gemm in ("loop", "grouped_mm"):
        layer.experts.gemm = gemm
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = layer(x).out
        out.sum().backward()
        outs.append(out.detach())
        grads.append([x.grad, *(p.grad for p in layer.parameters())])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for mm, loop in zip(grads[1], grads[0]):
        torch.testing.assert_close(mm, loop, rtol=1e-5, atol=1e-5)


def run_unfused(experts: Experts, x: torch.Tensor, rows: list[int], upstream: torch.Tensor | None):
    experts.gemm = "loop"
    experts.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = experts.unfused(x, rows)
    out.sum().backward() if upstream is None else out.backward(upstream)
    return out.detach(), {"x": x.grad, **{name: p.grad for name, p in experts.named_parameters()}}


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "swiglu", "clamped_swiglu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", ROW_SPLITS)
@pytest.mark.parametrize("expanded", [False, True])
def test_one_expert_at_a_time_mlp_equals_the_unfused_loop_bitwise(activation, bias, rows, expanded):
    """The fused per-expert MLP runs the same kernels as three grouped_linear calls and the
    activation's autograd: every output and gradient bit equal, empty experts' gradients zero."""
    torch.manual_seed(1)
    experts = make_experts(activation, bias)
    x = torch.randn(sum(rows), 16)
    upstream = None if expanded else torch.randn(sum(rows), 16)
    out_fused, grads_fused = run(experts, x, rows, "loop", upstream)
    out_unfused, grads_unfused = run_unfused(experts, x, rows, upstream)
    assert torch.equal(out_fused, out_unfused)
    assert grads_fused.keys() == grads_unfused.keys()
    for name, grad in grads_unfused.items():
        assert torch.equal(grads_fused[name], grad), name
    for g, n in enumerate(rows):
        if n == 0:
            for name, grad in grads_fused.items():
                if name != "x":
                    assert not grad[g].any(), name


def test_the_fused_relu_mlp_computes_relu_once_per_expert_and_never_again_in_the_backward():
    """relu's backward needs only relu(a) > 0, so the fused MLP keeps relu(a) and recomputes
    nothing (the other activations rebuild act(a) from a, one expert at a time)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.relus = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.relu, torch.ops.aten.relu_, torch.ops.aten.clamp_min):
                self.relus += 1
            return func(*args, **(kwargs or {}))

    experts, rows = make_experts("relu", True), [3, 0, 5, 1]
    x = torch.randn(9, 16, requires_grad=True)
    with Count() as forward:
        out = experts(x, rows)
    with Count() as backward:
        out.backward(torch.randn_like(out))
    assert (forward.relus, backward.relus) == (3, 0)
    assert experts.w1.grad is not None and not experts.w1.grad[1].any()


@pytest.mark.parametrize("activation", ["relu", "swiglu", "clamped_swiglu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", ROW_SPLITS)
def test_under_autocast_each_expert_cast_as_it_runs_equals_casting_whole_stacks(activation, bias, rows):
    """Under bf16 autocast the fused MLP takes the fp32 weights, casts each expert's just before
    its GEMMs and each weight gradient back as soon as it is computed: the same bits as a bf16
    copy of the experts run on bf16 rows (whole stacks cast first), gradients cast to fp32."""
    torch.manual_seed(4)
    experts = make_experts(activation, bias)
    x = torch.randn(sum(rows), 16)
    upstream = torch.randn(sum(rows), 16).bfloat16()
    experts.zero_grad(set_to_none=True)
    x_fp32 = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x_fp32, rows)
    out.backward(upstream)
    copy = make_experts(activation, bias, torch.bfloat16)
    copy.load_state_dict({name: p.bfloat16() for name, p in experts.state_dict().items()})
    x_bf16 = x.bfloat16().requires_grad_()
    out_bf16 = copy(x_bf16, rows)
    out_bf16.backward(upstream)
    assert out.dtype == torch.bfloat16 and torch.equal(out, out_bf16)
    assert torch.equal(x_fp32.grad, x_bf16.grad.float())
    for (name, param), (_, bf16_param) in zip(experts.named_parameters(), copy.named_parameters()):
        assert param.grad.dtype == torch.float32, name
        assert torch.equal(param.grad, bf16_param.grad.float()), name


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu", "clamped_swiglu"])
def test_one_expert_at_a_time_mlp_passes_gradcheck(activation):
    torch.manual_seed(2)
    experts = make_experts(activation, True, dtype=torch.float64, d=4, h=6)
    experts.gemm = "loop"
    rows = [2, 0, 3, 1]
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in experts.named_parameters()]
    values = [p.detach().clone().requires_grad_() for p in experts.parameters()]
    assert torch.autograd.gradcheck(
        lambda x, *ws: functional_call(experts, dict(zip(names, ws)), (x, rows)), (x, *values)
    )


def test_clamped_swiglu_is_gpt_oss_formula_with_zero_gradient_where_clamped():
    """h = c * sigmoid(alpha * c) * (clamp(u, -L, L) + 1), c = min(a, L): written out for one expert."""
    torch.manual_seed(3)
    experts = make_experts("clamped_swiglu", True)
    x = torch.randn(9, 16, requires_grad=True)
    out = experts(x, [9, 0, 0, 0])
    alpha, limit = CLAMPED["swiglu_alpha"], CLAMPED["swiglu_limit"]
    a = x @ experts.w1[0] + experts.b1[0]
    u = x @ experts.w3[0] + experts.b3[0]
    c = torch.minimum(a, torch.tensor(limit))
    h = c * torch.sigmoid(alpha * c) * (torch.clamp(u, -limit, limit) + 1)
    torch.testing.assert_close(out, h @ experts.w2[0] + experts.b2[0])
    assert (a > limit).any() and (u.abs() > limit).any()  # both clamps bite
    # No gradient flows through a clamped pre-activation: for one row, b1's (b3's) gradient is
    # zero exactly in the columns where a (u) was clamped.
    experts(x[:1], [1, 0, 0, 0]).sum().backward()
    gate_clamped, up_clamped = a[0] > limit, u[0].abs() > limit
    assert gate_clamped.any() and up_clamped.any()
    assert torch.equal(experts.b1.grad[0] == 0, gate_clamped)
    assert torch.equal(experts.b3.grad[0] == 0, up_clamped)
