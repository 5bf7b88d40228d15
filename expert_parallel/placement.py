"""Redundant-expert placement (EPLB-style): a pure function from expert load to a layout.

Legend: E logical experts, R redundant (extra) physical experts, P ranks,
s = (E + R) / P physical experts per rank. Physical expert id = rank * s + slot.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .permutation import sort_by_id
from .router import Routing


@dataclass(frozen=True)
class Placement:
    """Which logical expert each physical expert holds.

    physical_to_logical: [P, s] long; row r lists the logical experts on rank r, ascending.
    logical_to_physical: [E, max replicas] long; physical ids of each expert's replicas, ascending, -1 padded.
    replica_count: [E] long, >= 1.
    """

    physical_to_logical: Tensor
    logical_to_physical: Tensor
    replica_count: Tensor

    @property
    def num_ranks(self) -> int:
        return self.physical_to_logical.shape[0]

    def rank_load(self, load_E: Tensor) -> Tensor:
        """[P] load per rank for a logical load [E], each expert's load split equally over its replicas."""
        per_replica_E = load_E.double() / self.replica_count
        return per_replica_E[self.physical_to_logical].sum(dim=1)


def _from_rows(rows: list[list[int]], num_experts: int) -> Placement:
    physical_to_logical = torch.tensor([sorted(row) for row in rows], dtype=torch.long)
    replicas: list[list[int]] = [[] for _ in range(num_experts)]
    for physical, logical in enumerate(physical_to_logical.flatten().tolist()):
        replicas[logical].append(physical)
    width = max(len(r) for r in replicas)
    padded = torch.tensor([r + [-1] * (width - len(r)) for r in replicas], dtype=torch.long)
    count = torch.tensor([len(r) for r in replicas], dtype=torch.long)
    return Placement(physical_to_logical, padded, count)


def contiguous(num_experts: int, num_ranks: int) -> Placement:
    """Today's layout, no replicas: rank r holds experts r*E/P ... (r+1)*E/P - 1."""
    _check(num_experts, num_ranks, 0)
    per_rank = num_experts // num_ranks
    rows = [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(num_ranks)]
    return _from_rows(rows, num_experts)


def balance(load: Tensor, num_ranks: int, num_redundant: int) -> Placement:
    """Place E logical experts as E + R physical experts on P ranks, s = (E + R) / P per rank.

    1. Replicate: R times, give one more replica to the expert with the highest
       load per replica, load_i / count_i (ties: lower id), among experts with
       fewer than P replicas (so that replicas can sit on distinct ranks).
    2. Pack (longest processing time first): physical experts, each carrying
       load_i / count_i, sorted by that load descending (ties: expert id), go one
       by one to the least-loaded rank with a free slot that does not hold the
       expert yet (ties: lower rank).
    3. Swap: while some swap of one physical expert on the most-loaded rank with a
       lighter one on another rank lowers the larger of the two ranks' loads
       (keeping replicas on distinct ranks), make the best such swap.

    Worked example: load [6, 3, 2, 1], P = 2, R = 2, so s = 3.
    1. per-replica loads 6 3 2 1 -> expert 0 gets a 2nd replica (3, 3); then
       experts 0 and 1 tie at 3, but expert 0 already has P = 2 replicas, so
       expert 1 gets one (1.5, 1.5). Physical: 3, 3, 2, 1.5, 1.5, 1 (experts 0 0 2 1 1 3).
    2. e0 -> rank 0 (3); e0 -> rank 1 (3, rank 0 holds e0); e2 -> rank 0 (5);
       e1 -> rank 1 (4.5); e1 -> rank 0 (6.5, rank 1 holds e1); e3 -> rank 1 (5.5).
    3. No swap helps: moving e2 (2) for e3 (1) gives 5.5 / 6.5, the other
       candidates would put two e1 replicas on one rank. Result
       physical_to_logical [[0, 1, 2], [0, 1, 3]], rank loads 6.5 / 5.5:
       max / mean 1.08, against 9 / 3 (1.5) for the contiguous [[0, 1], [2, 3]].

    Deterministic: plain float64 arithmetic in Python, every tie broken by id.
    """
    if load.dim() != 1 or not torch.isfinite(load).all() or (load < 0).any():
        raise ValueError(f"load must be a 1-D tensor of finite values >= 0, got {load!r}")
    num_experts = load.numel()
    _check(num_experts, num_ranks, num_redundant)
    load_E = load.double().tolist()
    count = [1] * num_experts
    for _ in range(num_redundant):
        room = [i for i in range(num_experts) if count[i] < num_ranks] or list(range(num_experts))
        best = max(room, key=lambda i: (load_E[i] / count[i], -i))
        count[best] += 1

    items = sorted(
        ((load_E[i] / count[i], i) for i in range(num_experts) for _ in range(count[i])),
        key=lambda item: (-item[0], item[1]),
    )
    slots = (num_experts + num_redundant) // num_ranks
    rows: list[list[int]] = [[] for _ in range(num_ranks)]
    rank_load = [0.0] * num_ranks
    for weight, expert in items:
        free = [r for r in range(num_ranks) if len(rows[r]) < slots]
        fresh = [r for r in free if expert not in rows[r]] or free
        target = min(fresh, key=lambda r: (rank_load[r], r))
        rows[target].append(expert)
        rank_load[target] += weight

    def per(expert: int) -> float:
        return load_E[expert] / count[expert]

    for _ in range(num_ranks * slots * slots):
        hi = max(range(num_ranks), key=lambda r: (rank_load[r], -r))
        best = None  # (new max of the pair, lo, a, b)
        for lo in range(num_ranks):
            for a in rows[hi]:
                for b in rows[lo]:
                    delta = per(a) - per(b)
                    if lo == hi or delta <= 0 or (a != b and (a in rows[lo] or b in rows[hi])):
                        continue
                    pair_max = max(rank_load[hi] - delta, rank_load[lo] + delta)
                    lower = pair_max < rank_load[hi] * (1 - 1e-12)  # NOTE: a margin, so rounding cannot cycle
                    if lower and (best is None or pair_max < best[0]):
                        best = (pair_max, lo, a, b)
        if best is None:
            break
        _, lo, a, b = best
        rows[hi][rows[hi].index(a)], rows[lo][rows[lo].index(b)] = b, a
        rank_load[hi], rank_load[lo] = rank_load[hi] - per(a) + per(b), rank_load[lo] + per(a) - per(b)
    return _from_rows(rows, num_experts)


