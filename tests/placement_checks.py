"""Redundant experts (a placement) on real ranks; tests/test_placement_ep.py runs this on 2 and 4 gloo ranks.

- With replicas placed by placement.balance from a skewed load, the layer's
  outputs, input, router and (after sync_replica_grads) every replica's expert
  gradients equal the single-process no-replica layer's (expert gradients:
  summed over ranks, as for any EP layer); replicas stay bitwise identical.
- Under Zipf(1) forced routing, the rows each rank's experts process are more
  even with replicas than without (numbers printed on rank 0).
- apply_placement moves weights and AdamW state, to and from replicas.
- Checkpoints: a replicated layer saves one key per logical expert; a run with
  replicas resumes without them and the reverse.

Usage: placement_checks.py <shared temporary directory>
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ep_checks import Checks, run_step  # noqa: E402

import expert_parallel as ep  # noqa: E402
from expert_parallel import checkpoint  # noqa: E402
from expert_parallel.placement import balance  # noqa: E402

TOL = 1e-6
ZIPF_E = (1.0 / torch.arange(1, 9, dtype=torch.float64)).float()  # Zipf(1) over 8 experts


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


def check_equals_reference(
    checks: Checks, name: str, config: ep.MoEConfig, placement, seed: int, forced=False
):
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    reference = ep.MoELayer(config)
    torch.manual_seed(seed)
    layer = ep.MoELayer(config, dist.group.WORLD, placement=placement)
    ids = layer.local_expert_ids
    checks.equal(f"{name}: init", layer.experts.w1, reference.experts.w1[ids])
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    num_tokens = 20 + 9 * rank
    x = torch.randn(num_tokens, config.d_model, generator=gen)
    upstream = torch.randn(num_tokens, config.d_out, generator=gen)
    if forced:
        chosen = torch.multinomial(ZIPF_E.expand(num_tokens, -1), config.top_k, generator=gen)
        layer.forced_expert_ids = reference.forced_expert_ids = chosen
    out_ref, dx_ref = run_step(reference, x, upstream)
    out, dx = run_step(layer, x, upstream)
    checks.close(f"{name}: output", out, out_ref, TOL)
    checks.close(f"{name}: input grad", dx, dx_ref, TOL)
    checks.close(f"{name}: aux loss", layer.aux_loss.detach(), reference.aux_loss.detach(), TOL)
    checks.equal(
        f"{name}: tokens per expert", layer.stats.tokens_per_expert, reference.stats.tokens_per_expert
    )
    for pname, param in layer.router.named_parameters():
        checks.close(f"{name}: router grad {pname}", param.grad, getattr(reference.router, pname).grad, TOL)
    layer.sync_replica_grads()
    for pname, param in layer.experts.named_parameters():
        summed = getattr(reference.experts, pname).grad.clone()
        dist.all_reduce(summed)
        checks.close(f"{name}: expert grad {pname} (every replica)", param.grad, summed[ids], TOL)
        checks.true(f"{name}: replicas' grads {pname} identical", replicas_identical(layer, param.grad))
    rows = torch.tensor([layer.stats.rows_sent_to_other_ranks])
    checks.true(f"{name}: rows sent counted", int(gathered(rows).sum()) >= 0)
    del world


def rows_per_rank(layer: ep.MoELayer, chosen: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[P] rows each rank's experts processed in one forward with `chosen` forced routing."""
    seen = []
    hook = layer.experts.register_forward_pre_hook(lambda _, args: seen.append(sum(args[1])))
    layer.forced_expert_ids = chosen
    with torch.no_grad():
        out = layer(x)
    hook.remove()
    return gathered(torch.tensor([float(sum(seen))])), out


def check_balance_under_zipf(checks: Checks) -> None:
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
    checks.true(
        "zipf: replicas (R = P, 2P) even out the rows per rank to max/mean <= 1.05",
        max(results[world], results[2 * world]) <= 1.05 < results[0],
        str(results),
    )
    checks.close("zipf: R = P output equals no replicas", outputs[world], outputs[0], TOL)
    checks.close("zipf: R = 2P output equals no replicas", outputs[2 * world], outputs[0], TOL)


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


