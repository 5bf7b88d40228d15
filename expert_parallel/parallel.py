"""Expert parallelism applied to a finished model: the dp x ep mesh, sharded MoE layers, gradient sums.

The model is written unaware of ranks, with group=None MoE layers; `shard_experts`
swaps each for a layer over the ep group that holds its slice of the experts.
Rank r of the world sits at mesh position (dp = r // ep, ep = r % ep).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from . import comm
from .layer import MoELayer


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: dp replicas of ep expert shards; groups None when a dimension has size 1."""

    dp: int
    ep: int
    dp_rank: int
    ep_rank: int
    dp_group: dist.ProcessGroup | None
    ep_group: dist.ProcessGroup | None
    mesh: DeviceMesh | None

    @property
    def world(self) -> int:
        return self.dp * self.ep


def make_layout(ep: int, device_type: str = "cpu") -> Layout:
    """The dp x ep DeviceMesh over the default group (a 1 x 1 layout without one)."""
    if not dist.is_initialized():
        if ep != 1:
            raise ValueError(f"parallel.ep={ep} needs a process group; launch with torchrun")
        return Layout(1, 1, 0, 0, None, None, None)
    world = dist.get_world_size()
    if ep < 1 or world % ep:
        raise ValueError(f"parallel.ep={ep} must divide the world size {world}")
    mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    rank = dist.get_rank()
    dp_group = mesh.get_group("dp") if world // ep > 1 else None
    ep_group = mesh.get_group("ep") if ep > 1 else None
    return Layout(world // ep, ep, rank // ep, rank % ep, dp_group, ep_group, mesh)


@torch.no_grad()
def shard_experts(
    model: nn.Module, ep_group: dist.ProcessGroup | None, stats_group: dist.ProcessGroup | None = None
) -> list[str]:
    """Swap each group=None MoELayer for one over `ep_group` holding its slice; return their names.

    The router, shared experts and selection bias are copied whole and each
    local expert from the global expert of the same id, so the sharded model
    computes what the full one did. `stats_group`: the ranks whose load
    statistics the layers sum (global-batch aux loss, selection bias): all
    ranks that see different tokens, i.e. the world under dp x ep. A model on
    the meta device stays there (build.build_model): the new layer takes the
    old one's `init_seed`, so `reset_parameters()` later writes its slice.
    """
    names = []
    if ep_group is None and stats_group is None:
        return names
    for name, module in list(model.named_modules()):
        if not isinstance(module, MoELayer) or module.group is not None or module.stats_group is not None:
            continue
        with torch.device(module.router.weight.device):  # a layer on the meta device stays there
            sharded = MoELayer(
                module.config,
                ep_group,
                stats_group,
                execution=module.execution,
                name=name,
                init_seed=module.init_seed,
            )
        sharded.train(module.training)  # a model put in eval() before sharding stays in eval
        sharded.router.load_state_dict(module.router.state_dict())
        if module.shared_experts is not None:
            sharded.shared_experts.load_state_dict(module.shared_experts.state_dict())
        if module.selection_bias is not None:
            sharded.selection_bias.copy_(module.selection_bias)
        local = slice(sharded.first_expert, sharded.first_expert + sharded.num_local_experts)
        for pname, param in sharded.experts.named_parameters():
            param.copy_(getattr(module.experts, pname)[local])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, sharded)
        names.append(name)
    return names


def expert_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that belong to the experts of MoE layers."""
    return {
        id(param)
        for module in model.modules()
        if isinstance(module, MoELayer)
        for param in module.experts.parameters()
    }


def sum_gradients(model: nn.Module, layout: Layout) -> None:
    """Sum gradients so that every rank holds the gradient of the whole global batch.

    Each rank's loss is already scaled by 1 / (micro-batches in the global
    batch). Dense parameters (the router included) saw only this rank's
    tokens: summed over the world. An expert's gradient already holds every
    ep rank's tokens, brought home by the backward all-to-all: summed over the
    dp ranks that hold the same expert. With ep = 1 the experts are replicated
    like any dense parameter, and the dp group is the world. Layers with
    redundant experts first sum each logical expert's replica gradients
    over the ep group (MoELayer.sync_replica_grads).
    """
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.sync_replica_grads()
    if layout.world == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:  # a parameter this rank never used still takes part in the sums
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    experts = expert_parameters(model) if layout.ep > 1 else set()
    dense = [p.grad for p in params if id(p) not in experts]
    sharded = [p.grad for p in params if id(p) in experts]
    comm.sum_tensors(dense, dist.group.WORLD, "dense gradient sum")
    if layout.dp_group is not None:
        comm.sum_tensors(sharded, layout.dp_group, "expert gradient sum over dp")


def check_optimizer_tracks(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise unless `optimizer` holds exactly the model's current trainable parameters.

    An optimizer built before a module was swapped in (shard_experts, FSDP)
    holds the old Parameter objects: it would step them while the model trains
    nothing, silently. NOTE: compared by identity, not by name or shape.
    """
    tracked = {id(p) for group in optimizer.param_groups for p in group["params"]}
    current = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(name for pid, name in current.items() if pid not in tracked)
    stale = len(tracked - current.keys())
    if missing or stale:
        raise ValueError(
            f"the optimizer does not hold the model's parameters: {len(missing)} missing "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}), {stale} it holds are no "
            f"longer in the model; build the optimizer after shard_experts and FSDP"
        )
