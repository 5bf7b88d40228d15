"""The expert-parallel contract on real gloo ranks, each case its own test (tests/rankpool.py runs them).

For every rank: the expert-parallel layer's output on its tokens equals that of
a group=None layer holding all experts applied to those tokens alone; input
and router gradients are equal; each expert's weight gradient equals the sum
over ranks of the reference's. Bad input on one rank fails on every rank.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from asserts import assert_close, assert_equal
from rankpool import on_ranks, rank_device
from reference_moe import ExpertRouterMoE, SimpleMoE, load_reference

import expert_parallel as ep

ONCE = ep.ExecutionConfig(dispatch="once_per_rank")


def run_step(layer: ep.MoELayer, x: torch.Tensor, upstream: torch.Tensor):
    """Forward + backward of (out * upstream).sum() + aux_loss: (out, input grad, aux loss, stats)."""
    x = x.detach().clone().requires_grad_(True)
    out, aux_loss, stats = layer(x)
    ((out * upstream).sum() + aux_loss).backward()
    return out.detach(), x.grad, aux_loss.detach(), stats


def token_counts(size: int, zero_rank: bool) -> list[int]:
    counts = [23 + 11 * r for r in range(size)]
    if zero_rank:
        counts[1] = 0
    return counts


def compare_with_reference(
    name,
    config,
    group,
    seed,
    execution=None,
    zero_rank=False,
    shape3d=False,
    scale=1.0,
    counts=None,
    evaluate=False,
) -> int:
    """Assert the EP layer equals the single-process layer on this rank's tokens; drops over the group.

    Every collective runs before the first assertion, so a rank that fails does not leave its peers
    waiting in one (tests/test_hardening.py runs this in lockstep on every rank).
    """
    device = rank_device()
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(seed)
    reference = ep.MoELayer(config).to(device)
    torch.manual_seed(seed)
    layer = ep.MoELayer(config, group, execution=execution).to(device)
    if config.selection_bias:  # as if trained: a bias that changes choices, the same on every rank
        bias = torch.randn(config.num_experts, generator=torch.Generator().manual_seed(seed)) * 0.2
        reference.selection_bias.copy_(bias)
        layer.selection_bias.copy_(bias)
    if evaluate:
        reference.eval()
        layer.eval()
    local = slice(layer.first_expert, layer.first_expert + layer.num_local_experts)

    num_tokens = (counts or token_counts(size, zero_rank))[rank]
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    x = (torch.randn(num_tokens, config.d_model, generator=gen) * scale).to(device)
    upstream = torch.randn(num_tokens, config.d_out, generator=gen).to(device)
    if shape3d and num_tokens % 2 == 0:
        x, upstream = x.view(2, -1, config.d_model), upstream.view(2, -1, config.d_out)

    torch.manual_seed(seed)  # the same router jitter for both
    out_ref, dx_ref, aux_ref, stats_ref = run_step(reference, x, upstream)
    torch.manual_seed(seed)
    out, dx, aux, stats = run_step(layer, x, upstream)
    summed = {}  # each expert's gradient summed over the group: what its owner receives
    for pname, param in reference.experts.named_parameters():
        summed[pname] = param.grad.clone()
        dist.all_reduce(summed[pname], group=group)
    dropped = stats.num_dropped.clone().to(device)
    dist.all_reduce(dropped, group=group)

    # Initialisation depends on the seed only, not on the layout (no step has been taken).
    assert_equal(f"{name}: router init", layer.router.weight, reference.router.weight)
    for pname, param in layer.experts.named_parameters():
        assert_equal(f"{name}: init {pname}", param, getattr(reference.experts, pname)[local])
    assert_close(f"{name}: output", out, out_ref)
    assert_close(f"{name}: input grad", dx, dx_ref)
    assert_close(f"{name}: aux loss", aux, aux_ref)
    assert_equal(f"{name}: tokens per expert", stats.tokens_per_expert, stats_ref.tokens_per_expert)
    assert_equal(f"{name}: choices per expert", stats.choices_per_expert, stats_ref.choices_per_expert)
    assert int(stats.num_dropped) == int(stats_ref.num_dropped), f"{name}: dropped"
    assert (stats.num_routed, stats.capacity) == (stats_ref.num_routed, stats_ref.capacity), name
    for pname, param in layer.router.named_parameters():
        assert_close(f"{name}: router grad {pname}", param.grad, getattr(reference.router, pname).grad)
    if layer.shared_experts is not None:  # replicated: each rank's gradient is from its own tokens
        for pname, param in layer.shared_experts.named_parameters():
            want = getattr(reference.shared_experts, pname)
            assert_equal(f"{name}: shared init {pname}", param.detach(), want.detach())
            assert_close(f"{name}: shared grad {pname}", param.grad, want.grad)
    for pname, param in layer.experts.named_parameters():
        assert_close(f"{name}: expert grad {pname}", param.grad, summed[pname][local], tol=1e-4)
    return int(dropped)


BASE = ep.MoEConfig(d_model=16, d_hidden=24, num_experts=8, top_k=2, aux_loss_coef=0.01)
JITTER = replace(BASE, router_jitter=0.2, capacity_factor=1.0, min_capacity=1, eval_capacity_factor=8.0)
# id: (seed, config, execution, options); "drops": whether some rank must drop assignments.
CONTRACT = {
    "dropless-top2-softmax-relu": (0, BASE, None, {}),
    "capacity1-position": (1, replace(BASE, capacity_factor=1.0, min_capacity=1), None, {"drops": True}),
    "capacity0.5-probs-sigmoid": (
        2,
        replace(BASE, capacity_factor=0.5, min_capacity=1, drop_policy="probs", score_func="sigmoid"),
        None,
        {"drops": True},
    ),
    "top1-capacity1.25-dout40-gelu": (
        3,
        replace(BASE, top_k=1, d_out=40, capacity_factor=1.25, min_capacity=1, activation="gelu"),
        None,
        {"scale": 3.0, "drops": True},
    ),
    "swiglu-nobias-sigmoid-unnormalised-top3-zloss": (
        4,
        replace(
            BASE,
            top_k=3,
            activation="swiglu",
            bias=False,
            router_bias=False,
            score_func="sigmoid",
            normalize_weights=False,
            z_loss_coef=1e-3,
        ),
        None,
        {},
    ),
    "dropless-silu-zero-token-rank": (5, replace(BASE, activation="silu"), None, {"zero_rank": True}),
    "dropless-3d-input": (6, BASE, None, {"shape3d": True, "counts": [24, 0, 36, 12]}),
    "capacity1-probs-zero-token-rank": (
        7,
        replace(BASE, capacity_factor=1.0, min_capacity=1, drop_policy="probs"),
        None,
        {"zero_rank": True, "drops": True},
    ),
    "swiglu-bias-top1-dropless": (8, replace(BASE, activation="swiglu", top_k=1), None, {"shape3d": True}),
    "deepseek-v3-like": (
        9,  # sigmoid, selection bias, 4 groups keep 2, scaling 2.5, gated shared experts
        replace(
            BASE,
            top_k=3,
            score_func="sigmoid",
            selection_bias=True,
            num_groups=4,
            group_topk=2,
            routed_scaling_factor=2.5,
            num_shared_experts=2,
            d_shared_hidden=8,
            shared_expert_gate=True,
            activation="swiglu",
            bias=False,
        ),
        None,
        {"zero_rank": True},
    ),
    "jitter0.2-capacity1-training": (10, JITTER, None, {"drops": True}),
    "eval-no-jitter-eval-capacity8-never-drops": (11, JITTER, None, {"evaluate": True}),
    "once-per-rank-dropless-top3-zero-token-rank": (12, replace(BASE, top_k=3), ONCE, {"zero_rank": True}),
    "once-per-rank-capacity1-probs-swiglu-groups": (
        13,
        replace(
            BASE,
            top_k=4,
            capacity_factor=1.0,
            min_capacity=1,
            drop_policy="probs",
            activation="swiglu",
            score_func="sigmoid",
            num_groups=4,
            group_topk=2,
            selection_bias=True,
            routed_scaling_factor=2.5,
        ),
        ONCE,
        {"drops": True, "shape3d": True, "counts": [24, 0, 36, 12]},
    ),
    "sequence-scope-aux-loss": (
        14,
        replace(BASE, aux_loss_scope="sequence", aux_loss_coef=1.0),
        None,
        {"shape3d": True, "counts": [24, 0, 36, 12]},
    ),
    # Llama 4's weights on the experts' input, with GPT-OSS's clamped SwiGLU (a limit that bites).
    "scaled-input-capacity1-clamped-swiglu": (
        15,
        replace(
            BASE,
            scale_expert_input=True,
            score_func="sigmoid",
            normalize_weights=False,
            activation="clamped_swiglu",
            swiglu_alpha=1.702,
            swiglu_limit=0.5,
            capacity_factor=1.0,
            min_capacity=1,
        ),
        None,
        {"drops": True, "zero_rank": True},
    ),
    "once-per-rank-scaled-input-top3": (
        16,
        replace(BASE, top_k=3, scale_expert_input=True, activation="swiglu"),
        ONCE,
        {"zero_rank": True, "shape3d": True},
    ),
}


@pytest.mark.parametrize("case", CONTRACT)
@on_ranks(2, 4)
def test_expert_parallel_equals_single_process(case):
    seed, config, execution, options = CONTRACT[case]
    options = dict(options)
    expect_drops = options.pop("drops", False)
    dropped = compare_with_reference(case, config, dist.group.WORLD, seed, execution, **options)
    assert (dropped > 0) == expect_drops, f"{case}: {dropped} assignments dropped over the group"


@pytest.mark.parametrize("top_k,capacity", [(4, None), (2, 1.0)])
@on_ranks(2, 4)
def test_once_per_rank_sends_each_token_once_per_rank(top_k, capacity):
    """Rows sent = distinct (token, other rank) pairs; outputs and gradients = per-assignment dispatch."""
    device, group = rank_device(), dist.group.WORLD
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    config = ep.MoEConfig(d_model=16, d_hidden=24, num_experts=8, top_k=top_k, capacity_factor=capacity)
    torch.manual_seed(21)
    per_pair = ep.MoELayer(config, group).to(device)
    torch.manual_seed(21)
    once = ep.MoELayer(config, group, execution=ONCE).to(device)
    x = torch.randn(30 + 3 * rank, 16, generator=torch.Generator().manual_seed(rank)).to(device)
    upstream = torch.randn(30 + 3 * rank, 16, generator=torch.Generator().manual_seed(50 + rank)).to(device)
    out_a, dx_a, _, stats_a = run_step(per_pair, x, upstream)
    out_b, dx_b, _, stats_b = run_step(once, x, upstream)
    assert_close("output", out_b, out_a, tol=1e-6)
    assert_close("input grad", dx_b, dx_a, tol=1e-6)
    assert_close("router grad", once.router.weight.grad, per_pair.router.weight.grad, tol=1e-6)
    assert_close("w1 grad", once.experts.w1.grad, per_pair.experts.w1.grad, tol=1e-6)
    routing = ep.route(per_pair.router(x), config)
    owner_TK = torch.where(routing.keep, routing.expert_ids // (8 // size), rank)
    pairs = {(t, int(p)) for t, row in enumerate(owner_TK) for p in row if int(p) != rank}
    fewer, more = int(stats_b.rows_sent_to_other_ranks), int(stats_a.rows_sent_to_other_ranks)
    assert fewer == len(pairs), "rows sent = distinct (token, other rank) pairs"
    # top-4 of 8 experts on <= 4 ranks: some token surely has two experts on one other rank.
    assert fewer < more if top_k == 4 else fewer <= more, (fewer, more)


@on_ranks(2, 4)
def test_large_capacity_equals_dropless():
    device, group = rank_device(), dist.group.WORLD
    config = ep.MoEConfig(d_model=16, d_hidden=24, num_experts=8, top_k=2)
    torch.manual_seed(7)
    dropless = ep.MoELayer(config, group).to(device)
    torch.manual_seed(7)
    # capacity_factor = E gives C >= T * K: no expert can overflow.
    roomy = ep.MoELayer(replace(config, capacity_factor=8.0), group).to(device)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(dist.get_rank(group))).to(device)
    upstream = torch.ones(40, 16, device=device)
    out_a, dx_a, _, _ = run_step(dropless, x, upstream)
    out_b, dx_b, _, _ = run_step(roomy, x, upstream)
    assert_equal("output", out_b, out_a)
    assert_equal("input grad", dx_b, dx_a)
    assert_equal("w1 grad", roomy.experts.w1.grad, dropless.experts.w1.grad)


@on_ranks(2, 4)
@torch.no_grad()
def test_round_robin_routing_proves_where_each_token_went():
    """Token i of every rank goes to expert i mod E; expert g multiplies by g + 1.

    The router reads a one-hot in the first E features; expert g is eye * (g + 1)
    with ReLU on positive inputs, so out / x names the expert, and so the rank,
    that handled each row, and proves every row came back to its own token.
    """
    device, group = rank_device(), dist.group.WORLD
    rank = dist.get_rank(group)
    num_experts, width = 8, 12
    config = ep.MoEConfig(
        d_model=width, d_hidden=width, num_experts=num_experts, top_k=1, bias=False, router_bias=False
    )
    layer = ep.MoELayer(config, group).to(device)
    layer.router.weight.copy_(torch.eye(num_experts, width))
    for local_id in range(layer.num_local_experts):
        layer.experts.w1[local_id].copy_(torch.eye(width) * (layer.first_expert + local_id + 1))
        layer.experts.w2[local_id].copy_(torch.eye(width))
    num_tokens = 5 + 7 * rank
    target = (torch.arange(num_tokens, device=device) + rank) % num_experts
    x = torch.rand(num_tokens, width, device=device) + 0.5
    x[:, :num_experts] += 10 * torch.nn.functional.one_hot(target, num_experts)
    out, _, stats = layer(x)
    assert_close("out / x names the expert", out / x, (target + 1).float().unsqueeze(1).expand_as(x))
    owner = target // layer.num_local_experts
    assert int(stats.rows_sent_to_other_ranks) == int((owner != rank).sum()), "rows sent away"


@on_ranks(2, 4)
def test_the_seed_designs_under_expert_parallelism():
    device, group = rank_device(), dist.group.WORLD
    rank = dist.get_rank(group)
    gen = torch.Generator().manual_seed(100 + rank)

    torch.manual_seed(11)
    simple = SimpleMoE(num_experts=8, d_model=64, d_hidden=128, top_k=2).to(device)
    layer = ep.MoELayer(ep.MoEConfig(d_model=64, d_hidden=128, num_experts=8, top_k=2), group).to(device)
    load_reference(layer, simple)
    x = torch.randn(9 + 4 * rank, 64, generator=gen).to(device)
    assert_close("SimpleMoE under EP: output", layer(x).out, simple(x))

    torch.manual_seed(12)
    routed = ExpertRouterMoE(d_model=64, d_out=128, num_experts=8, d_hidden=256).to(device)
    config = ep.MoEConfig(d_model=64, d_hidden=256, d_out=128, num_experts=8, top_k=1)
    layer = ep.MoELayer(config, group).to(device)
    load_reference(layer, routed)
    x = torch.randn(4 + 5 * rank, 64, generator=gen).to(device)
    assert_close("ExpertRouter MoE under EP: output", layer(x).out, routed(x))


CONFIG = ep.MoEConfig(d_model=16, d_hidden=24, num_experts=8, top_k=2)


@on_ranks(2, 4)
def test_configs_that_cannot_run_fail_at_construction_on_every_rank():
    group = dist.group.WORLD
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    with pytest.raises(ValueError, match="differ.*top_k|top_k.*differ"):
        ep.MoELayer(replace(CONFIG, top_k=1 + (rank == size - 1)), group)
    with pytest.raises(ValueError, match="differ.*exchange_chunks|exchange_chunks.*differ"):
        ep.MoELayer(CONFIG, group, execution=ep.ExecutionConfig(exchange_chunks=1 + (rank == 0)))
    with pytest.raises(ValueError, match="num_experts.*divisible"):
        ep.MoELayer(replace(CONFIG, num_experts=2 * size + 1), group)


@on_ranks(2, 4)
def test_bad_input_on_one_rank_fails_on_every_rank():
    device, group = rank_device(), dist.group.WORLD
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    layer = ep.MoELayer(CONFIG, group).to(device)
    x = torch.randn(10, 16, device=device)
    peer_failed = rf"\[{size - 1}\].*invalid input"
    bad = x.clone()
    if rank == size - 1:
        bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN" if rank == size - 1 else peer_failed):
        layer(bad)
    wide = torch.randn(10, 17, device=device) if rank == 0 else x
    with pytest.raises(ValueError, match="d_model=16" if rank == 0 else r"\[0\].*invalid input"):
        layer(wide)

    def forward_maybe_without_grad():
        if rank == 0:
            with torch.no_grad():
                return layer(x)
        return layer(x)

    with pytest.raises(RuntimeError, match="gradients enabled"):
        forward_maybe_without_grad()
    if rank == 0:
        with pytest.raises(TypeError, match="float64"):
            layer(x.double())
    else:
        with pytest.raises(ValueError, match=r"\[0\].*invalid input"):
            layer(x)
    doubled = ep.MoELayer(CONFIG, group).to(device)
    if rank == 0:
        doubled.double()
    with pytest.raises(TypeError, match="dtypes"):
        doubled(x.double() if rank == 0 else x)
    out, _, _, _ = run_step(layer, x, torch.ones(10, 16, device=device))
    assert out.shape == (10, 16) and bool(out.isfinite().all()), "the layer still works after rejected inputs"


@pytest.mark.parametrize("dispatch", ["per_assignment", "once_per_rank"])
@on_ranks(2, 4)
def test_backward_completes_when_only_rank_0_input_requires_grad(dispatch):
    """Every rank still runs the backward's exchanges (this hung once)."""
    device, group = rank_device(), dist.group.WORLD
    rank = dist.get_rank(group)
    torch.manual_seed(3)
    layer = ep.MoELayer(CONFIG, group, execution=ep.ExecutionConfig(dispatch=dispatch)).to(device)
    x = torch.randn(10, 16, device=device).requires_grad_(rank == 0)
    layer(x).out.sum().backward()
    assert layer.router.weight.grad is not None
    assert rank != 0 or float(x.grad.abs().sum()) > 0


