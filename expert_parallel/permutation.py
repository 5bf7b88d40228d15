"""Local token movement: group a rank's kept assignments by expert, and put results back.

No process group here: these are permutations on one rank.
Legend: T tokens, K choices, N = T * K slots (slot n = t * K + k), R kept rows
sorted by expert id, D input width, O output width, P ranks, e local experts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    """Rows grouped by expert, tokens in order within an expert."""
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


class _Permute(torch.autograd.Function):
    """x_TD[token_R]; the backward sums each token's K slot gradients in slot order.

    NOTE: index_select's own backward scatter-adds in row order, so a token's
    gradient would depend on how rows are ordered (by expert, by chunk) once
    K >= 3; gathering by slot makes it the same for every order, and
    deterministic on every device (no atomics), like `combine`.
    """

    @staticmethod
    def forward(ctx, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        ctx.plan = plan
        return x_TD.index_select(0, plan.token_R)

    @staticmethod
    def backward(ctx, grad_RD: Tensor):
        plan = ctx.plan
        if plan.num_rows < plan.num_tokens * plan.top_k:
            grad_RD = F.pad(grad_RD, (0, 0, 0, 1))  # the zero row that dropped slots point at
        grad_TKD = grad_RD.index_select(0, plan.row_N).view(plan.num_tokens, plan.top_k, grad_RD.shape[1])
        return grad_TKD.sum(dim=1), None


def permute(x_TD: Tensor, plan: DispatchPlan) -> Tensor:
    """[T, D] tokens -> [R, D] rows grouped by expert (a token appears once per kept choice)."""
    return _Permute.apply(x_TD, plan)


class _Combine(torch.autograd.Function):
    """out_t = sum_k weight_tk * y(row of slot (t, k)), with a backward that knows each row holds one slot.

    The forward gathers each slot's row and runs one [1, K] x [K, O] product
    per token. Autograd's own backward of that would write every slot's
    gradient into a [T, K, O] tensor by a batched product, then scatter-add
    it into a zeroed [R, O]. Here row r's gradient is its slot's weight times
    its token's gradient, gathered: the same bits (one product each, and
    adding it to zero changes nothing), with no [T, K, O] tensor, no zero
    fill and no scatter. The weights' gradient is the product bmm's backward
    runs, so it keeps its bits too.
    """

    @staticmethod
    def forward(ctx, y_RO: Tensor, weights_TK: Tensor, plan: DispatchPlan) -> Tensor:
        if plan.num_rows < plan.num_tokens * plan.top_k:
            y_RO = F.pad(y_RO, (0, 0, 0, 1))  # the zero row that dropped slots point at
        slots_TKO = y_RO.index_select(0, plan.row_N).view(plan.num_tokens, plan.top_k, y_RO.shape[-1])
        weights_T1K = weights_TK.unsqueeze(1)
        ctx.save_for_backward(weights_T1K, slots_TKO)
        ctx.plan = plan
        return torch.bmm(weights_T1K, slots_TKO).squeeze(1)

    @staticmethod
    def backward(ctx, grad_TO: Tensor):
        weights_T1K, slots_TKO = ctx.saved_tensors
        plan = ctx.plan
        grad_y_RO = grad_weights_TK = None
        if ctx.needs_input_grad[0]:
            weight_R1 = weights_T1K.reshape(-1).index_select(0, plan.slot_R).unsqueeze(1)
            grad_y_RO = grad_TO.index_select(0, plan.token_R) * weight_R1
        if ctx.needs_input_grad[1]:
            grad_weights_TK = torch.bmm(grad_TO.unsqueeze(1), slots_TKO.transpose(1, 2)).squeeze(1)
        return grad_y_RO, grad_weights_TK, None


def combine(y_RO: Tensor, weights_TK: Tensor, plan: DispatchPlan) -> Tensor:
    """[R, O] expert outputs -> [T, O]: out_t = sum_k weight_tk * y(t, k).

    Each slot gathers its row (a dropped slot gathers a zero row), then one
    small [1, K] x [K, O] product per token: a gather-style combine with no
    atomics, forward or backward, deterministic on every device (_Combine).
    """
    if y_RO.shape[0] != plan.num_rows:
        raise ValueError(f"combine: {y_RO.shape[0]} expert output rows for a plan of {plan.num_rows}")
    # NOTE: cast outside the Function, as autocast would cast bmm's operand: differentiably.
    return _Combine.apply(y_RO, weights_TK.to(y_RO.dtype), plan)


def scaled_assignments(x_TD: Tensor, routing: Routing) -> tuple[Tensor, Routing]:
    """Weights on the experts' input (MoEConfig.scale_expert_input): (x_ND, routing_N1).

    Each slot n = t * K + k becomes a token of its own, x_t * weight_tk,
    routed to its expert alone with weight 1 (0 where dropped), so any
    dispatcher and `combine` carry it unchanged; `sum_choices` of the
    combined [N, O] gives out_t = sum_k expert_k(weight_tk * x_t).
    """
    num_tokens, top_k = routing.expert_ids.shape
    x_TKD = x_TD.unsqueeze(1) * routing.weights.to(x_TD.dtype).unsqueeze(-1)
    keep_N1 = routing.keep.reshape(-1, 1)
    return x_TKD.reshape(num_tokens * top_k, x_TD.shape[-1]), replace(
        routing,
        expert_ids=routing.expert_ids.reshape(-1, 1),
        weights=keep_N1.to(routing.weights.dtype),
        keep=keep_N1,
    )


def sum_choices(out_NO: Tensor, top_k: int) -> Tensor:
    """[T * K, O] (slot n = t * K + k) -> [T, O]: each token's K outputs summed, in k order."""
    return out_NO.view(-1, top_k, out_NO.shape[-1]).sum(dim=1)


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


