"""The routers of open models (issue 4), each against a written-out reference.

The references below are deliberately naive: per token, in Python loops, in
the order the papers describe them. EP equality of the same features is
checked on real ranks by tests/test_multirank.py (and test_balance.py).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import expert_parallel as ep
from expert_parallel.router import route

BASE = ep.MoEConfig(d_model=8, d_hidden=8, num_experts=8, top_k=2)


def reference_deepseek_v3(logits, bias, num_groups, group_topk, top_k, scaling, normalize):
    """DeepSeek-V3's gate, token by token: sigmoid scores, biased choice in the best groups."""
    num_tokens, num_experts = logits.shape
    per_group = num_experts // num_groups
    ids, weights = [], []
    for t in range(num_tokens):
        scores = [1 / (1 + math.exp(-float(v))) for v in logits[t]]
        biased = [s + float(b) for s, b in zip(scores, bias)]
        group_score = []
        for g in range(num_groups):
            members = sorted(biased[g * per_group : (g + 1) * per_group], reverse=True)
            group_score.append(sum(members[:2]))
        groups = sorted(range(num_groups), key=lambda g: (-group_score[g], g))[:group_topk]
        allowed = [e for e in range(num_experts) if e // per_group in groups]
        chosen = sorted(allowed, key=lambda e: (-biased[e], e))[:top_k]
        w = [scores[e] for e in chosen]
        if normalize:
            w = [v / sum(w) for v in w]
        ids.append(chosen)
        weights.append([v * scaling for v in w])
    return torch.tensor(ids), torch.tensor(weights)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("num_groups,group_topk", [(1, None), (4, 2), (8, 3), (2, 1)])
def test_deepseek_v3_gate_matches_the_written_out_reference(num_groups, group_topk, normalize):
    config = replace(
        BASE,
        num_experts=16,
        top_k=3,
        score_func="sigmoid",
        normalize_weights=normalize,
        selection_bias=True,
        num_groups=num_groups,
        group_topk=group_topk,
        routed_scaling_factor=2.5,
    )
    gen = torch.Generator().manual_seed(num_groups * 10 + (group_topk or 0))
    logits = torch.randn(40, 16, generator=gen)
    bias = torch.randn(16, generator=gen) * 0.3
    routing = route(logits, config, selection_bias_E=bias)
    want_ids, want_weights = reference_deepseek_v3(
        logits, bias, num_groups, group_topk or num_groups, 3, 2.5, normalize
    )
    assert torch.equal(routing.expert_ids, want_ids)
    assert torch.allclose(routing.weights, want_weights.float(), atol=1e-6)


def test_the_selection_bias_moves_the_choice_but_not_the_weights():
    config = replace(BASE, selection_bias=True, top_k=1)
    logits = torch.tensor([[2.0, 1.0, 0, 0, 0, 0, 0, 0]])
    bias = torch.zeros(8)
    assert route(logits, config, selection_bias_E=bias).expert_ids.tolist() == [[0]]
    bias[1] = 0.5  # softmax probs ~0.47 and ~0.17: +0.5 lifts expert 1 above expert 0
    routing = route(logits, replace(config, normalize_weights=False), selection_bias_E=bias)
    assert routing.expert_ids.tolist() == [[1]]
    assert torch.allclose(routing.weights, F.softmax(logits, -1)[:, 1:2])  # the unbiased probability


def test_normalize_min_floors_the_sum_the_chosen_scores_are_divided_by():
    """ERNIE-4.5: softmax, a selection bias, weights p_k / max(sum_k p_k, normalize_min)."""
    config = replace(BASE, selection_bias=True)
    logits = torch.tensor([[12.0, 0, 0, 0, 0, 0, 0, 0], [1.0, 2.0, 0, 0, 0, 0, 0, 0]])
    bias = torch.tensor([-1.0, 1.0, 1.0, 0, 0, 0, 0, 0])  # token 0 chooses experts 1 and 2, p ~ 6e-6 each
    probs = F.softmax(logits, dim=-1)
    for floor in (0.0, 1e-3):
        routing = route(logits, replace(config, normalize_min=floor), selection_bias_E=bias)
        assert routing.expert_ids.tolist() == [[1, 2], [1, 2]]
        chosen = probs[:, 1:3]
        want = chosen / chosen.sum(dim=-1, keepdim=True).clamp(min=floor)
        torch.testing.assert_close(routing.weights, want)
    assert routing.weights[0].sum() < 0.02 and torch.isclose(routing.weights[1].sum(), torch.tensor(1.0))


def test_group_limited_routing_sends_each_token_to_at_most_group_topk_groups():
    config = replace(BASE, num_experts=64, top_k=8, num_groups=8, group_topk=2, score_func="sigmoid")
    routing = route(torch.randn(500, 64), config)
    groups_per_token = [len(set((row // 8).tolist())) for row in routing.expert_ids]
    assert max(groups_per_token) <= 2 and min(groups_per_token) >= 1
    assert (routing.expert_ids.sort(-1).values.diff(dim=-1) > 0).all()  # distinct experts


def test_routed_scaling_multiplies_the_final_weights_also_after_drops():
    config = replace(BASE, capacity_factor=0.5, min_capacity=1)
    logits = torch.randn(30, 8)
    plain = route(logits, config)
    scaled = route(logits, replace(config, routed_scaling_factor=2.5))
    assert torch.equal(scaled.expert_ids, plain.expert_ids) and torch.equal(scaled.keep, plain.keep)
    assert torch.allclose(scaled.weights, 2.5 * plain.weights)


def test_eval_capacity_factor_replaces_the_training_factor_outside_training():
    config = replace(BASE, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=0)
    assert config.capacity(64, training=True) == 16 and config.capacity(64, training=False) == 32
    assert replace(config, eval_capacity_factor=None).capacity(64, training=False) == 16
    # A factor of E / K never drops: each expert can take every token.
    roomy = replace(config, eval_capacity_factor=4.0)
    logits = torch.zeros(64, 8)  # all ties: every token picks experts 0 and 1
    assert bool(route(logits, roomy, training=False).keep.all())
    assert int(route(logits, config, training=True).num_dropped) == 96
    torch.manual_seed(0)
    layer = ep.MoELayer(config)
    x = torch.randn(64, 8)
    layer.train()
    assert layer(x).stats.capacity == 16
    layer.eval()
    assert layer(x).stats.capacity == 32


def test_router_jitter_scales_the_router_input_in_training_only():
    config = replace(BASE, router_jitter=0.1, num_experts=4, top_k=1)
    torch.manual_seed(0)
    layer = ep.MoELayer(config)
    x = torch.randn(200, 8)
    layer.eval()
    assert torch.equal(layer._router_logits(x), layer.router(x))
    layer.train()
    torch.manual_seed(5)
    jittered = layer._router_logits(x)
    torch.manual_seed(5)
    noise = torch.empty_like(x).uniform_(0.9, 1.1)
    assert torch.allclose(jittered, layer.router(x * noise), atol=1e-6)
    assert not torch.allclose(jittered, layer.router(x))


def reference_shared(x, shared, activation):
    act = {"silu": F.silu, "swiglu": F.silu, "relu": F.relu}[activation]
    hidden = act(x @ shared.w1 + (shared.b1 if shared.b1 is not None else 0))
    if shared.w3 is not None:
        hidden = hidden * (x @ shared.w3 + (shared.b3 if shared.b3 is not None else 0))
    out = hidden @ shared.w2 + (shared.b2 if shared.b2 is not None else 0)
    if shared.gate is not None:
        out = torch.sigmoid(x @ shared.gate).unsqueeze(-1) * out
    return out


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("relu", True)])
def test_shared_experts_add_a_dense_ffn_of_their_total_width(gate, activation, bias):
    config = replace(
        BASE,
        num_shared_experts=2,
        d_shared_hidden=6,
        shared_expert_gate=gate,
        activation=activation,
        bias=bias,
    )
    torch.manual_seed(0)
    layer = ep.MoELayer(config)
    torch.manual_seed(0)
    routed_only = ep.MoELayer(replace(config, num_shared_experts=0, shared_expert_gate=False))
    assert layer.shared_experts.w1.shape == (8, 12)
    assert torch.equal(layer.experts.w1, routed_only.experts.w1)  # shared experts draw from their own seed
    x = torch.randn(2, 5, 8)
    shared = reference_shared(x.reshape(-1, 8), layer.shared_experts, activation).view(2, 5, 8)
    want = routed_only(x).out + shared
    assert torch.allclose(layer(x).out, want, atol=1e-6)


def reference_sequence_aux(probs, expert_ids, num_experts, seq_len):
    losses = []
    for start in range(0, probs.shape[0], seq_len):
        ids = expert_ids[start : start + seq_len].reshape(-1).tolist()
        f = [ids.count(i) / len(ids) for i in range(num_experts)]
        p = probs[start : start + seq_len].mean(0)
        losses.append(num_experts * sum(f[i] * float(p[i]) for i in range(num_experts)))
    return sum(losses) / len(losses)


def test_sequence_scope_aux_loss_averages_the_per_sequence_losses():
    config = replace(BASE, aux_loss_scope="sequence")
    logits = torch.randn(3 * 7, 8)
    routing = route(logits, config, sequence_length=7)
    want = reference_sequence_aux(F.softmax(logits, -1), routing.expert_ids, 8, 7)
    assert abs(float(routing.aux_loss) - want) < 1e-6
    # One sequence: the micro-batch loss.
    whole = route(logits, config, sequence_length=21)
    assert torch.allclose(whole.aux_loss, route(logits, BASE).aux_loss)


def test_the_layer_uses_sequence_scope_for_batched_input():
    config = replace(BASE, aux_loss_scope="sequence", aux_loss_coef=1.0)
    torch.manual_seed(0)
    layer = ep.MoELayer(config)
    x = torch.randn(3, 7, 8)
    aux_loss = layer(x).aux_loss
    routing = route(layer.router(x.reshape(-1, 8)), config, sequence_length=7)
    assert torch.allclose(aux_loss, routing.aux_loss)


def test_selection_bias_update_follows_the_sign_of_the_load_gap():
    config = replace(BASE, selection_bias=True, selection_bias_rate=0.01, num_experts=4, top_k=1)
    torch.manual_seed(0)
    layer = ep.MoELayer(config)
    forced = torch.tensor([[0]] * 6 + [[1]] * 2 + [[2]] * 2 + [[3]] * 2)  # loads 6, 2, 2, 2: mean 3
    layer.forced_expert_ids = forced
    choices_E = layer(torch.randn(12, 8)).stats.choices_per_expert
    assert choices_E.tolist() == [6, 2, 2, 2]
    with pytest.raises(ValueError, match="choices per expert"):
        layer.after_optimizer_step()  # the caller owns the step's counts: they must be passed
    assert torch.equal(layer.selection_bias, torch.zeros(4))
    layer.after_optimizer_step(choices_E)
    assert torch.allclose(layer.selection_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    # The bias is state; per-step counts are not: the layer keeps no count buffer.
    assert [name for name, _ in layer.named_buffers()] == ["selection_bias"]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    attributes = set(vars(layer))
    layer(torch.randn(12, 8))  # a training forward writes nothing to the layer
    assert set(vars(layer)) == attributes
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_aux_loss_free_balancing_evens_out_a_skewed_router():
    config = replace(
        BASE, selection_bias=True, selection_bias_rate=0.01, score_func="sigmoid", aux_loss_coef=0.0
    )
    torch.manual_seed(0)
    layer = ep.MoELayer(config)
    with torch.no_grad():
        layer.router.bias.copy_(torch.linspace(2, -2, 8))  # a strong preference for low ids
    x = torch.randn(512, 8)
    stats = layer(x).stats
    before = stats.tokens_per_expert.float()
    for _ in range(300):
        layer.after_optimizer_step(stats.choices_per_expert)
        stats = layer(x).stats
    after = stats.tokens_per_expert.float()
    assert before.max() / before.mean() > 2.0
    assert after.max() / after.mean() < 1.3


@pytest.mark.parametrize(
    "changes,words",
    [
        ({"num_groups": 3}, ["num_groups=3", "divide"]),
        ({"num_groups": 4, "group_topk": 5}, ["group_topk=5", "num_groups=4"]),
        ({"num_groups": 8, "group_topk": 1, "top_k": 2}, ["fewer than top_k=2"]),
        ({"selection_bias_rate": 0.1}, ["selection_bias_rate", "selection_bias=true"]),
        ({"shared_expert_gate": True}, ["num_shared_experts"]),
        ({"router_jitter": 1.0}, ["router_jitter"]),
        ({"routed_scaling_factor": 0.0}, ["routed_scaling_factor"]),
        ({"eval_capacity_factor": -1.0}, ["eval_capacity_factor"]),
        ({"aux_loss_scope": "batch"}, ["aux_loss_scope"]),
        ({"normalize_min": -1e-3}, ["normalize_min"]),
        ({"normalize_min": 1e-12, "normalize_weights": False}, ["normalize_min", "normalize_weights=true"]),
        ({"swiglu_alpha": 1.702}, ["swiglu_alpha", "clamped_swiglu", "activation='relu'"]),
        ({"activation": "clamped_swiglu", "swiglu_alpha": 1.702}, ["swiglu_limit", "required"]),
        (
            {"activation": "clamped_swiglu", "swiglu_alpha": 1.0, "swiglu_limit": -7.0},
            ["swiglu_limit", "> 0"],
        ),
        ({"scale_expert_input": 1}, ["scale_expert_input", "bool"]),
    ],
)
def test_routing_features_are_validated(changes, words):
    with pytest.raises(ValueError) as err:
        replace(BASE, **changes)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_the_selection_bias_stays_float32_when_the_layer_is_cast():
    torch.manual_seed(0)
    layer = ep.MoELayer(replace(BASE, selection_bias=True, selection_bias_rate=1e-3))
    layer.selection_bias.fill_(1.0001)  # not representable in bf16
    layer.to(torch.bfloat16)
    assert layer.router.weight.dtype == torch.bfloat16
    assert layer.selection_bias.dtype == torch.float32 and float(layer.selection_bias[0]) == pytest.approx(
        1.0001
    )
    assert "selection_bias" in layer.state_dict()