@on_ranks(2, 4)
def test_max_tokens_per_expert_refuses_on_every_rank():
    """An adversarial router sends every token to expert 0: the dropless cap refuses on every rank."""
    device, group = rank_device(), dist.group.WORLD
    size = dist.get_world_size(group)
    execution = ep.ExecutionConfig(max_tokens_per_expert=8 * size)
    capped = ep.MoELayer(CONFIG, group, execution=execution, name="blocks.0.moe").to(device)
    with torch.no_grad():
        capped.router.weight.zero_()
        capped.router.bias.copy_(torch.arange(CONFIG.num_experts, 0, -1, dtype=torch.float))
    under_cap = torch.randn(8, 16, device=device)  # 8 tokens per rank: expert 0 gets exactly the cap
    assert capped(under_cap).out.shape == (8, 16)
    with pytest.raises(ValueError) as err:
        capped(torch.randn(9, 16, device=device))
    words = ["'blocks.0.moe'", "expert 0", f"{9 * size} rows", "ExecutionConfig.max_tokens_per_expert"]
    assert all(w in str(err.value) for w in words), str(err.value)


@on_ranks(2, 4)
def test_every_rank_empty():
    device = rank_device()
    config = ep.MoEConfig(d_model=16, d_hidden=24, num_experts=8, top_k=2, capacity_factor=1.0)
    layer = ep.MoELayer(config, dist.group.WORLD).to(device)
    x = torch.zeros(0, 16, device=device)
    out, dx, _, _ = run_step(layer, x, torch.zeros(0, 16, device=device))
    assert out.shape == (0, 16) and dx.shape == (0, 16)
    assert bool((layer.experts.w1.grad == 0).all()), "zero expert grads"
