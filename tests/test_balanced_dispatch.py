"""Balanced dispatch: the pure plan (balance_plan.py) alone, then the layer on real gloo ranks.

- The plan: worked examples (every first choice on one expert, Zipf, uniform,
  no rows), and for random counts: every row assigned exactly once, every
  rank within ceil(M / P), local experts first, the same plan for the same input.
- The fallback rule: small or near-even calls keep the standard dispatch.
- On 2 and 4 ranks, with every first choice forced onto one expert:
  outputs, aux loss, input, router and expert gradients equal the standard
  all-to-all dispatch (1e-5), dropless and with a capacity, swiglu with
  biases, with replicas (placement), with the global-batch aux loss and
  under activation checkpointing; AdamW steps keep both layers equal (the
  optimizer state stays with the owner); RoutingStats report the balance.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from asserts import assert_close, assert_equal
from rankpool import on_ranks
from torch.utils.checkpoint import checkpoint

import expert_parallel as ep
from expert_parallel.balance_plan import (
    FIXED_COST_ROWS,
    WEIGHT_COST_ROWS,
    max_over_mean,
    plan_balance,
    worth_balancing,
)
from expert_parallel.placement import balance

TOL = 1e-5
BASE = ep.MoEConfig(d_model=12, d_hidden=16, num_experts=8, top_k=2, aux_loss_coef=0.01)
BALANCED = ep.ExecutionConfig(dispatch="balanced")


def check_plan(rows_PE: list[list[int]], e: int):
    """The plan's invariants for any counts; returns the plan."""
    plan = plan_balance(rows_PE, e)
    size = len(rows_PE)
    unit_expert = [g for units in plan.units for g in units]
    for p in range(size):  # every row of (p, g) assigned exactly once
        for g in range(size * e):
            assigned = sum(n for u, n in enumerate(plan.rows_PU[p]) if unit_expert[u] == g)
            assert assigned == rows_PE[p][g], (p, g)
    total = sum(map(sum, rows_PE))
    cap = -(-total // size)
    assert max(plan.rows_after) <= cap
    assert sum(plan.rows_after) == total
    for d, units in enumerate(plan.units):
        assert list(units[:e]) == list(range(d * e, (d + 1) * e))  # local experts first
        assert list(units[e:]) == sorted(plan.borrowed[d]) and all(g // e != d for g in plan.borrowed[d])
    offsets = plan.unit_offsets()
    for d in range(size):  # a rank borrows only experts it runs rows of
        for i in range(len(plan.borrowed[d])):
            assert sum(row[offsets[d] + e + i] for row in plan.rows_PU) > 0
    assert plan_balance([list(row) for row in rows_PE], e) == plan  # a pure function of the counts
    return plan


def test_worked_example_of_the_docstring():
    plan = check_plan([[4, 1, 1, 2], [4, 2, 1, 1]], 2)
    # L = [8, 3, 2, 3]: rank 0 would run 11 rows, rank 1 5; cap = 8. Rank 0 sheds 3 rows of
    # expert 0 to rank 1, which takes them from its own 4 rows of expert 0.
    assert plan.rows_before == (11, 5) and plan.rows_after == (8, 8)
    assert plan.units == ((0, 1), (2, 3, 0)) and plan.borrowed == ((), (0,))
    assert plan.rows_PU == ((4, 1, 1, 2, 0), (1, 2, 1, 1, 3))


def test_every_first_choice_on_one_expert():
    # 4 ranks, 2 experts each, 100 tokens per rank, top-2: every first choice on expert 0,
    # the second choices spread over experts 1-7 (14, 14, 14, 14, 14, 14, 16 rows per rank).
    rows_PE = [[100, 14, 14, 14, 14, 14, 14, 16] for _ in range(4)]
    plan = check_plan(rows_PE, 2)
    assert plan.rows_before == (456, 112, 112, 120)
    assert max_over_mean(plan.rows_before) == pytest.approx(456 / 200)
    assert plan.rows_after == (200, 200, 200, 200)  # M = 800, exactly the mean
    assert plan.borrowed == ((), (0,), (0,), (0,))  # only the hot expert travels
    # Rank 0 sheds 456 - 200 = 256 rows of expert 0; ranks 1, 2, 3 have room 88, 88, 80 and fill
    # it with their own tokens' rows of expert 0 (they have 100 each), so none of those travel.
    offsets = plan.unit_offsets()
    for d, room in ((1, 88), (2, 88), (3, 80)):
        assert [row[offsets[d] + 2] for row in plan.rows_PU] == [room if p == d else 0 for p in range(4)]


def test_zipf_and_uniform_and_empty():
    zipf = (1.0 / torch.arange(1, 17, dtype=torch.float64) ** 1.2).tolist()
    rows_PE = [[round(400 * w / sum(zipf) * (1 + 0.1 * p)) for w in zipf] for p in range(4)]
    plan = check_plan(rows_PE, 4)
    assert max_over_mean(plan.rows_before) > 1.5 and max_over_mean(plan.rows_after) <= 1.01
    uniform = check_plan([[50] * 8 for _ in range(4)], 2)
    assert uniform.borrowed == ((), (), (), ()) and uniform.rows_after == uniform.rows_before
    empty = check_plan([[0] * 8 for _ in range(4)], 2)
    assert empty.rows_after == (0, 0, 0, 0) and empty.borrowed == ((), (), (), ())
    assert max_over_mean(empty.rows_after) == 1.0


def test_random_counts_keep_every_invariant():
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        size = int(torch.randint(1, 7, (), generator=gen))
        e = int(torch.randint(1, 4, (), generator=gen))
        skew = torch.rand(size * e, generator=gen) ** 4 * 50
        rows_PE = torch.poisson(skew.expand(size, -1).contiguous(), generator=gen).long().tolist()
        plan = check_plan(rows_PE, e)
        total = sum(map(sum, rows_PE))
        if total >= 20 * size:
            assert max_over_mean(plan.rows_after) <= 1.05, (trial, rows_PE)


def test_the_fallback_keeps_small_or_even_calls_standard():
    hot = [[400, 56, 56, 56, 56, 56, 56, 64] for _ in range(4)]
    assert worth_balancing(plan_balance(hot, 2), 2)
    # The same skew at a quarter of the tokens: 256 rows saved on rank 0 cannot pay for 3 copies.
    small = [[100, 14, 14, 14, 14, 14, 14, 16] for _ in range(4)]
    assert not worth_balancing(plan_balance(small, 2), 2)
    assert worth_balancing(plan_balance(small, 2), 2, weight_cost_rows=0, fixed_cost_rows=0)
    # Near-even: at most a 4% gain to have, under the 10% the rule asks for before moving weights.
    even = [[500, 500, 500, 500, 500, 500, 520, 520] for _ in range(4)]
    assert not worth_balancing(plan_balance(even, 2), 2)
    assert worth_balancing(plan_balance(even, 2), 2, weight_cost_rows=0, fixed_cost_rows=0, gain=1.0)
    # The threshold is the rule's: the busiest balanced rank's rows, its weight copies, the fixed cost.
    plan = plan_balance(hot, 2)
    balanced = plan.rows_after[0] + 3 * WEIGHT_COST_ROWS + FIXED_COST_ROWS  # rank 0 lends 3 copies
    assert worth_balancing(plan, 2, gain=balanced / max(plan.rows_before))
    assert not worth_balancing(plan, 2, gain=balanced / max(plan.rows_before) - 1e-9)


# --- on real gloo ranks ---------------------------------------------------------------------


def skewed_routes(num_tokens: int, config: ep.MoEConfig, gen: torch.Generator, hot: int = 0):
    """[T, K]: every first choice on expert `hot`, the other choices distinct and random."""
    if num_tokens == 0:
        return torch.zeros(0, config.top_k, dtype=torch.long)
    others = torch.stack([torch.randperm(config.num_experts - 1, generator=gen) for _ in range(num_tokens)])
    others = others + (others >= hot).long()  # skip the hot expert
    return torch.cat([torch.full((num_tokens, 1), hot), others[:, : config.top_k - 1]], dim=1)


def step(layer, x, upstream, choices_before=None, recompute=False):
    x = x.detach().clone().requires_grad_(True)
    if recompute:
        out, aux, stats = checkpoint(layer, x, choices_before, use_reentrant=False)
    else:
        out, aux, stats = layer(x, choices_before)
    ((out * upstream).sum() + aux).backward()
    return out.detach(), x.grad, aux.detach(), stats


# id: (config, tokens per rank for rank 0 (rank r adds 7 r), redundant experts per rank, hot expert)
CASES = {
    "dropless": (BASE, 768, 0, 0),
    "capacity-3.5-swiglu-bias": (
        replace(BASE, capacity_factor=3.5, min_capacity=1, activation="swiglu", bias=True),
        768,
        0,
        5,
    ),
    "replicas": (BASE, 768, 1, 3),
    "global-batch-aux": (replace(BASE, aux_loss_scope="global_batch", aux_loss_coef=1.0), 768, 0, 0),
    "top3-recompute": (replace(BASE, top_k=3), 1400, 0, 7),
}


def one_case(case: str):
    config, tokens, redundant, hot = CASES[case]
    rank, world = dist.get_rank(), dist.get_world_size()
    placement = None
    if redundant:
        load = torch.ones(config.num_experts)
        load[(hot + 1) % config.num_experts] = 20.0  # replicas for another expert: `hot` stays hot
        placement = balance(load, world, redundant * world)
    torch.manual_seed(1)
    standard = ep.MoELayer(config, dist.group.WORLD, placement=placement)
    torch.manual_seed(1)
    balanced = ep.MoELayer(config, dist.group.WORLD, execution=BALANCED, placement=placement)
    gen = torch.Generator().manual_seed(100 + rank)
    num_tokens = tokens + 7 * rank
    x = torch.randn(num_tokens, config.d_model, generator=gen)
    upstream = torch.randn(num_tokens, config.d_out, generator=gen)
    standard.forced_expert_ids = balanced.forced_expert_ids = skewed_routes(num_tokens, config, gen, hot)
    before = None
    if config.aux_loss_scope == "global_batch":  # an earlier micro-batch's choices
        before = torch.randint(0, 30, (config.num_experts,), generator=gen)
    recompute = "recompute" in case
    want = step(standard, x, upstream, before, recompute)
    got = step(balanced, x, upstream, before, recompute)
    standard.sync_replica_grads()
    balanced.sync_replica_grads()
    return standard, balanced, want, got


@pytest.mark.parametrize("case", CASES)
@on_ranks(2, 4)
def test_balanced_equals_the_standard_dispatch(case):
    standard, balanced, want, got = one_case(case)
    for name, w, g in zip(("output", "input grad", "aux loss"), want, got):
        assert_close(name, g, w, TOL)
    stats_w, stats_g = want[3], got[3]
    assert_equal("tokens per expert", stats_g.tokens_per_expert, stats_w.tokens_per_expert)
    assert_equal("dropped", stats_g.num_dropped, stats_w.num_dropped)
    if balanced.config.capacity_factor is not None:  # the hot expert overflows its capacity
        assert int(stats_g.num_dropped) > 0
    for name, param in balanced.named_parameters():
        assert_close(f"grad {name}", param.grad, dict(standard.named_parameters())[name].grad, TOL)
    # The plan ran: every first choice on one expert is far from even before, within the bound after.
    assert bool(stats_g.balanced) and not bool(stats_w.balanced)
    assert float(stats_g.rank_rows_before) == pytest.approx(float(stats_w.rank_rows_before))
    assert float(stats_g.rank_rows_before) > 1.2
    assert float(stats_w.rank_rows_after) == float(stats_w.rank_rows_before)
    rows = torch.tensor([int(stats_g.tokens_per_expert.sum())])
    dist.all_reduce(rows)
    total, world = int(rows), dist.get_world_size()
    assert float(stats_g.rank_rows_after) <= -(-total // world) * world / total + 1e-6
    # The optimizer state stays with the owner: AdamW over the same parameters keeps them equal.
    optimizers = [torch.optim.AdamW(layer.parameters(), lr=1e-2) for layer in (standard, balanced)]
    for optimizer in optimizers:
        optimizer.step()
    for (name, p_w), p_g in zip(standard.named_parameters(), balanced.parameters()):
        assert_close(f"after a step: {name}", p_g, p_w, TOL)
        assert optimizers[1].state[p_g]["exp_avg"].shape == p_g.shape


@on_ranks(2, 4)
def test_a_small_or_even_call_falls_back_to_the_standard_dispatch():
    rank = dist.get_rank()
    torch.manual_seed(2)
    standard = ep.MoELayer(BASE, dist.group.WORLD)
    torch.manual_seed(2)
    balanced = ep.MoELayer(BASE, dist.group.WORLD, execution=BALANCED)
    gen = torch.Generator().manual_seed(rank)
    for num_tokens, forced in ((6, True), (200, False), (0, True)):
        x = torch.randn(num_tokens + rank, BASE.d_model, generator=gen)
        upstream = torch.randn(num_tokens + rank, BASE.d_out, generator=gen)
        routes = skewed_routes(num_tokens + rank, BASE, gen) if forced else None
        if not forced:  # round-robin: an even load
            routes = (torch.arange((num_tokens + rank) * 2).view(-1, 2) + rank) % BASE.num_experts
        standard.forced_expert_ids = balanced.forced_expert_ids = routes
        want, got = step(standard, x, upstream), step(balanced, x, upstream)
        assert not bool(got[3].balanced), num_tokens
        for name, w, g in zip(("output", "input grad", "aux loss"), want[:3], got[:3]):
            assert_equal(f"{name} ({num_tokens} tokens)", g, w)
        assert float(got[3].rank_rows_after) == float(got[3].rank_rows_before)


@pytest.mark.dist
@pytest.mark.slow
def test_the_trainer_logs_the_ranks_rows_before_and_after(tmp_path):
    """All-to-one forced routing on tiny.toml's 2 ranks: rank 0 would run every row (2.00), balanced 1.00."""
    import json

    from multirank import REPO, run_module

    config = tmp_path / "tiny_balanced.toml"
    config.write_text((REPO / "configs" / "tiny.toml").read_text() + '\n[execution]\ndispatch = "balanced"\n')
    out = tmp_path / "run"
    done = run_module(
        2,
        *("-m", "benchmarks.train_forced", "--routing", "one", "--config", str(config)),
        *("train.steps=2", "train.log_every=1", "train.eval_every=100", "train.checkpoint_every=0"),
        f"train.out_dir={out}",
    )
    assert done.stdout.decode().count("ranks 2.00->1.00") == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [
        (row["rank_rows_max_over_mean_before"], row["rank_rows_max_over_mean_after"]) for row in rows
    ] == [
        (2.0, 1.0),
        (2.0, 1.0),
    ]


@on_ranks(2)
def test_a_rank_borrowing_two_experts_runs_them_through_grouped_mm_with_lora_adapters():
    """Rank 0 owns experts 0-3 and every row: it lends two (0 and 1) to rank 1. The borrowed weights
    arrive as contiguous stacks (grouped_mm takes no other), and LoRA adapters on the experts (lent
    as W + s·A@B) get the standard dispatch's gradients."""
    from expert_parallel import lora

    rank = dist.get_rank()
    layers = []
    for dispatch in ("per_assignment", "balanced"):
        torch.manual_seed(3)
        layer = ep.MoELayer(
            BASE, dist.group.WORLD, execution=ep.ExecutionConfig(dispatch=dispatch, gemm="grouped_mm")
        )
        lora.add_lora(layer, lora.LoraConfig(r=2, alpha=4.0))
        with torch.no_grad():  # B is zero at the start: make the adapters matter
            for name, param in layer.experts.lora.named_parameters():
                if name.endswith("_b"):
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(rank)))
        layers.append(layer)
    gen = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(768, BASE.d_model, generator=gen)
    upstream = torch.randn(768, BASE.d_out, generator=gen)
    pairs = torch.tensor([[0, 1], [2, 3]])
    for layer in layers:
        layer.forced_expert_ids = pairs[torch.arange(768) % 2]
    (want, want_grad, _, _), (got, got_grad, _, stats) = (step(layer, x, upstream) for layer in layers)
    assert bool(stats.balanced) and float(stats.rank_rows_after) == 1.0
    assert_close("output", got, want, TOL)
    assert_close("input grad", got_grad, want_grad, TOL)
    for (name, p_w), p_g in zip(layers[0].named_parameters(), layers[1].parameters()):
        assert (p_g.grad is None) == (p_w.grad is None) == (not p_w.requires_grad), name
        if p_w.requires_grad:
            assert_close(f"grad {name}", p_g.grad, p_w.grad, TOL)
