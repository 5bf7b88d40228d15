"""Redundant experts (a placement) under EP on real gloo ranks, each case its own test.

- With replicas placed by placement.balance from a skewed load, the layer's
  outputs, input, router and (after sync_replica_grads) every replica's expert
  gradients equal the single-process no-replica layer's (expert gradients:
  summed over ranks, as for any EP layer); replicas stay bitwise identical.
- Under Zipf(1) forced routing, the rows each rank's experts process are more
  even with replicas than without (numbers printed on rank 0).
- apply_placement moves weights and AdamW state, to and from replicas.
- Checkpoints: a replicated layer saves one key per logical expert; a run with
  replicas resumes without them and the reverse.
- The trainer with replicas resumes without them (a torchrun run).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from asserts import assert_close, assert_equal
from rankpool import on_ranks
from torch import nn

import expert_parallel as ep
from expert_parallel import checkpoint
from expert_parallel.placement import balance, to_physical

TOL = 1e-6
ZIPF_E = (1.0 / torch.arange(1, 9, dtype=torch.float64)).float()  # Zipf(1) over 8 experts
BASE = ep.MoEConfig(d_model=12, d_hidden=16, num_experts=8, top_k=2, aux_loss_coef=0.01)


def run_step(layer: ep.MoELayer, x: torch.Tensor, upstream: torch.Tensor):
    """Forward + backward of (out * upstream).sum() + aux_loss: (out, input grad, aux loss, stats)."""
    x = x.detach().clone().requires_grad_(True)
    out, aux_loss, stats = layer(x)
    ((out * upstream).sum() + aux_loss).backward()
    return out.detach(), x.grad, aux_loss.detach(), stats


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """[P * s, ...]: every rank's tensor, concatenated in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def logical(layer: ep.MoELayer, tensor_sX: torch.Tensor) -> torch.Tensor:
    """[E, ...] from every rank's local [s, ...] tensor (any replica of each expert)."""
    all_ids = gathered(torch.tensor(layer.local_expert_ids))
    full = tensor_sX.new_empty((layer.config.num_experts, *tensor_sX.shape[1:]))
    full[all_ids] = gathered(tensor_sX)
    return full


def replicas_identical(layer: ep.MoELayer, tensor_sX: torch.Tensor) -> bool:
    all_ids = gathered(torch.tensor(layer.local_expert_ids)).tolist()
    every = gathered(tensor_sX)
    first = {}
    for physical, expert in enumerate(all_ids):
        first.setdefault(expert, physical)
    return all(torch.equal(every[p], every[first[g]]) for p, g in enumerate(all_ids))