def check_apply_placement(checks: Checks, config: ep.MoEConfig, placement, other) -> None:
    holder, optimizer, x = trained_layer(config, None)
    layer = holder.moe
    with torch.no_grad():
        before = layer(x)
    weights = {n: logical(layer, p.detach()) for n, p in layer.experts.named_parameters()}
    moments = {
        n: logical(layer, optimizer.state[p]["exp_avg_sq"]) for n, p in layer.experts.named_parameters()
    }
    for step, target in (("to replicas", placement), ("between placements", other), ("back to none", None)):
        layer.apply_placement(target, optimizer)
        ids = layer.local_expert_ids
        for pname, param in layer.experts.named_parameters():
            checks.equal(f"apply_placement {step}: {pname}", param.detach(), weights[pname][ids])
            checks.equal(
                f"apply_placement {step}: exp_avg_sq {pname}",
                optimizer.state[param]["exp_avg_sq"],
                moments[pname][ids],
            )
        with torch.no_grad():
            checks.close(f"apply_placement {step}: output unchanged", layer(x), before, TOL)
    # The optimizer still steps the moved parameters.
    run_step(layer, x, torch.ones_like(before))
    optimizer.step()
    checks.true("apply_placement: optimizer steps after a move", True)


def check_checkpoint(checks: Checks, config: ep.MoEConfig, placement, other, directory: Path) -> None:
    for name, saved_with, loaded_with in (
        ("replicas -> none", placement, None),
        ("none -> replicas", None, placement),
        ("replicas -> other replicas", placement, other),
    ):
        holder, optimizer, _ = trained_layer(config, saved_with)
        state = checkpoint.model_state(holder)
        expert_keys = [k for k in state if ".experts." in k]
        distinct = len(set(holder.moe.local_expert_ids)) * len(list(holder.moe.experts.parameters()))
        checks.true(f"checkpoint {name}: one key per local logical expert", len(expert_keys) == distinct)
        weights = {n: logical(holder.moe, p.detach()) for n, p in holder.moe.experts.named_parameters()}
        moments = {
            n: logical(holder.moe, optimizer.state[p]["exp_avg"])
            for n, p in holder.moe.experts.named_parameters()
        }
        router = holder.moe.router.weight.detach().clone()
        path = checkpoint.save(directory / name.replace(" ", "_").replace(">", ""), 1, holder, optimizer)
        torch.manual_seed(123)  # a different init, overwritten by the load
        fresh = nn.Module()
        fresh.moe = ep.MoELayer(config, dist.group.WORLD, placement=loaded_with)
        fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        step = checkpoint.load(path, fresh, fresh_optimizer)
        checks.true(f"checkpoint {name}: step", step == 1)
        checks.equal(f"checkpoint {name}: router", fresh.moe.router.weight.detach(), router)
        ids = fresh.moe.local_expert_ids
        for pname, param in fresh.moe.experts.named_parameters():
            checks.equal(f"checkpoint {name}: {pname}", param.detach(), weights[pname][ids])
            checks.equal(
                f"checkpoint {name}: exp_avg {pname}",
                fresh_optimizer.state[param]["exp_avg"],
                moments[pname][ids],
            )


def main() -> int:
    with ep.distributed(timeout=timedelta(seconds=60)):
        rank, world = dist.get_rank(), dist.get_world_size()
        directory = Path(sys.argv[1])
        checks = Checks()
        try:
            base = ep.MoEConfig(d_model=12, d_hidden=16, num_experts=8, top_k=2, aux_loss_coef=0.01)
            r_p, r_2p = balance(ZIPF_E, world, world), balance(ZIPF_E, world, 2 * world)
            cases = [
                ("dropless top-2, R = P", base, r_p, False),
                ("dropless top-2, R = 2P, zipf forced routing", base, r_2p, True),
                (
                    "capacity 1.0, swiglu, R = 2P",
                    replace(base, capacity_factor=1.0, min_capacity=1, activation="swiglu"),
                    r_2p,
                    False,
                ),
                (
                    "once per rank top-3, R = P, zipf forced",
                    replace(base, top_k=3, dispatch="once_per_rank"),
                    r_p,
                    True,
                ),
            ]
            for seed, (name, config, placement, forced) in enumerate(cases):
                check_equals_reference(checks, name, config, placement, seed + 1, forced)
            check_balance_under_zipf(checks)
            check_apply_placement(checks, base, r_p, r_2p)
            check_checkpoint(checks, replace(base, activation="swiglu"), r_2p, r_p, directory)
            return checks.verdict(rank)
        except Exception:
            traceback.print_exc()
            return 1


if __name__ == "__main__":
    sys.exit(main())
