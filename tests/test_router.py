"""route(): top-k, weights, capacity drops and losses, against written-out examples and formulas."""

import math

import pytest
import torch

from expert_parallel import MoEConfig, route
from expert_parallel.router import keep_within_capacity


def config(**overrides):
    return MoEConfig(**{"d_model": 4, "d_hidden": 4, "num_experts": 4, "top_k": 2, **overrides})


def test_topk_best_first_and_softmax_over_the_chosen_logits():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.0]])
    routing = route(logits, config())
    assert routing.expert_ids.tolist() == [[1, 3]]
    want = torch.softmax(torch.tensor([2.0, 1.0]), dim=0)
    assert torch.equal(routing.weights[0], want)
    assert routing.keep.all() and routing.tokens_per_expert.tolist() == [0, 1, 0, 1]


def test_unnormalised_softmax_weights_are_the_probabilities():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.0]])
    routing = route(logits, config(normalize_weights=False))
    probs = torch.softmax(logits[0], dim=0)
    torch.testing.assert_close(routing.weights[0], probs[[1, 3]])


def test_sigmoid_weights_normalised_and_not():
    logits = torch.tensor([[0.5, -0.2, 3.0, 1.0]])
    scores = torch.sigmoid(logits[0])[[2, 3]]
    torch.testing.assert_close(route(logits, config(score_func="sigmoid")).weights[0], scores / scores.sum())
    plain = route(logits, config(score_func="sigmoid", normalize_weights=False))
    torch.testing.assert_close(plain.weights[0], scores)


def test_top1_normalised_weight_is_exactly_one():
    logits = torch.randn(50, 4)
    assert torch.equal(route(logits, config(top_k=1)).weights, torch.ones(50, 1))


def test_ties_go_to_the_lower_expert_id():
    routing = route(torch.zeros(3, 4), config(top_k=3))
    assert routing.expert_ids.tolist() == [[0, 1, 2]] * 3


def test_position_policy_worked_example():
    # T=3, K=2, E=2, capacity 2. Choice-major queues:
    #   expert 0: (k0,t0) (k0,t1) | (k1,t2)  -> t2's second choice dropped
    #   expert 1: (k0,t2) (k1,t0) | (k1,t1)  -> t1's second choice dropped
    expert_ids = torch.tensor([[0, 1], [0, 1], [1, 0]])
    keep = keep_within_capacity(expert_ids, torch.rand(3, 2), capacity=2, num_experts=2, policy="position")
    assert keep.tolist() == [[True, True], [True, False], [True, False]]


def test_position_policy_every_first_choice_before_any_second_choice():
    # Tokens 0..2 pick expert 0 second, token 3 picks it first; C = 2 per expert:
    # token 3's first choice (expert 0) is served before tokens 0..2's second choices.
    logits = torch.tensor(
        [[5.0, 9.0, 0.0, 0.0], [5.0, 0.0, 9.0, 0.0], [5.0, 0.0, 0.0, 9.0], [9.0, 5.0, 0.0, 0.0]]
    )
    routing = route(logits, config(capacity_factor=1.0, min_capacity=0))
    # C = ceil(1.0 * 4 * 2 / 4) = 2 per expert: expert 0 takes t3 (first choice), then t0 (second).
    assert routing.keep.tolist() == [[True, True], [True, False], [True, False], [True, True]]
    assert routing.tokens_per_expert.tolist() == [2, 2, 1, 1]
    assert routing.num_dropped.item() == 2


def test_probs_policy_keeps_the_highest_scores():
    # All four tokens pick expert 0 first; capacity 2 keeps the two most confident ones.
    logits = torch.tensor([[1.0, 0, 0, 0], [4.0, 0, 0, 0], [2.0, 0, 0, 0], [3.0, 0, 0, 0]])
    routing = route(logits, config(top_k=1, capacity_factor=2.0, min_capacity=0, drop_policy="probs"))
    assert routing.keep[:, 0].tolist() == [False, True, False, True]
    position = route(logits, config(top_k=1, capacity_factor=2.0, min_capacity=0))
    assert position.keep[:, 0].tolist() == [True, True, False, False]


def test_probs_policy_ties_fall_back_to_position_order():
    logits = torch.zeros(5, 4)
    routing = route(logits, config(top_k=1, capacity_factor=0.8, min_capacity=0, drop_policy="probs"))
    # C = ceil(0.8 * 5 / 4) = 1: expert 0 (the tie winner) keeps token 0 only.
    assert routing.keep[:, 0].tolist() == [True, False, False, False, False]


def test_dropped_weights_are_zero_and_the_rest_not_renormalised():
    logits = torch.randn(64, 4) * 3
    full = route(logits, config())
    capped = route(logits, config(capacity_factor=0.5, min_capacity=0))
    assert (~capped.keep).any()
    assert torch.equal(capped.weights, torch.where(capped.keep, full.weights, 0.0))