def rows_sent_away(layer: ep.MoELayer, x: torch.Tensor, forced: torch.Tensor | None) -> int:
    """The rows this rank's dispatch must send to other ranks, counted from the routing itself."""
    rank = dist.get_rank()
    with torch.no_grad():
        routing = ep.route(layer.router(x), layer.config, forced)
    physical = to_physical(routing, layer.placement, rank)
    owner_TK = torch.where(physical.keep, physical.expert_ids // layer.num_local_experts, rank)
    if layer.execution.dispatch == "once_per_rank":  # one row per (token, other rank)
        return len({(t, int(p)) for t, row in enumerate(owner_TK) for p in row if int(p) != rank})
    return int((owner_TK != rank).sum())


# id: (seed, config, execution, redundant experts per rank count, Zipf forced routing)
CASES = {
    "dropless-top2-R=P": (1, BASE, None, 1, False),
    "dropless-top2-R=2P-zipf-forced": (2, BASE, None, 2, True),
    "capacity1-swiglu-R=2P": (
        3,
        replace(BASE, capacity_factor=1.0, min_capacity=1, activation="swiglu"),
        None,
        2,
        False,
    ),
    "once-per-rank-top3-R=P-zipf-forced": (
        4,
        replace(BASE, top_k=3),
        ep.ExecutionConfig(dispatch="once_per_rank"),
        1,
        True,
    ),
}


@pytest.mark.parametrize("case", CASES)
@on_ranks(2, 4)
def test_replicas_equal_the_single_process_layer(case):
    seed, config, execution, redundant_per_rank, forced = CASES[case]
    rank, world = dist.get_rank(), dist.get_world_size()
    placement = balance(ZIPF_E, world, redundant_per_rank * world)
    torch.manual_seed(seed)
    reference = ep.MoELayer(config)
    torch.manual_seed(seed)
    layer = ep.MoELayer(config, dist.group.WORLD, execution=execution, placement=placement)
    ids = layer.local_expert_ids
    assert_equal("init", layer.experts.w1, reference.experts.w1[ids])
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    num_tokens = 20 + 9 * rank
    x = torch.randn(num_tokens, config.d_model, generator=gen)
    upstream = torch.randn(num_tokens, config.d_out, generator=gen)
    chosen = None
    if forced:
        chosen = torch.multinomial(ZIPF_E.expand(num_tokens, -1), config.top_k, generator=gen)
        layer.forced_expert_ids = reference.forced_expert_ids = chosen
    out_ref, dx_ref, aux_ref, stats_ref = run_step(reference, x, upstream)
    out, dx, aux, stats = run_step(layer, x, upstream)
    assert_close("output", out, out_ref, TOL)
    assert_close("input grad", dx, dx_ref, TOL)
    assert_close("aux loss", aux, aux_ref, TOL)
    assert_equal("tokens per expert", stats.tokens_per_expert, stats_ref.tokens_per_expert)
    assert_equal("choices per expert", stats.choices_per_expert, stats_ref.choices_per_expert)
    for pname, param in layer.router.named_parameters():
        assert_close(f"router grad {pname}", param.grad, getattr(reference.router, pname).grad, TOL)
    layer.sync_replica_grads()
    for pname, param in layer.experts.named_parameters():
        summed = getattr(reference.experts, pname).grad.clone()
        dist.all_reduce(summed)
        assert_close(f"expert grad {pname} (every replica)", param.grad, summed[ids], TOL)
        assert replicas_identical(layer, param.grad), f"replicas' grads {pname} differ"
    sent = int(stats.rows_sent_to_other_ranks)
    assert sent == rows_sent_away(layer, x, chosen), "rows sent to other ranks"


def rows_per_rank(layer: ep.MoELayer, chosen: torch.Tensor, x: torch.Tensor):
    """([P] rows each rank's experts processed, output) of one forward with `chosen` forced routing."""
    seen = []
    hook = layer.experts.register_forward_pre_hook(lambda _, args: seen.append(sum(args[1])))
    layer.forced_expert_ids = chosen
    with torch.no_grad():
        out = layer(x).out
    hook.remove()
    return gathered(torch.tensor([float(sum(seen))])), out


@on_ranks(2, 4)
def test_replicas_even_out_the_rows_per_rank_under_zipf():
    rank, world = dist.get_rank(), dist.get_world_size()
    config = ep.MoEConfig(d_model=8, d_hidden=8, num_experts=8, top_k=2)
    gen = torch.Generator().manual_seed(77 + rank)
    num_tokens = 256
    chosen = torch.multinomial(ZIPF_E.expand(num_tokens, -1), config.top_k, generator=gen)
    x = torch.randn(num_tokens, config.d_model, generator=gen)
    load = torch.bincount(chosen.reshape(-1), minlength=8).double()
    dist.all_reduce(load)  # the measured load, as the trainer would gather it
    results = {}
    outputs = {}
    for redundant in (0, world, 2 * world):
        placement = None if redundant == 0 else balance(load, world, redundant)
        torch.manual_seed(5)
        layer = ep.MoELayer(config, dist.group.WORLD, placement=placement)
        rows, outputs[redundant] = rows_per_rank(layer, chosen, x)
        results[redundant] = float(rows.max() / rows.mean())
        if rank == 0:
            print(
                f"zipf rows per rank, P={world}, E=8, top-2, {num_tokens} tokens/rank, R={redundant}: "
                f"{rows.tolist()} max/mean {results[redundant]:.3f}",
                flush=True,
            )
    assert max(results[world], results[2 * world]) <= 1.05 < results[0], (
        f"replicas (R = P, 2P) should even out the rows per rank to max/mean <= 1.05: {results}"
    )
    assert_close("R = P output equals no replicas", outputs[world], outputs[0], TOL)
    assert_close("R = 2P output equals no replicas", outputs[2 * world], outputs[0], TOL)


def trained_layer(config: ep.MoEConfig, placement, seed: int = 9):
    """An EP layer (with `placement`) after one AdamW step, with its optimizer."""
    rank = dist.get_rank()
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.moe = ep.MoELayer(config, dist.group.WORLD, placement=placement)
    optimizer = torch.optim.AdamW(holder.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(50 + rank)
    x = torch.randn(30, config.d_model, generator=gen)
    run_step(holder.moe, x, torch.randn(30, config.d_out, generator=gen))
    holder.moe.sync_replica_grads()
    grads = [p for p in holder.parameters() if p.grad is not None]
    for param in grads:  # dense grads summed, so every rank takes the same dense step
        if param not in set(holder.moe.experts.parameters()):
            dist.all_reduce(param.grad)
    optimizer.step()
    optimizer.zero_grad()
    return holder, optimizer, x


@on_ranks(2, 4)
def test_apply_placement_moves_weights_and_optimizer_state():
    world = dist.get_world_size()
    placement, other = balance(ZIPF_E, world, world), balance(ZIPF_E, world, 2 * world)
    holder, optimizer, x = trained_layer(BASE, None)
    layer = holder.moe
    with torch.no_grad():
        before = layer(x).out
    weights = {n: logical(layer, p.detach()) for n, p in layer.experts.named_parameters()}
    moments = {
        n: logical(layer, optimizer.state[p]["exp_avg_sq"]) for n, p in layer.experts.named_parameters()
    }
    for step, target in (("to replicas", placement), ("between placements", other), ("back to none", None)):
        layer.apply_placement(target, optimizer)
        ids = layer.local_expert_ids
        for pname, param in layer.experts.named_parameters():
            assert_equal(f"{step}: {pname}", param.detach(), weights[pname][ids])
            assert_equal(
                f"{step}: exp_avg_sq {pname}", optimizer.state[param]["exp_avg_sq"], moments[pname][ids]
            )
        with torch.no_grad():
            assert_close(f"{step}: output unchanged", layer(x).out, before, TOL)
    # The optimizer still steps the moved parameters.
    moved = {n: p.detach().clone() for n, p in layer.experts.named_parameters()}
    run_step(layer, x, torch.ones_like(before))
    optimizer.step()
    for pname, param in layer.experts.named_parameters():
        assert not torch.equal(param.detach(), moved[pname]), f"the optimizer did not step {pname}"


@pytest.mark.parametrize("saved_with,loaded_with", [("R=2P", None), (None, "R=2P"), ("R=2P", "R=P")])
@on_ranks(2, 4)
def test_checkpoints_move_between_placements(saved_with, loaded_with, tmp_path):
    world = dist.get_world_size()
    placements = {None: None, "R=P": balance(ZIPF_E, world, world), "R=2P": balance(ZIPF_E, world, 2 * world)}
    config = replace(BASE, activation="swiglu")
    holder, optimizer, _ = trained_layer(config, placements[saved_with])
    state = checkpoint.model_state(holder)
    expert_keys = [k for k in state if ".experts." in k]
    distinct = len(set(holder.moe.local_expert_ids)) * len(list(holder.moe.experts.parameters()))
    assert len(expert_keys) == distinct, "one key per local logical expert"
    weights = {n: logical(holder.moe, p.detach()) for n, p in holder.moe.experts.named_parameters()}
    moments = {
        n: logical(holder.moe, optimizer.state[p]["exp_avg"])
        for n, p in holder.moe.experts.named_parameters()
    }
    router = holder.moe.router.weight.detach().clone()
    path = checkpoint.save(tmp_path, 1, holder, optimizer)
    torch.manual_seed(123)  # a different init, overwritten by the load
    fresh = nn.Module()
    fresh.moe = ep.MoELayer(config, dist.group.WORLD, placement=placements[loaded_with])
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert checkpoint.load(path, fresh, fresh_optimizer) == 1
    assert_equal("router", fresh.moe.router.weight.detach(), router)
    ids = fresh.moe.local_expert_ids
    for pname, param in fresh.moe.experts.named_parameters():
        assert_equal(pname, param.detach(), weights[pname][ids])
        assert_equal(f"exp_avg {pname}", fresh_optimizer.state[param]["exp_avg"], moments[pname][ids])


@pytest.mark.dist
@pytest.mark.slow
def test_trainer_with_replicas_resumes_without_them(tmp_path):
    """ep=2 with 2 redundant experts re-planned every 2 steps, saved at step 3; resumed with no replicas,
    steps 4 and 5 give the losses of the replicated run."""
    from test_train import losses, train

    train(
        tmp_path,
        2,
        "parallel.ep=2",
        "parallel.redundant_experts=2",
        "parallel.replan_every=2",
        "train.checkpoint_every=3",
    )
    replicated = losses(tmp_path)
    assert (tmp_path / "checkpoints" / "step_3").is_dir()
    run = train(tmp_path, 2, "parallel.ep=2")
    assert "resumed from" in run.stdout
    assert losses(tmp_path) == pytest.approx(replicated, rel=1e-5)
