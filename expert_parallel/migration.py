"""Where a layer's experts live, and moving them: the local layout of a placement, replica gradients,
and re-placing a trained layer's experts (weights and optimizer state) between ranks.

Legend: E logical experts, P ranks, s physical experts per rank, X a tensor's other dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import comm
from .placement import Placement


def local_experts(
    num_experts: int, rank: int, size: int, placement: Placement | None, where: str
) -> tuple[int, int, list[int]]:
    """(local expert count, first local physical id, the logical id of each local expert) of `rank`.

    Without a placement rank r holds experts r*E/P ... (r+1)*E/P - 1; with one,
    placement.physical_to_logical[r] (checked against E and P).
    """
    if placement is None:
        if num_experts % size:
            raise ValueError(f"MoEConfig.num_experts={num_experts} is not divisible by the group size {size}")
        count = num_experts // size
        return count, rank * count, list(range(rank * count, (rank + 1) * count))
    physical_PS = placement.physical_to_logical
    if (
        physical_PS.dim() != 2
        or physical_PS.shape[0] != size
        or placement.replica_count.numel() != num_experts
    ):
        raise ValueError(
            f"{where}: placement for {physical_PS.shape[0]} ranks and "
            f"{placement.replica_count.numel()} experts, but the group has {size} ranks and "
            f"MoEConfig.num_experts={num_experts}"
        )
    if sorted(set(physical_PS.flatten().tolist())) != list(range(num_experts)):
        raise ValueError(f"{where}: placement does not hold every logical expert at least once")
    count = physical_PS.shape[1]
    return count, rank * count, physical_PS[rank].tolist()


@torch.no_grad()
def sync_replica_grads(layer) -> None:
    """MoELayer.sync_replica_grads: every replica of a logical expert gets the sum of all its replicas'
    gradients over the group.

    NOTE: one all-reduce of [E, ...] per expert tensor, all E logical experts:
    simple, not minimal traffic. No-op without a placement.
    """
    if layer.placement is None:
        return
    params = list(layer.experts.parameters())
    ids = torch.tensor(layer.local_expert_ids, device=params[0].device)
    full = []
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        full.append(param.grad.new_zeros((layer.config.num_experts, *param.shape[1:])))
        full[-1].index_add_(0, ids, param.grad)
    comm.sum_tensors(full, layer.group, f"{layer.where}: replica gradients")
    for param, total in zip(params, full):
        param.grad.copy_(total.index_select(0, ids))


@torch.no_grad()
def apply_placement(
    layer, placement: Placement | None, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """MoELayer.apply_placement: lay `layer`'s experts out as `placement` says, keeping their weights.

    Every rank of the group calls it with the same placement (checked).
    Weights move between ranks by an all-gather of the local experts over
    the group (each rank receives every physical expert: simple, not minimal
    traffic); with `optimizer`, its per-expert state (AdamW exp_avg,
    exp_avg_sq) moves the same way. Gradients are dropped (set to None).
    The parameters stay the same objects, so an optimizer keeps tracking them.
    """
    comm.agree_on_init(
        {"placement": None if placement is None else placement.physical_to_logical.tolist()}, 0, layer.group
    )
    num_experts = layer.config.num_experts
    old_ids = (
        torch.arange(num_experts)
        if layer.placement is None
        else layer.placement.physical_to_logical.flatten()
    )
    layer._set_placement(placement)
    new_ids = torch.tensor(layer.local_expert_ids)

    def moved(tensor_sX: Tensor) -> Tensor:
        gathered = comm.all_gather_rows(tensor_sX.contiguous(), layer.group, f"{layer.where}: placement")
        full = gathered.new_empty((num_experts, *tensor_sX.shape[1:]))
        full[old_ids.to(full.device)] = gathered  # replicas are identical: any copy will do
        return full[new_ids.to(full.device)].clone()

    for param in layer.experts.parameters():
        old_shape = param.shape
        param.data = moved(param.data)
        param.grad = None
        state = optimizer.state.get(param, {}) if optimizer is not None else {}
        for slot, value in state.items():
            if isinstance(value, Tensor) and value.shape == old_shape:
                state[slot] = moved(value)
    layer.experts.num_local_experts = layer.num_local_experts
