"""Local token movement: group a rank's kept assignments by expert, and put results back.

No process group here: these are permutations on one rank.
Legend: T tokens, K choices, N = T * K slots (slot n = t * K + k), R kept rows
sorted by expert id, D input width, O output width, P ranks, e local experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .router import Routing


@dataclass(frozen=True)
class DispatchPlan:
    """How kept assignments map to rows sorted by expert; made once, used by permute and combine.

    slot_R: [R] the slot (t * K + k) each row came from.
    token_R: [R] the token each row came from.
    row_N: [N] the row each slot went to; R (one past the last row) for dropped slots.
    rows_per_expert: [E] host ints, rows of each global expert (sum = R).
    """

    slot_R: Tensor
    token_R: Tensor
    row_N: Tensor
    rows_per_expert: list[int]
    num_tokens: int
    top_k: int

    @property
    def num_rows(self) -> int:
        return self.slot_R.numel()


def plan_dispatch(routing: Routing) -> DispatchPlan:
    num_tokens, top_k = routing.expert_ids.shape
    num_experts = routing.tokens_per_expert.numel()
    # Dropped slots get the sentinel id E and sort after every expert, so the
    # kept rows are a prefix. NOTE: stable, so an expert's rows keep token order.
    expert_ids_N = torch.where(routing.keep, routing.expert_ids, num_experts).reshape(-1)
    order_N = expert_ids_N.argsort(stable=True)
    # NOTE: host sync; the all-to-all splits and the per-expert GEMMs need host counts.
    rows_per_expert = routing.tokens_per_expert.tolist()
    num_rows = sum(rows_per_expert)
    slot_R = order_N[:num_rows]
    row_N = torch.full_like(order_N, num_rows)
    row_N[slot_R] = torch.arange(num_rows, device=slot_R.device)
    return DispatchPlan(slot_R, slot_R // top_k, row_N, rows_per_expert, num_tokens, top_k)


def permute(x_TD: Tensor, plan: DispatchPlan) -> Tensor:
    """[T, D] tokens -> [R, D] rows grouped by expert (a token appears once per kept choice)."""
    return x_TD.index_select(0, plan.token_R)


def combine(y_RO: Tensor, weights_TK: Tensor, plan: DispatchPlan) -> Tensor:
    """[R, O] expert outputs -> [T, O]: out_t = sum_k weight_tk * y(t, k).

    Each slot gathers its row (a dropped slot gathers a zero row), then one
    small [1, K] x [K, O] product per token: a gather-style combine with no
    atomics in the forward, deterministic on every device.
    """
    if plan.num_rows < plan.num_tokens * plan.top_k:
        y_RO = F.pad(y_RO, (0, 0, 0, 1))  # the zero row that dropped slots point at
    slots_TKO = y_RO.index_select(0, plan.row_N).view(plan.num_tokens, plan.top_k, y_RO.shape[-1])
    return torch.bmm(weights_TK.to(y_RO.dtype).unsqueeze(1), slots_TKO).squeeze(1)


def source_to_expert_order(rows_Pe: list[list[int]], device: torch.device) -> Tensor:
    """Index regrouping received rows from (source rank, local expert) to (local expert, source rank).

    rows_Pe[p][j]: rows rank p sent for local expert j. The all-to-all delivers
    them source-major; the expert GEMMs want each expert's rows contiguous.
    Example, P=2, e=2, rows_Pe=[[1, 2], [3, 0]]: received blocks (p0,j0)=[0]
    (p0,j1)=[1, 2] (p1,j0)=[3, 4, 5]; expert-major order: [0, 3, 4, 5, 1, 2].
    """
    counts_Pe = torch.tensor(rows_Pe, dtype=torch.long)
    num_rows = int(counts_Pe.sum())
    source_starts_Pe = (counts_Pe.reshape(-1).cumsum(0) - counts_Pe.reshape(-1)).view_as(counts_Pe)
    counts_eP = counts_Pe.t().reshape(-1)
    expert_starts_eP = counts_eP.cumsum(0) - counts_eP
    shift_eP = source_starts_Pe.t().reshape(-1) - expert_starts_eP
    index_R = torch.arange(num_rows) + torch.repeat_interleave(shift_eP, counts_eP, output_size=num_rows)
    return index_R.to(device)


def inverse_permutation(index_R: Tensor) -> Tensor:
    inverse_R = torch.empty_like(index_R)
    inverse_R[index_R] = torch.arange(index_R.numel(), device=index_R.device)
    return inverse_R


class _PermuteRows(torch.autograd.Function):
    """x[index] for a permutation `index`; the backward gathers with the inverse.

    index_select's own backward zero-fills and scatter-adds, which a
    permutation does not need.
    """

    @staticmethod
    def forward(ctx, x_RD: Tensor, index_R: Tensor, inverse_R: Tensor) -> Tensor:
        ctx.save_for_backward(inverse_R)
        return x_RD.index_select(0, index_R)

    @staticmethod
    def backward(ctx, grad_RD: Tensor):
        (inverse_R,) = ctx.saved_tensors
        return grad_RD.index_select(0, inverse_R), None, None


def permute_rows(x_RD: Tensor, index_R: Tensor, inverse_R: Tensor) -> Tensor:
    """Rows of x in the order of the permutation `index_R` (`inverse_R` its inverse)."""
    return _PermuteRows.apply(x_RD, index_R, inverse_R)
