"""Activation checkpointing: a recompute counts nothing again, reuses the forward's routing and counts.

Each case runs one step of two micro-batches through a small block (a
Linear, then the MoE layer) twice from the same seed: plainly, and under
torch.utils.checkpoint (non-reentrant), so that the backward recomputes the
block. Outputs, aux losses, statistics, every gradient and the selection bias
after `after_optimizer_step` must be bitwise equal. A wrapper around
torch.distributed counts the collectives: the recompute exchanges no counts
(no all-gather, no all-reduce) and only resends the token rows.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.distributed as dist
from collectives import counting_collectives
from rankpool import on_ranks
from torch import nn
from torch.utils.checkpoint import checkpoint

import expert_parallel as ep

D = 8


def _config(capacity_factor, scope) -> ep.MoEConfig:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return ep.MoEConfig(
        d_model=D,
        d_hidden=16,
        num_experts=4 * world,
        top_k=2,
        capacity_factor=capacity_factor,
        min_capacity=1,
        aux_loss_scope=scope,
        router_jitter=0.1,  # the recompute must draw the same jitter: the generator is restored
        selection_bias=True,
        selection_bias_rate=0.01,
    )


def _one_step(config, execution, checkpointed: bool, forced=None) -> dict:
    """Two micro-batches and the selection-bias update; everything the step produced, per name."""
    group = dist.group.WORLD if dist.get_world_size() > 1 else None
    torch.manual_seed(0)
    proj = nn.Linear(D, D)
    layer = ep.MoELayer(config, group, execution=execution)
    layer.train()
    rank = dist.get_rank()

    def block(x, choices_before_E):
        return layer(proj(x), choices_before_E)

    results, choices_E = {}, None
    phases = {"forward": Counter(), "backward": Counter()}
    for micro in range(2):
        generator = torch.Generator().manual_seed(100 * rank + micro)
        x = torch.randn(24 + 8 * rank, D, generator=generator).requires_grad_()  # ranks differ in T
        if forced is not None:
            layer.forced_expert_ids = forced[0]
        with counting_collectives(phases["forward"]):
            out = (
                checkpoint(block, x, choices_E, use_reentrant=False) if checkpointed else block(x, choices_E)
            )
        if forced is not None:  # a recompute that routed again would take these instead
            layer.forced_expert_ids = forced[1]
        with counting_collectives(phases["backward"]):
            (out.out.square().sum() + out.aux_loss).backward()
        stats = out.stats
        choices_E = stats.choices_per_expert if choices_E is None else choices_E + stats.choices_per_expert
        results.update(
            {
                f"{micro} out": out.out.detach(),
                f"{micro} aux loss": out.aux_loss.detach(),
                f"{micro} x grad": x.grad,
                f"{micro} tokens per expert": stats.tokens_per_expert,
                f"{micro} choices per expert": stats.choices_per_expert,
                f"{micro} dropped": stats.num_dropped,
                f"{micro} rows sent away": stats.rows_sent_to_other_ranks,
            }
        )
    for name, param in [*layer.named_parameters(), *proj.named_parameters(prefix="proj")]:
        results[f"{name} grad"] = param.grad
    layer.after_optimizer_step(choices_E)
    results["selection bias"] = layer.selection_bias.clone()
    return results, phases


def _assert_bitwise_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    differ = [name for name in want if not torch.equal(got[name], want[name])]
    assert not differ, f"not bitwise equal: {differ}"


@pytest.mark.parametrize("scope", ["micro_batch", "global_batch"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
@pytest.mark.parametrize("dispatch", ["per_assignment", "once_per_rank"])
@on_ranks(1, 2, 4)
def test_recompute_is_bitwise_equal_to_no_checkpointing(dispatch, capacity_factor, scope):
    config, execution = _config(capacity_factor, scope), ep.ExecutionConfig(dispatch=dispatch)
    plain, plain_calls = _one_step(config, execution, checkpointed=False)
    recomputed, recomputed_calls = _one_step(config, execution, checkpointed=True)
    _assert_bitwise_equal(recomputed, plain)
    assert recomputed_calls["forward"] == plain_calls["forward"]
    backward = recomputed_calls["backward"]
    assert backward["all_gather"] == 0, "the recompute exchanged counts again"
    assert backward["all_reduce"] == 0, "the recompute summed the global-batch counts again"
    # The recompute resends the token rows: its forward's all-to-alls, then the backward's own.
    to_all = plain_calls["forward"]["all_to_all_single"] + plain_calls["backward"]["all_to_all_single"]
    assert backward["all_to_all_single"] == to_all
    if dist.get_world_size() > 1:
        assert plain_calls["forward"]["all_gather"] == 2  # one count exchange per micro-batch
        assert plain_calls["forward"]["all_reduce"] == (2 if scope == "global_batch" else 0)


@on_ranks(1, 2)
def test_recompute_reuses_the_forwards_choice_of_experts():
    """Between forward and backward the forced experts change: the recompute keeps the forward's."""
    config = _config(None, "micro_batch")
    generator = torch.Generator().manual_seed(7 + dist.get_rank())
    tokens = 24 + 8 * dist.get_rank()
    first = torch.stack([torch.randperm(config.num_experts, generator=generator)[:2] for _ in range(tokens)])
    other = torch.stack([torch.randperm(config.num_experts, generator=generator)[:2] for _ in range(tokens)])
    execution = ep.ExecutionConfig()
    plain, _ = _one_step(config, execution, checkpointed=False, forced=(first, first))
    recomputed, _ = _one_step(config, execution, checkpointed=True, forced=(first, other))
    _assert_bitwise_equal(recomputed, plain)
    rerouted, _ = _one_step(config, execution, checkpointed=False, forced=(other, other))
    assert not torch.equal(rerouted["proj.weight grad"], plain["proj.weight grad"])  # the change matters


def test_model_activation_checkpointing_is_bitwise_equal():
    """The byte-level model with Transformer.activation_checkpointing: same losses, same gradients."""
    from expert_parallel.model import ModelConfig, Transformer

    moe = ep.MoEConfig(d_model=16, d_hidden=16, num_experts=4, capacity_factor=1.0, min_capacity=1)
    config = ModelConfig(seq_len=12, d_model=16, n_layers=2, n_heads=2, moe=moe)
    tokens = torch.randint(0, 256, (3, 13), generator=torch.Generator().manual_seed(0))
    runs = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Transformer(config)
        model.activation_checkpointing = checkpointed
        lm_loss, aux_loss, outputs = model.loss(tokens)
        (lm_loss + aux_loss).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        runs.append(
            (lm_loss.detach(), aux_loss.detach(), [o.stats.choices_per_expert for o in outputs], grads)
        )
    (lm_a, aux_a, choices_a, grads_a), (lm_b, aux_b, choices_b, grads_b) = runs
    assert torch.equal(lm_a, lm_b) and torch.equal(aux_a, aux_b)
    assert all(torch.equal(a, b) for a, b in zip(choices_a, choices_b))
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