@dataclass(frozen=True)
class RankDispatchPlan:
    """Once-per-rank dispatch: each token goes once to each rank that holds one of its kept experts.

    Rows are the distinct (destination rank, token) pairs, rank-major, tokens in order.
    token_R: [R] the token of each row.
    local_expert_RK: [R, K] for each of the token's K choices, the destination's
        local expert id if that choice is kept and lives there, else -1.
    choice_RK: [R, K] bool, local_expert_RK >= 0 (which of the token's weights travel with the row).
    row_TK: [T, K] the rows of token t (at most K distinct ranks), R for unused slots.
    rows_per_rank: [P] host ints (sum = R).
    """

    token_R: Tensor
    local_expert_RK: Tensor
    choice_RK: Tensor
    row_TK: Tensor
    rows_per_rank: list[int]

    @property
    def num_rows(self) -> int:
        return self.token_R.numel()


def plan_rank_dispatch(routing: Routing, num_ranks: int) -> RankDispatchPlan:
    """Rows for once-per-rank dispatch over `num_ranks` ranks holding E / P consecutive experts each.

    Example, P=2, e=2 (experts 0,1 on rank 0; 2,3 on rank 1), K=2:
        expert_ids = [[0, 1], [1, 2]], all kept
        pairs (rank, token): (0, t0) (0, t1) (1, t1)   -> 3 rows instead of 4
        local_expert = [[0, 1], [1, -1], [-1, 0]]       row_TK = [[0, 3], [1, 2]]
    """
    num_tokens, top_k = routing.expert_ids.shape
    per_rank = routing.tokens_per_expert.numel() // num_ranks
    device = routing.expert_ids.device
    rank_TK = torch.where(routing.keep, routing.expert_ids // per_rank, num_ranks)
    wanted_PT = torch.zeros(num_ranks + 1, num_tokens, dtype=torch.bool, device=device)
    wanted_PT[rank_TK.t(), torch.arange(num_tokens, device=device).expand(top_k, -1)] = True
    wanted_PT = wanted_PT[:num_ranks]
    # NOTE: host sync; the all-to-all needs host split sizes.
    rows_per_rank = wanted_PT.sum(dim=1).tolist()
    num_rows = sum(rows_per_rank)
    rank_R, token_R = wanted_PT.nonzero(as_tuple=True)  # rank-major, tokens in order
    row_PT = torch.full((num_ranks + 1, num_tokens), num_rows, dtype=torch.long, device=device)
    row_PT[rank_R, token_R] = torch.arange(num_rows, device=device)
    choice_RK = rank_TK.index_select(0, token_R) == rank_R.unsqueeze(1)
    local_RK = routing.expert_ids.index_select(0, token_R) - rank_R.unsqueeze(1) * per_rank
    local_expert_RK = torch.where(choice_RK, local_RK, -1)
    # A token's rows: its distinct ranks, each once (a repeated rank points at the unused row R).
    ranks_TK = rank_TK.sort(dim=1).values
    repeated_TK = torch.zeros_like(ranks_TK, dtype=torch.bool)
    repeated_TK[:, 1:] = ranks_TK[:, 1:] == ranks_TK[:, :-1]
    ranks_TK = torch.where(repeated_TK, num_ranks, ranks_TK)
    row_TK = row_PT[ranks_TK, torch.arange(num_tokens, device=device).unsqueeze(1)]
    return RankDispatchPlan(token_R, local_expert_RK, choice_RK, row_TK, rows_per_rank)


def expand_by_expert(local_expert_SK: Tensor, num_local_experts: int) -> tuple[Tensor, Tensor, list[int]]:
    """On the expert's rank: received rows [S] with up to K local experts each -> assignments by expert.

    Returns (row_A, slot_SK, rows_per_local_expert): row_A [A] the received row
    of each assignment, grouped by local expert (rows in arrival order within
    an expert); slot_SK [S, K] each (row, choice)'s assignment, A where unused.
    """
    num_rows, top_k = local_expert_SK.shape
    used_N = (local_expert_SK >= 0).reshape(-1)
    expert_N = torch.where(used_N, local_expert_SK.reshape(-1), num_local_experts)
    # NOTE: stable, so each expert's rows keep the arrival order (source rank, then token).
    order_N = expert_N.argsort(stable=True)
    counts = torch.bincount(expert_N, minlength=num_local_experts + 1)
    rows_per_local_expert = counts[:num_local_experts].tolist()  # NOTE: host sync, for the GEMMs
    num_assignments = sum(rows_per_local_expert)
    slot_A = order_N[:num_assignments]
    slot_N = torch.full_like(order_N, num_assignments)
    slot_N[slot_A] = torch.arange(num_assignments, device=slot_A.device)
    return slot_A // top_k, slot_N.view(num_rows, top_k), rows_per_local_expert


def weighted_sum(y_AO: Tensor, weights_SK: Tensor, slot_SK: Tensor) -> Tensor:
    """[S, O]: row s = sum_k weights[s, k] * y[slot[s, k]] (unused slots point past the end: zero)."""
    y_AO = F.pad(y_AO, (0, 0, 0, 1))
    gathered_SKO = y_AO.index_select(0, slot_SK.reshape(-1)).view(*slot_SK.shape, y_AO.shape[-1])
    return torch.bmm(weights_SK.to(y_AO.dtype).unsqueeze(1), gathered_SKO).squeeze(1)


def sum_rows(z_RO: Tensor, row_TK: Tensor) -> Tensor:
    """[T, O]: out_t = sum_k z[row[t, k]], in k order (unused slots point past the end: zero)."""
    z_RO = F.pad(z_RO, (0, 0, 0, 1))
    return z_RO.index_select(0, row_TK.reshape(-1)).view(*row_TK.shape, z_RO.shape[-1]).sum(dim=1)


def sort_by_id(ids_N: Tensor, num_ids: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Slots sorted by id, and each one's position among the slots of its id; no host sync.

    Returns (order_N, sorted ids_N, position_N of each sorted slot, counts [num_ids]).
    NOTE: stable, so the slots of one id keep their order (tokens in order).
    Example: ids [2, 0, 2, 1] -> order [1, 3, 0, 2], sorted [0, 1, 2, 2], positions [0, 0, 0, 1].
    """
    order_N = ids_N.argsort(stable=True)
    sorted_N = ids_N[order_N]
    counts_I = torch.zeros(num_ids, dtype=torch.long, device=ids_N.device)
    counts_I.scatter_add_(0, ids_N, torch.ones_like(ids_N))
    starts_I = counts_I.cumsum(0) - counts_I
    position_N = torch.arange(ids_N.numel(), device=ids_N.device) - starts_I[sorted_N]
    return order_N, sorted_N, position_N, counts_I


@dataclass(frozen=True)
class PaddedPlan:
    """Capacity routing with static shapes: expert e's kept rows fill slots e * C ... e * C + C - 1.

    token_P: [E * C] the token in each slot; T (a zero row) where a slot is empty.
    slot_N: [N] the slot each assignment went to; E * C (a zero row) where dropped.
    Every shape depends only on T, K, E and C, so torch.compile sees one graph
    for every routing; empty slots cost GEMM rows (E * C >= kept assignments).
    """

    token_P: Tensor
    slot_N: Tensor
    num_experts: int
    capacity: int


def plan_padded(routing: Routing, capacity: int) -> PaddedPlan:
    """Slots for capacity routing; an expert's rows in token order (as plan_dispatch orders them)."""
    num_tokens, top_k = routing.expert_ids.shape
    num_experts = routing.tokens_per_expert.numel()
    device = routing.expert_ids.device
    expert_ids_N = torch.where(routing.keep, routing.expert_ids, num_experts).reshape(-1)
    order_N, sorted_N, position_N, _ = sort_by_id(expert_ids_N, num_experts + 1)
    num_slots = num_experts * capacity
    sorted_slot_N = torch.where(sorted_N < num_experts, sorted_N * capacity + position_N, num_slots)
    slot_N = torch.empty_like(order_N).scatter_(0, order_N, sorted_slot_N)
    token_P1 = torch.full((num_slots + 1,), num_tokens, dtype=torch.long, device=device)
    token_P1.scatter_(0, slot_N, torch.arange(order_N.numel(), device=device) // top_k)
    return PaddedPlan(token_P1[:num_slots], slot_N, num_experts, capacity)


def permute_padded(x_TD: Tensor, plan: PaddedPlan) -> Tensor:
    """[T, D] -> [E, C, D]: each expert's slots, zero rows where empty."""
    x_T1D = F.pad(x_TD, (0, 0, 0, 1))
    return x_T1D.index_select(0, plan.token_P).view(plan.num_experts, plan.capacity, x_TD.shape[-1])


def combine_padded(y_ECO: Tensor, weights_TK: Tensor, plan: PaddedPlan) -> Tensor:
    """[E, C, O] -> [T, O]: out_t = sum_k weight_tk * y(slot of (t, k)); a dropped slot adds 0."""
    num_tokens, top_k = weights_TK.shape
    y_P1O = F.pad(y_ECO.reshape(-1, y_ECO.shape[-1]), (0, 0, 0, 1))
    slots_TKO = y_P1O.index_select(0, plan.slot_N).view(num_tokens, top_k, y_ECO.shape[-1])
    return torch.bmm(weights_TK.to(y_ECO.dtype).unsqueeze(1), slots_TKO).squeeze(1)