def _check(num_experts: int, num_ranks: int, num_redundant: int) -> None:
    if num_experts < 1 or num_ranks < 1 or num_redundant < 0:
        raise ValueError(
            f"need num_experts >= 1, num_ranks >= 1, num_redundant >= 0; got num_experts={num_experts}, "
            f"num_ranks={num_ranks}, num_redundant={num_redundant}"
        )
    if (num_experts + num_redundant) % num_ranks:
        raise ValueError(
            f"num_experts + num_redundant = {num_experts} + {num_redundant} = {num_experts + num_redundant} "
            f"physical experts do not divide evenly over num_ranks={num_ranks}"
        )


def to_physical(routing: Routing, placement: Placement, rank: int) -> Routing:
    """`routing` with each kept assignment's logical expert replaced by one of its physical replicas.

    This rank's kept rows for logical expert g, in token order (slot t * K + k),
    are c rows; g has n replicas; row j goes to replica (floor(j * n / c) + rank) % n
    (of logical_to_physical[g], ascending physical ids). Adding the rank
    spreads experts with few rows per rank (c < n) over all their replicas.
    Example: c = 5, n = 2, rank = 1: rows 0-2 -> replica 1, rows 3-4 -> replica 0.
    Dropped slots keep their id (unused). tokens_per_expert becomes [P * s] per physical expert.
    """
    device = routing.expert_ids.device
    replica_count_E = placement.replica_count.to(device)
    num_experts, num_physical = replica_count_E.numel(), placement.physical_to_logical.numel()
    keep_N = routing.keep.reshape(-1)
    logical_N = torch.where(keep_N, routing.expert_ids.reshape(-1), num_experts)
    order_N, sorted_N, j_N, counts_E1 = sort_by_id(logical_N, num_experts + 1)  # rows keep token order
    count_E1 = F.pad(replica_count_E, (0, 1), value=1)
    n_N, c_N = count_E1[sorted_N], counts_E1[sorted_N].clamp_min(1)
    replica_N = (j_N * n_N // c_N + rank) % n_N
    physical_EX = F.pad(placement.logical_to_physical.to(device), (0, 0, 0, 1), value=0)
    physical_N = torch.empty_like(logical_N)
    physical_N[order_N] = physical_EX[sorted_N, replica_N]
    physical_N = torch.where(keep_N, physical_N, routing.expert_ids.reshape(-1))
    tokens_per_physical = torch.zeros(num_physical, dtype=torch.long, device=device)
    tokens_per_physical.scatter_add_(0, physical_N, keep_N.long())
    return replace(
        routing, expert_ids=physical_N.view_as(routing.expert_ids), tokens_per_expert=tokens_per_physical
    )