def test_expert_drops_only_when_full_and_never_exceeds_capacity():
    for policy in ("position", "probs"):
        logits = torch.randn(200, 8) + torch.linspace(0, 3, 8)  # skewed towards high ids
        cfg = MoEConfig(
            d_model=4, d_hidden=4, num_experts=8, top_k=2, capacity_factor=0.7, drop_policy=policy
        )
        routing = route(logits, cfg)
        wanted = torch.bincount(routing.expert_ids.flatten(), minlength=8)
        kept = routing.tokens_per_expert
        assert (kept <= routing.capacity).all()
        assert torch.equal(kept, torch.minimum(wanted, torch.tensor(routing.capacity)))
        assert routing.num_dropped.item() == int((wanted - kept).sum())


def test_aux_loss_is_switch_formula_before_dropping():
    logits = torch.randn(32, 4)
    routing = route(logits, config(capacity_factor=0.5, min_capacity=0))
    probs = torch.softmax(logits, dim=-1)
    picks = torch.zeros(4)
    for expert in routing.expert_ids.flatten().tolist():
        picks[expert] += 1
    want = 4 * sum((picks[i] / 64) * probs[:, i].mean() for i in range(4))
    torch.testing.assert_close(routing.aux_loss, want)


def test_aux_loss_is_one_for_perfectly_uniform_routing():
    # Each token sees equal probabilities: P_i = 1/E, sum_i f_i = 1 -> aux = E * (1/E) = 1.
    assert route(torch.zeros(8, 4), config()).aux_loss.item() == pytest.approx(1.0)


def test_sigmoid_aux_loss_uses_scores_normalised_to_sum_to_one():
    logits = torch.randn(16, 4)
    routing = route(logits, config(score_func="sigmoid"))
    scores = torch.sigmoid(logits)
    probs = scores / scores.sum(-1, keepdim=True)
    picks = torch.bincount(routing.expert_ids.flatten(), minlength=4).float() / 32
    torch.testing.assert_close(routing.aux_loss, 4 * (picks * probs.mean(0)).sum())


def test_z_loss_is_mean_squared_logsumexp():
    logits = torch.randn(10, 4)
    want = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 10
    assert route(logits, config()).z_loss.item() == pytest.approx(want, rel=1e-5)


def test_huge_and_underflowing_sigmoid_logits_stay_finite():
    logits = torch.tensor([[-1e4, -1e4, -2e4, -3e4], [1e4, -1e4, 1e4, 0.0]], requires_grad=True)
    routing = route(logits, config(score_func="sigmoid", capacity_factor=1.0, drop_policy="probs"))
    assert torch.isfinite(routing.weights).all() and (routing.weights >= 0).all()
    assert torch.isfinite(routing.aux_loss) and torch.isfinite(routing.z_loss)
    torch.testing.assert_close(routing.weights[0], torch.tensor([0.5, 0.5]))
    (routing.weights.sum() + routing.aux_loss).backward()
    assert torch.isfinite(logits.grad).all()


def test_zero_tokens():
    logits = torch.zeros(0, 4, requires_grad=True)
    routing = route(logits, config(capacity_factor=1.0))
    assert routing.expert_ids.shape == (0, 2) and routing.tokens_per_expert.tolist() == [0, 0, 0, 0]
    assert routing.aux_loss.item() == 0.0 and routing.z_loss.item() == 0.0
    routing.aux_loss.backward()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_raise(bad):
    logits = torch.randn(5, 4)
    logits[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        route(logits, config())


def test_wrong_shape_or_dtype_raises():
    with pytest.raises(ValueError, match="num_experts=4"):
        route(torch.randn(5, 3), config())
    with pytest.raises(TypeError, match="floating point"):
        route(torch.ones(5, 4, dtype=torch.long), config())


def test_forced_expert_ids_replace_the_choice_and_keep_weights_and_capacity():
    config = MoEConfig(d_model=4, d_hidden=4, num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1)
    logits = torch.randn(8, 4)
    forced = torch.tensor([[0, 1]] * 8)
    routing = route(logits, config, forced)
    assert torch.equal(routing.expert_ids, forced)
    # capacity ceil(1.0 * 8 * 2 / 4) = 4: experts 0 and 1 keep 4 each, the rest is dropped
    assert routing.tokens_per_expert.tolist() == [4, 4, 0, 0]
    expected = torch.softmax(logits[:, :2], dim=-1) * routing.keep
    assert torch.allclose(routing.weights, expected)
    for bad in (torch.tensor([[0, 0]] * 8), torch.tensor([[0, 4]] * 8), torch.tensor([[0, 1]] * 7)):
        with pytest.raises(ValueError, match="forced expert ids"):
            route(logits, config, bad)
