"""Multi-rank contract checks; tests/test_multirank.py runs this on 2 and 4 gloo ranks.

For every rank: the expert-parallel layer's output on its tokens equals that of
a group=None layer holding all experts applied to those tokens alone; input
and router gradients are equal; each expert's weight gradient equals the sum
over ranks of the reference's. Failures are collected rather than raised, so
every rank keeps running the same collectives; the ranks agree on the verdict
at the end and exit 1 if any check failed anywhere.
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

from reference_moe import ExpertRouterMoE, SimpleMoE, load_reference  # noqa: E402

import expert_parallel as ep  # noqa: E402

DEVICE = torch.device("cpu")  # this rank's device, set by main() from init_distributed()


class Checks:
    def __init__(self) -> None:
        self.count = 0
        self.failures: list[str] = []

    def true(self, name: str, ok: bool, detail: str = "") -> None:
        self.count += 1
        if not ok:
            self.failures.append(f"{name} {detail}".strip())

    def close(self, name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 2e-5) -> None:
        same_shape = got.shape == want.shape
        ok = same_shape and torch.allclose(got, want, rtol=tol, atol=tol)
        detail = f"shape {tuple(got.shape)} vs {tuple(want.shape)}"
        if same_shape and got.numel():
            detail = f"max |diff| {(got - want).abs().max().item():.3g}"
        self.true(name, ok, detail)

    def equal(self, name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        self.true(name, got.shape == want.shape and torch.equal(got, want), "(not bitwise equal)")

    def verdict(self, rank: int) -> int:
        """Print this rank's failures and tally; 1 if any rank failed a check (a collective), else 0."""
        failed = torch.tensor(len(self.failures), device=DEVICE)
        dist.all_reduce(failed)
        for failure in self.failures:
            print(f"rank {rank} FAILED {failure}", flush=True)
        print(f"rank {rank}: {self.count - len(self.failures)} of {self.count} checks passed", flush=True)
        return 1 if int(failed) else 0


def run_step(layer: ep.MoELayer, x: torch.Tensor, upstream: torch.Tensor):
    """Forward + backward of (out * upstream).sum() + aux_loss; returns out and the input gradient."""
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    ((out * upstream).sum() + layer.aux_loss).backward()
    return out.detach(), x.grad


def token_counts(size: int, zero_rank: bool) -> list[int]:
    counts = [23 + 11 * r for r in range(size)]
    if zero_rank:
        counts[1] = 0
    return counts


def compare_with_reference(
    checks, name, config, group, seed, zero_rank=False, shape3d=False, scale=1.0, counts=None, evaluate=False
):
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(seed)
    reference = ep.MoELayer(config).to(DEVICE)
    torch.manual_seed(seed)
    layer = ep.MoELayer(config, group).to(DEVICE)
    if config.selection_bias:  # as if trained: a bias that changes choices, the same on every rank
        bias = torch.randn(config.num_experts, generator=torch.Generator().manual_seed(seed)) * 0.2
        reference.selection_bias.copy_(bias)
        layer.selection_bias.copy_(bias)
    if evaluate:
        reference.eval()
        layer.eval()
    local = slice(layer.first_expert, layer.first_expert + layer.num_local_experts)

    # Initialisation depends on the seed only, not on the layout.
    checks.equal(f"{name}: router init", layer.router.weight, reference.router.weight)
    for pname, param in layer.experts.named_parameters():
        checks.equal(f"{name}: init {pname}", param, getattr(reference.experts, pname)[local])

    num_tokens = (counts or token_counts(size, zero_rank))[rank]
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    x = (torch.randn(num_tokens, config.d_model, generator=gen) * scale).to(DEVICE)
    upstream = torch.randn(num_tokens, config.d_out, generator=gen).to(DEVICE)
    if shape3d and num_tokens % 2 == 0:
        x, upstream = x.view(2, -1, config.d_model), upstream.view(2, -1, config.d_out)

    torch.manual_seed(seed)  # the same router jitter for both
    out_ref, dx_ref = run_step(reference, x, upstream)
    torch.manual_seed(seed)
    out, dx = run_step(layer, x, upstream)
    checks.close(f"{name}: output", out, out_ref)
    checks.close(f"{name}: input grad", dx, dx_ref)
    checks.close(f"{name}: aux loss", layer.aux_loss.detach(), reference.aux_loss.detach())
    checks.equal(
        f"{name}: tokens per expert", layer.stats.tokens_per_expert, reference.stats.tokens_per_expert
    )
    checks.true(f"{name}: dropped", layer.stats.num_dropped == reference.stats.num_dropped)
    for pname, param in layer.router.named_parameters():
        checks.close(f"{name}: router grad {pname}", param.grad, getattr(reference.router, pname).grad)
    if layer.shared_experts is not None:  # replicated: each rank's gradient is from its own tokens
        for pname, param in layer.shared_experts.named_parameters():
            want = getattr(reference.shared_experts, pname)
            checks.equal(f"{name}: shared init {pname}", param.detach(), want.detach())
            checks.close(f"{name}: shared grad {pname}", param.grad, want.grad)
    for pname, param in layer.experts.named_parameters():
        summed = getattr(reference.experts, pname).grad.clone()
        dist.all_reduce(summed, group=group)
        checks.close(f"{name}: expert grad {pname}", param.grad, summed[local], tol=1e-4)
    dropped = torch.tensor(layer.stats.num_dropped, device=DEVICE)
    dist.all_reduce(dropped, group=group)
    return layer, x, upstream, int(dropped)


