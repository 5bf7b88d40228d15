"""Properties of route() and dispatch over random shapes, capacities, policies and hostile logits.

Every example checks the drop rules, that nothing is lost or duplicated, and
that the numbers stay finite. Bounded example counts keep CI fast.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expert_parallel import MoEConfig, route
from expert_parallel.permutation import combine, permute, plan_dispatch

LOGIT_KINDS = ("normal", "skewed", "ties", "huge")
CAPACITY_FACTORS = st.one_of(
    st.none(), st.sampled_from([1e-3, 0.1, 0.5, 1.0, 1.25, 2.0, 64.0]), st.floats(0.01, 8.0)
)
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def make_logits(kind: str, num_tokens: int, num_experts: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    if kind == "skewed":  # a few experts are everyone's favourite
        logits[:, : max(1, num_experts // 8)] += 6.0
    elif kind == "ties":  # few distinct values: many exact ties within and across tokens
        logits = torch.randint(0, 2, (num_tokens, num_experts), generator=gen).float()
    elif kind == "huge":  # saturates softmax and sigmoid; exp under/overflows without care
        logits = torch.randint(-1, 2, (num_tokens, num_experts), generator=gen).float() * 1e4
    return logits


@st.composite
def cases(draw):
    num_experts = draw(st.integers(1, 64))
    config = MoEConfig(
        d_model=4,
        d_hidden=4,
        num_experts=num_experts,
        top_k=draw(st.integers(1, min(num_experts, 8))),
        capacity_factor=draw(CAPACITY_FACTORS),
        min_capacity=draw(st.integers(0, 6)),
        drop_policy=draw(st.sampled_from(["position", "probs"])),
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        normalize_weights=draw(st.booleans()),
    )
    num_tokens = draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, 400)))
    logits = make_logits(
        draw(st.sampled_from(LOGIT_KINDS)), num_tokens, num_experts, draw(st.integers(0, 2**31))
    )
    return config, logits


@PROPERTY_SETTINGS
@given(cases())
def test_route_keeps_the_drop_rules_and_loses_nothing(case):
    config, logits = case
    num_tokens, num_experts, top_k = logits.shape[0], config.num_experts, config.top_k
    routing = route(logits, config)
    ids, keep, weights = routing.expert_ids, routing.keep, routing.weights

    # Choices are distinct experts, best first.
    assert ids.shape == (num_tokens, top_k) and ((ids >= 0) & (ids < num_experts)).all()
    assert all(len(set(row)) == top_k for row in ids.tolist())
    chosen_logits = logits.gather(1, ids)
    assert (chosen_logits[:, :-1] >= chosen_logits[:, 1:]).all()

    # Counting: kept + dropped = T * k, and the reported counts are the real ones.
    wanted_E = torch.bincount(ids.flatten(), minlength=num_experts)
    kept_E = torch.bincount(ids[keep], minlength=num_experts)
    assert torch.equal(routing.tokens_per_expert, kept_E)
    assert int(routing.num_dropped) == num_tokens * top_k - int(kept_E.sum()) == int((~keep).sum())

    # Capacity: never exceeded, and an expert drops only when it is full.
    if routing.capacity is None:
        assert keep.all()
    else:
        assert (kept_E <= routing.capacity).all()
        assert torch.equal(kept_E, torch.minimum(wanted_E, torch.tensor(routing.capacity)))
        check_policy_order(config, logits, ids, keep)

    # Weights: finite, non-negative, zero exactly where dropped; losses finite.
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    assert (weights[~keep] == 0).all()
    assert torch.isfinite(routing.aux_loss) and torch.isfinite(routing.z_loss)


def check_policy_order(config, logits, ids, keep):
    """Inside each expert's queue, every kept assignment precedes every dropped one."""
    num_tokens = logits.shape[0]
    # The router's own score formulas, so that rounding ties fall the same way.
    if config.score_func == "softmax":
        scores = torch.softmax(logits, dim=-1).gather(1, ids)
    else:
        scores = torch.nn.functional.logsigmoid(logits).exp().gather(1, ids)
    for expert in range(config.num_experts):
        tokens, choices = (ids == expert).nonzero(as_tuple=True)
        if config.drop_policy == "position":
            order = sorted(range(len(tokens)), key=lambda i: (choices[i].item(), tokens[i].item()))
            kept = [keep[tokens[i], choices[i]].item() for i in order]
            assert kept == sorted(kept, reverse=True), (
                f"expert {expert}: a later position kept over an earlier"
            )
        else:
            kept_scores = scores[tokens, choices][keep[tokens, choices]]
            dropped_scores = scores[tokens, choices][~keep[tokens, choices]]
            if len(kept_scores) and len(dropped_scores):
                assert kept_scores.min() >= dropped_scores.max()
    assert keep.shape == (num_tokens, config.top_k)


@PROPERTY_SETTINGS
@given(cases())
def test_every_kept_assignment_is_dispatched_once_and_returns_to_its_token(case):
    config, logits = case
    num_tokens, top_k = logits.shape[0], config.top_k
    routing = route(logits, config)
    plan = plan_dispatch(routing)
    kept_slots = routing.keep.flatten().nonzero().flatten()
    assert sorted(plan.slot_R.tolist()) == kept_slots.tolist()
    assert plan.rows_per_expert == routing.tokens_per_expert.tolist()
    assert torch.equal(plan.token_R, plan.slot_R // top_k)
    # Rows grouped by expert: the expert of each row is non-decreasing.
    row_experts = routing.expert_ids.flatten()[plan.slot_R]
    assert (row_experts[1:] >= row_experts[:-1]).all()
    # Identity experts: the combine gives back sum_k weight_tk * x_t.
    x = torch.randn(num_tokens, 3, dtype=torch.double)
    out = combine(permute(x, plan), routing.weights.double(), plan)
    torch.testing.assert_close(out, routing.weights.double().sum(1, keepdim=True) * x)
