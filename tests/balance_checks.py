"""Balancing with global statistics on real ranks; tests/test_balance.py runs this on 2 and 4 gloo ranks.

- "global_batch" aux loss: with equal token counts per rank, the mean over
  ranks of each rank's aux loss equals the single-process aux loss on all
  ranks' tokens concatenated, and so does the mean of the router gradients;
  also when the experts are sharded over pairs of ranks while the statistics
  are summed over the world (dp x ep), and over two micro-batches.
- The selection bias after 100 steps of aux-loss-free balancing is bitwise
  equal on every rank, and equal to the bias a single process reaches on all
  ranks' tokens.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ep_checks import Checks  # noqa: E402

import expert_parallel as ep  # noqa: E402

TOKENS = 24  # per rank and micro-batch


def all_tokens(seed: int, world: int, d_model: int) -> torch.Tensor:
    """[world, TOKENS, D]: rank r's tokens are row r; every rank can build everyone's."""
    return torch.randn(world, TOKENS, d_model, generator=torch.Generator().manual_seed(seed))


def mean_over_world(tensor: torch.Tensor) -> torch.Tensor:
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def check_global_batch_aux(checks: Checks, name: str, group, micro_batches: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    config = ep.MoEConfig(
        d_model=12, d_hidden=16, num_experts=8, top_k=2, aux_loss_scope="global_batch", aux_loss_coef=1.0
    )
    torch.manual_seed(3)
    layer = ep.MoELayer(config, group, stats_group=dist.group.WORLD)
    torch.manual_seed(3)
    reference = ep.MoELayer(replace(config, aux_loss_scope="micro_batch"))
    for micro in range(micro_batches):
        tokens = all_tokens(10 + micro, world, config.d_model)
        layer.zero_grad()
        layer(tokens[rank])
        layer.aux_loss.backward()
        # The reference sees the step's micro-batches so far, all ranks' tokens: f_i of the running
        # counts; its P_i is over this micro-batch's tokens only, as the layer's is.
        seen = all_tokens(10, world, config.d_model).reshape(-1, config.d_model)
        for earlier in range(1, micro + 1):
            seen = torch.cat([seen, all_tokens(10 + earlier, world, config.d_model).reshape(-1, 12)])
        reference.zero_grad()
        reference(seen)
        choices = reference.stats.tokens_per_expert  # dropless: choices = kept
        now = tokens.reshape(-1, config.d_model)
        logits = reference.router(now)
        probs = torch.softmax(logits, dim=-1).mean(0)
        want = config.num_experts * (choices.float() / choices.sum() * probs).sum()
        want.backward()
        got = mean_over_world(layer.aux_loss)
        checks.close(f"{name} micro-batch {micro}: mean aux loss", got, want.detach(), tol=1e-6)
        for pname, param in layer.router.named_parameters():
            want_grad = getattr(reference.router, pname).grad
            checks.close(
                f"{name} micro-batch {micro}: router grad {pname}", mean_over_world(param.grad), want_grad
            )
    layer.after_optimizer_step()
    checks.true(f"{name}: counts reset after the step", int(layer.step_choices.sum()) == 0)


def check_selection_bias_stays_equal(checks: Checks, group) -> None:
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
    layer = ep.MoELayer(config, group)
    torch.manual_seed(4)
    reference = ep.MoELayer(config)
    with torch.no_grad():  # a skewed router, so that the bias has work to do
        for module in (layer, reference):
            module.router.bias.copy_(torch.linspace(1, -1, 8))
    for step in range(100):
        tokens = all_tokens(1000 + step, world, config.d_model)
        with torch.no_grad():
            layer(tokens[rank])
            reference(tokens.reshape(-1, config.d_model))
        layer.after_optimizer_step()
        reference.after_optimizer_step()
    gathered = [torch.empty_like(layer.selection_bias) for _ in range(world)]
    dist.all_gather(gathered, layer.selection_bias)
    checks.true(
        "selection bias after 100 steps: bitwise equal on every rank",
        all(torch.equal(g, gathered[0]) for g in gathered),
    )
    checks.equal(
        "selection bias: equals the single process's on all tokens",
        layer.selection_bias,
        reference.selection_bias,
    )
    checks.true("selection bias moved", float(layer.selection_bias.abs().max()) > 0.01)


def main() -> int:
    with ep.distributed(timeout=timedelta(seconds=60)):
        rank, world = dist.get_rank(), dist.get_world_size()
        checks = Checks()
        # Pairs of ranks share out the experts (ep = 2); statistics are summed over the world.
        pairs = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]
        pair = pairs[rank // 2]
        check_global_batch_aux(checks, "global-batch aux, ep = world", dist.group.WORLD, micro_batches=1)
        check_global_batch_aux(
            checks, "global-batch aux, ep = 2, stats over the world", pair, micro_batches=2
        )
        check_global_batch_aux(checks, "global-batch aux, no ep, stats over the world", None, micro_batches=2)
        check_selection_bias_stays_equal(checks, dist.group.WORLD)
        return checks.verdict(rank)


if __name__ == "__main__":
    sys.exit(main())