def check_contract(checks, group):
    base = ep.MoEConfig(d_model=16, d_hidden=24, num_experts=8, top_k=2, aux_loss_coef=0.01)
    cases = [
        ("dropless top-2 softmax relu", base, {}),
        ("capacity 1.0 position", replace(base, capacity_factor=1.0, min_capacity=1), {"drops": True}),
        (
            "capacity 0.5 probs sigmoid",
            replace(base, capacity_factor=0.5, min_capacity=1, drop_policy="probs", score_func="sigmoid"),
            {"drops": True},
        ),
        (
            "top-1 capacity 1.25 d_out 40 gelu",
            replace(base, top_k=1, d_out=40, capacity_factor=1.25, min_capacity=1, activation="gelu"),
            {"scale": 3.0, "drops": True},
        ),
        (
            "swiglu no bias sigmoid unnormalised top-3 z-loss",
            replace(
                base,
                top_k=3,
                activation="swiglu",
                bias=False,
                router_bias=False,
                score_func="sigmoid",
                normalize_weights=False,
                z_loss_coef=1e-3,
            ),
            {},
        ),
        ("dropless silu, zero-token rank", replace(base, activation="silu"), {"zero_rank": True}),
        ("dropless, 3-D input on every rank", base, {"shape3d": True, "counts": [24, 0, 36, 12]}),
        (
            "capacity 1.0 probs, zero-token rank",
            replace(base, capacity_factor=1.0, min_capacity=1, drop_policy="probs"),
            {"zero_rank": True, "drops": True},
        ),
        ("swiglu with bias top-1 dropless", replace(base, activation="swiglu", top_k=1), {"shape3d": True}),
        (
            "DeepSeek-V3-like: sigmoid, selection bias, 4 groups keep 2, scaling 2.5, gated shared experts",
            replace(
                base,
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
            {"zero_rank": True},
        ),
        (
            "jitter 0.2, capacity 1.0 training",
            replace(base, router_jitter=0.2, capacity_factor=1.0, min_capacity=1, eval_capacity_factor=8.0),
            {"drops": True},
        ),
        (
            "eval: jitter off, eval capacity 8 never drops",
            replace(base, router_jitter=0.2, capacity_factor=1.0, min_capacity=1, eval_capacity_factor=8.0),
            {"evaluate": True},
        ),
        (
            "once per rank: dropless top-3, zero-token rank",
            replace(base, top_k=3, dispatch="once_per_rank"),
            {"zero_rank": True},
        ),
        (
            "once per rank: capacity 1.0 probs, swiglu, DeepSeek-like groups",
            replace(
                base,
                top_k=4,
                dispatch="once_per_rank",
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
            {"drops": True, "shape3d": True, "counts": [24, 0, 36, 12]},
        ),
        (
            "sequence-scope aux loss over [2, S, D]",
            replace(base, aux_loss_scope="sequence", aux_loss_coef=1.0),
            {"shape3d": True, "counts": [24, 0, 36, 12]},
        ),
    ]
    for seed, (name, config, opts) in enumerate(cases):
        expect_drops = opts.pop("drops", False)
        _, _, _, dropped = compare_with_reference(checks, name, config, group, seed, **opts)
        checks.true(f"{name}: drops happen anywhere = {expect_drops}", (dropped > 0) == expect_drops)


def check_once_per_rank_sends_each_token_once_per_rank(checks, group):
    """Rows sent = distinct (token, other rank) pairs; outputs and gradients = per-assignment dispatch."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    for top_k, capacity in ((4, None), (2, 1.0)):
        name = f"once per rank, top-{top_k}, capacity {capacity}"
        config = ep.MoEConfig(d_model=16, d_hidden=24, num_experts=8, top_k=top_k, capacity_factor=capacity)
        torch.manual_seed(21)
        per_pair = ep.MoELayer(config, group).to(DEVICE)
        torch.manual_seed(21)
        once = ep.MoELayer(replace(config, dispatch="once_per_rank"), group).to(DEVICE)
        x = torch.randn(30 + 3 * rank, 16, generator=torch.Generator().manual_seed(rank)).to(DEVICE)
        upstream = torch.randn(30 + 3 * rank, 16, generator=torch.Generator().manual_seed(50 + rank)).to(
            DEVICE
        )
        out_a, dx_a = run_step(per_pair, x, upstream)
        out_b, dx_b = run_step(once, x, upstream)
        checks.close(f"{name}: output", out_b, out_a, tol=1e-6)
        checks.close(f"{name}: input grad", dx_b, dx_a, tol=1e-6)
        checks.close(f"{name}: router grad", once.router.weight.grad, per_pair.router.weight.grad, tol=1e-6)
        checks.close(f"{name}: w1 grad", once.experts.w1.grad, per_pair.experts.w1.grad, tol=1e-6)
        routing = ep.route(per_pair.router(x), config)
        owner_TK = torch.where(routing.keep, routing.expert_ids // (8 // size), rank)
        pairs = {(t, int(p)) for t, row in enumerate(owner_TK) for p in row if int(p) != rank}
        checks.true(
            f"{name}: rows sent = distinct (token, other rank) pairs",
            once.stats.rows_sent_to_other_ranks == len(pairs),
            f"{once.stats.rows_sent_to_other_ranks} vs {len(pairs)}",
        )
        fewer, more = once.stats.rows_sent_to_other_ranks, per_pair.stats.rows_sent_to_other_ranks
        # top-4 of 8 experts on <= 4 ranks: some token surely has two experts on one other rank.
        checks.true(
            f"{name}: no more rows than per assignment", fewer < more if top_k == 4 else fewer <= more
        )


def check_large_capacity_equals_dropless(checks, group):
    config = ep.MoEConfig(d_model=16, d_hidden=24, num_experts=8, top_k=2)
    torch.manual_seed(7)
    dropless = ep.MoELayer(config, group).to(DEVICE)
    torch.manual_seed(7)
    # capacity_factor = E gives C >= T * K: no expert can overflow.
    roomy = ep.MoELayer(replace(config, capacity_factor=8.0), group).to(DEVICE)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(dist.get_rank(group))).to(DEVICE)
    upstream = torch.ones(40, 16, device=DEVICE)
    out_a, dx_a = run_step(dropless, x, upstream)
    out_b, dx_b = run_step(roomy, x, upstream)
    checks.equal("large capacity == dropless: output", out_b, out_a)
    checks.equal("large capacity == dropless: input grad", dx_b, dx_a)
    checks.equal("large capacity == dropless: w1 grad", roomy.experts.w1.grad, dropless.experts.w1.grad)


@torch.no_grad()
def check_round_robin_placement(checks, group):
    """Token i of every rank goes to expert i mod E; expert g multiplies by g + 1.

    The router reads a one-hot in the first E features; expert g is eye * (g + 1)
    with ReLU on positive inputs, so out / x names the expert, and so the rank,
    that handled each row, and proves every row came back to its own token.
    """
    rank = dist.get_rank(group)
    num_experts, width = 8, 12
    config = ep.MoEConfig(
        d_model=width, d_hidden=width, num_experts=num_experts, top_k=1, bias=False, router_bias=False
    )
    layer = ep.MoELayer(config, group).to(DEVICE)
    layer.router.weight.copy_(torch.eye(num_experts, width))
    for local_id in range(layer.num_local_experts):
        layer.experts.w1[local_id].copy_(torch.eye(width) * (layer.first_expert + local_id + 1))
        layer.experts.w2[local_id].copy_(torch.eye(width))
    num_tokens = 5 + 7 * rank
    target = (torch.arange(num_tokens, device=DEVICE) + rank) % num_experts
    x = torch.rand(num_tokens, width, device=DEVICE) + 0.5
    x[:, :num_experts] += 10 * torch.nn.functional.one_hot(target, num_experts)
    out = layer(x)
    checks.close(
        "round robin: out / x names the expert", out / x, (target + 1).float().unsqueeze(1).expand_as(x)
    )
    owner = target // layer.num_local_experts
    checks.true(
        "round robin: rows sent away",
        layer.stats.rows_sent_to_other_ranks == int((owner != rank).sum()),
        f"{layer.stats.rows_sent_to_other_ranks} vs {int((owner != rank).sum())}",
    )


def check_seed_designs(checks, group):
    rank = dist.get_rank(group)
    gen = torch.Generator().manual_seed(100 + rank)

    torch.manual_seed(11)
    simple = SimpleMoE(num_experts=8, d_model=64, d_hidden=128, top_k=2).to(DEVICE)
    layer = ep.MoELayer(ep.MoEConfig(d_model=64, d_hidden=128, num_experts=8, top_k=2), group).to(DEVICE)
    load_reference(layer, simple)
    x = torch.randn(9 + 4 * rank, 64, generator=gen).to(DEVICE)
    checks.close("SimpleMoE under EP: output", layer(x), simple(x))

    torch.manual_seed(12)
    routed = ExpertRouterMoE(d_model=64, d_out=128, num_experts=8, d_hidden=256).to(DEVICE)
    config = ep.MoEConfig(d_model=64, d_hidden=256, d_out=128, num_experts=8, top_k=1)
    layer = ep.MoELayer(config, group).to(DEVICE)
    load_reference(layer, routed)
    x = torch.randn(4 + 5 * rank, 64, generator=gen).to(DEVICE)
    checks.close("ExpertRouter MoE under EP: output", layer(x), routed(x))


def expect_error(checks, name, error_type, words, build):
    try:
        build()
    except error_type as err:
        checks.true(name, all(w in str(err) for w in words), f"message {str(err)!r} lacks {words}")
    else:
        checks.true(name, False, f"no {error_type.__name__} raised")


def check_bad_input(checks, group):
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    config = ep.MoEConfig(d_model=16, d_hidden=24, num_experts=8, top_k=2)
    expect_error(
        checks,
        "configs differing across ranks fail at construction",
        ValueError,
        ["differ", "top_k"],
        lambda: ep.MoELayer(replace(config, top_k=1 + (rank == size - 1)), group),
    )
    expect_error(
        checks,
        "experts not divisible by the group size",
        ValueError,
        ["num_experts", "divisible"],
        lambda: ep.MoELayer(replace(config, num_experts=2 * size + 1), group),
    )
    layer = ep.MoELayer(config, group).to(DEVICE)
    x = torch.randn(10, 16, device=DEVICE)
    bad = x.clone()
    if rank == size - 1:
        bad[3, 0] = float("nan")
    words = ["NaN"] if rank == size - 1 else [f"[{size - 1}]", "invalid input"]
    expect_error(checks, "NaN on one rank fails on every rank", ValueError, words, lambda: layer(bad))
    wide = torch.randn(10, 17, device=DEVICE) if rank == 0 else x
    words = ["d_model=16"] if rank == 0 else ["[0]", "invalid input"]
    expect_error(
        checks, "wrong width on one rank fails on every rank", ValueError, words, lambda: layer(wide)
    )

    def forward_maybe_without_grad():
        if rank == 0:
            with torch.no_grad():
                return layer(x)
        return layer(x)

    expect_error(
        checks,
        "grad mode differing across ranks",
        RuntimeError,
        ["gradients enabled"],
        forward_maybe_without_grad,
    )
    if rank == 0:
        expect_error(
            checks, "input dtype differs from the layer's", TypeError, ["float64"], lambda: layer(x.double())
        )
    else:
        expect_error(
            checks, "peer's input dtype differs", ValueError, ["[0]", "invalid input"], lambda: layer(x)
        )
    doubled = ep.MoELayer(config, group).to(DEVICE)
    if rank == 0:
        doubled.double()
    mixed = x.double() if rank == 0 else x
    expect_error(checks, "dtypes differing across ranks", TypeError, ["dtypes"], lambda: doubled(mixed))
    out, _ = run_step(layer, x, torch.ones(10, 16, device=DEVICE))
    checks.true(
        "layer still works after rejected inputs", out.shape == (10, 16) and bool(out.isfinite().all())
    )

    # Only rank 0's input needs a gradient: every rank still runs the backward's exchanges (no hang).
    for dispatch in ("per_assignment", "once_per_rank"):
        torch.manual_seed(3)
        mixed_grad = ep.MoELayer(replace(config, dispatch=dispatch), group).to(DEVICE)
        x_maybe = x.detach().clone().requires_grad_(rank == 0)
        mixed_grad(x_maybe).sum().backward()
        ok = mixed_grad.router.weight.grad is not None and (rank != 0 or x_maybe.grad.abs().sum() > 0)
        checks.true(f"{dispatch}: only rank 0's input requires grad: backward completes", bool(ok))

    # An adversarial router sends every token to expert 0: the dropless cap refuses on every rank.
    capped = ep.MoELayer(replace(config, max_tokens_per_expert=8 * size), group, name="blocks.0.moe").to(
        DEVICE
    )
    with torch.no_grad():
        capped.router.weight.zero_()
        capped.router.bias.copy_(torch.arange(config.num_experts, 0, -1, dtype=torch.float))
    under_cap = torch.randn(8, 16, device=DEVICE)  # 8 tokens per rank: expert 0 gets exactly the cap
    checks.true("at the cap: runs", capped(under_cap).shape == (8, 16))
    expect_error(
        checks,
        "over the cap: every rank refuses",
        ValueError,
        ["'blocks.0.moe'", "expert 0", f"{9 * size} rows", "max_tokens_per_expert"],
        lambda: capped(torch.randn(9, 16, device=DEVICE)),
    )


def check_all_ranks_empty(checks, group):
    config = ep.MoEConfig(d_model=16, d_hidden=24, num_experts=8, top_k=2, capacity_factor=1.0)
    layer = ep.MoELayer(config, group).to(DEVICE)
    x = torch.zeros(0, 16, device=DEVICE)
    out, dx = run_step(layer, x, torch.zeros(0, 16, device=DEVICE))
    checks.true("every rank empty: empty output", out.shape == (0, 16) and dx.shape == (0, 16))
    checks.true("every rank empty: zero expert grads", bool((layer.experts.w1.grad == 0).all()))


def main() -> int:
    global DEVICE
    DEVICE = ep.init_distributed(timeout=timedelta(seconds=60))
    group = dist.group.WORLD
    rank = dist.get_rank()
    checks = Checks()
    try:
        for check in (
            check_contract,
            check_large_capacity_equals_dropless,
            check_once_per_rank_sends_each_token_once_per_rank,
            check_round_robin_placement,
            check_seed_designs,
            check_bad_input,
            check_all_ranks_empty,
        ):
            check(checks, group)
        return checks.verdict(rank)
    except Exception:
        traceback.print_exc()
        return 1
    except BaseException:
        ep.shutdown(barrier=False)  # a rank failing alone must not wait for peers that wait for it
        raise
    finally:
        ep.shutdown()  # no-op after the line above


if __name__ == "__main__":
    sys.exit(main())
