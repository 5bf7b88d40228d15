"""Balancing with global statistics on real gloo ranks, each case its own test.

- "global_batch" aux loss: with equal token counts per rank, the mean over
  ranks of each rank's aux loss equals the single-process aux loss on all
  ranks' tokens concatenated, and so does the mean of the router gradients;
  also when the experts are sharded over pairs of ranks while the statistics
  are summed over the world (dp x ep), and over two micro-batches, the caller
  passing each micro-batch the choices of the step's earlier ones.
- The selection bias after 100 steps of aux-loss-free balancing is bitwise
  equal on every rank, and equal to the bias a single process reaches on all
  ranks' tokens.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from asserts import assert_close, assert_equal
from rankpool import on_ranks

import expert_parallel as ep

TOKENS = 24  # per rank and micro-batch


def all_tokens(seed: int, world: int, d_model: int) -> torch.Tensor:
    """[world, TOKENS, D]: rank r's tokens are row r; every rank can build everyone's."""
    return torch.randn(world, TOKENS, d_model, generator=torch.Generator().manual_seed(seed))


def mean_over_world(tensor: torch.Tensor) -> torch.Tensor:
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


@pytest.mark.parametrize(
    "layout,micro_batches", [("ep=world", 1), ("ep=2-stats-over-world", 2), ("no-ep-stats-over-world", 2)]
)
@on_ranks(2, 4)
def test_global_batch_aux_loss_equals_the_single_process_one(layout, micro_batches):
    rank, world = dist.get_rank(), dist.get_world_size()
    # Pairs of ranks share out the experts (ep = 2); statistics are summed over the world.
    pairs = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]
    group = {"ep=world": dist.group.WORLD, "ep=2-stats-over-world": pairs[rank // 2]}.get(layout)
    config = ep.MoEConfig(
        d_model=12, d_hidden=16, num_experts=8, top_k=2, aux_loss_scope="global_batch", aux_loss_coef=1.0
    )
    torch.manual_seed(3)
    layer = ep.MoELayer(config, group, stats_group=dist.group.WORLD)
    torch.manual_seed(3)
    reference = ep.MoELayer(replace(config, aux_loss_scope="micro_batch"))
    choices_before, first_aux = None, None
    for micro in range(micro_batches):
        tokens = all_tokens(10 + micro, world, config.d_model)
        layer.zero_grad()
        _, aux_loss, stats = layer(tokens[rank], choices_before)
        aux_loss.backward()
        first_aux = aux_loss.detach() if micro == 0 else first_aux
        # The caller owns the step's counts: this rank's choices so far, for the next micro-batch.
        mine = stats.choices_per_expert
        choices_before = mine if choices_before is None else choices_before + mine
        # The reference sees the step's micro-batches so far, all ranks' tokens: f_i of the running
        # counts; its P_i is over this micro-batch's tokens only, as the layer's is.
        seen = torch.cat(
            [all_tokens(10 + m, world, config.d_model).reshape(-1, 12) for m in range(micro + 1)]
        )
        reference.zero_grad()
        choices = reference(seen).stats.choices_per_expert
        now = tokens.reshape(-1, config.d_model)
        probs = torch.softmax(reference.router(now), dim=-1).mean(0)
        want = config.num_experts * (choices.float() / choices.sum() * probs).sum()
        want.backward()
        assert_close(
            f"micro-batch {micro}: mean aux loss", mean_over_world(aux_loss), want.detach(), tol=1e-6
        )
        for pname, param in layer.router.named_parameters():
            want_grad = getattr(reference.router, pname).grad
            assert_close(f"micro-batch {micro}: router grad {pname}", mean_over_world(param.grad), want_grad)
    # Nothing carries over into the next step: its first micro-batch is counted alone again.
    again = layer(all_tokens(10, world, config.d_model)[rank]).aux_loss.detach()
    assert_equal("the next step's first micro-batch", again, first_aux)


@on_ranks(2, 4)
def test_selection_bias_stays_equal_on_every_rank_and_to_the_single_process():
    rank, world = dist.get_rank(), dist.get_world_size()
    config = ep.MoEConfig(
        d_model=12,
        d_hidden=16,
        num_experts=8,
        top_k=2,
        score_func="sigmoid",
        selection_bias=True,
        selection_bias_rate=1e-3,
        aux_loss_coef=0.0,
    )
    torch.manual_seed(4)
    layer = ep.MoELayer(config, dist.group.WORLD)
    torch.manual_seed(4)
    reference = ep.MoELayer(config)
    with torch.no_grad():  # a skewed router, so that the bias has work to do
        for module in (layer, reference):
            module.router.bias.copy_(torch.linspace(1, -1, 8))
    for step in range(100):
        tokens = all_tokens(1000 + step, world, config.d_model)
        with torch.no_grad():
            mine = layer(tokens[rank]).stats.choices_per_expert
            everyone = reference(tokens.reshape(-1, config.d_model)).stats.choices_per_expert
        layer.after_optimizer_step(mine)
        reference.after_optimizer_step(everyone)
    gathered = [torch.empty_like(layer.selection_bias) for _ in range(world)]
    dist.all_gather(gathered, layer.selection_bias)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "bias after 100 steps differs across ranks"
    assert_equal("equals the single process's on all tokens", layer.selection_bias, reference.selection_bias)
    assert float(layer.selection_bias.abs().max()) > 0.01, "the selection bias did not move"
