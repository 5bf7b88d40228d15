"""Balanced dispatch's plan: which rank runs which rows of which expert, from the gathered counts alone.

    plan = plan_balance(rows_PE, num_local_experts)
    if worth_balancing(plan): ...  # else the standard all-to-all dispatch

A pure function of the all-gathered [P][E'] kept rows per (source rank,
physical expert), host ints every rank holds after the count exchange: every
rank computes the same plan with no further exchange, and the backward
reuses the forward's. No tensors, no process group.

The bound: with M rows in all, every rank runs at most ceil(M / P) rows, so
max / mean <= ceil(M / P) / (M / P) < 1 + P / M: within 1.05 of the mean
from M >= 20 P rows on.

Legend: P ranks, E' physical experts (P * e, rank-major: rank d owns d * e ...
d * e + e - 1), e local experts, U work units: each rank's local experts,
then the experts it borrows for this step (ascending), rank after rank.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BalancePlan:
    """Where every kept row runs in one forward; the same on every rank.

    rows_PU: [P][U] rows source rank p sends to unit u; summed over p and the
        units of one expert, an expert's rows (every row exactly once).
    units: [P] the physical experts each rank runs, its e local experts then
        its borrowed ones ascending; unit u is the u-th entry of the
        concatenation (rank-major).
    borrowed: [P] the physical experts each rank borrows for this step
        (their weights travel to it, their gradients back to the owner).
    rows_before: [P] rows each rank's own experts would run (the standard dispatch).
    rows_after: [P] rows each rank runs under this plan.
    """

    rows_PU: tuple[tuple[int, ...], ...]
    units: tuple[tuple[int, ...], ...]
    borrowed: tuple[tuple[int, ...], ...]
    rows_before: tuple[int, ...]
    rows_after: tuple[int, ...]

    @property
    def num_ranks(self) -> int:
        return len(self.units)

    def unit_offsets(self) -> list[int]:
        """[P + 1]: rank d's units are d's offset ... d + 1's offset - 1."""
        return _offsets(self.units)

    def lent(self, num_local_experts: int) -> list[list[tuple[int, int]]]:
        """[P] (borrower rank, local expert index) pairs each owner sends, by borrower, then expert."""
        sends: list[list[tuple[int, int]]] = [[] for _ in self.units]
        for borrower, experts in enumerate(self.borrowed):
            for g in experts:
                sends[g // num_local_experts].append((borrower, g % num_local_experts))
        return sends


def max_over_mean(rows_P: tuple[int, ...] | list[int]) -> float:
    """The busiest rank's rows over the mean rows per rank; 1.0 when nothing runs."""
    total = sum(rows_P)
    return max(rows_P) * len(rows_P) / total if total else 1.0


def plan_balance(rows_PE: list[list[int]], num_local_experts: int) -> BalancePlan:
    """Every rank within ceil(M / P) rows, M the rows of the call, moving as few experts as this greedy can.

    1. Load: expert g runs L_g = sum_p rows_PE[p][g] rows; its owner rank d =
       g // e runs sum of its experts' L_g (the standard dispatch). cap =
       ceil(M / P).
    2. Shed: each rank over cap (ascending) sheds its excess from its
       heaviest experts first (ties: lower id), so the fewest experts move.
    3. Fill: the shed pieces, in that order, fill the ranks under cap
       (most room first, ties: lower rank), each piece spilling to the next
       rank when one is full: a rank borrows an expert for each piece part it
       takes, so at most (pieces + receivers - 1) experts are borrowed.
    4. Sources: each destination of expert g first takes g's rows from its
       own rank (they travel nowhere), then the rest of g's rows go in
       (source rank, destination in unit order) order.

    Worked example, P = 2, e = 2, every first choice on expert 0 and the
    second choices spread: rows_PE = [[4, 1, 1, 2], [4, 2, 1, 1]]. L = [8, 3,
    2, 3]: rank 0 would run 11 rows, rank 1 5; M = 16, cap = 8. Rank 0 sheds
    3 rows of expert 0 (its heaviest); rank 1 (room 3) borrows expert 0 and
    takes them, first rank 1's own 4 rows of it (3 taken, 1 goes to rank 0).
    Rows after: [8, 8]; units [[0, 1], [2, 3, 0]];
    rows_PU = [[4, 1, 1, 2, 0], [1, 2, 1, 1, 3]].
    """
    num_ranks = len(rows_PE)
    e = num_local_experts
    num_experts = num_ranks * e
    if any(len(row) != num_experts for row in rows_PE) or e < 1:
        raise ValueError(f"rows_PE must be [P][P * e] with e >= 1, got {num_ranks} rows for e = {e}")
    load_E = [sum(row[g] for row in rows_PE) for g in range(num_experts)]
    rows_before = [sum(load_E[d * e : (d + 1) * e]) for d in range(num_ranks)]
    total = sum(rows_before)
    cap = -(-total // num_ranks)

    # 2. the pieces each over-cap rank sheds: (expert, rows)
    pieces: list[tuple[int, int]] = []
    for d in range(num_ranks):
        excess = rows_before[d] - cap
        for g in sorted(range(d * e, (d + 1) * e), key=lambda g: (-load_E[g], g)):
            if excess <= 0:
                break
            take = min(excess, load_E[g])
            if take:
                pieces.append((g, take))
                excess -= take

    # 3. the receivers, most room first, filled piece by piece: rows_at[g][d] rows of g run on rank d
    rows_at: list[dict[int, int]] = [{g // e: load_E[g]} if load_E[g] else {} for g in range(num_experts)]
    room = {d: cap - rows_before[d] for d in range(num_ranks) if rows_before[d] < cap}
    receivers = sorted(room, key=lambda d: (-room[d], d))
    at = 0
    for g, rows in pieces:
        owner = g // e
        rows_at[g][owner] -= rows
        while rows:
            d = receivers[at]
            take = min(rows, room[d])
            rows_at[g][d] = rows_at[g].get(d, 0) + take
            room[d] -= take
            rows -= take
            if room[d] == 0:
                at += 1
    borrowed = [
        sorted(g for g in range(num_experts) if g // e != d and rows_at[g].get(d)) for d in range(num_ranks)
    ]
    units = [list(range(d * e, (d + 1) * e)) + borrowed[d] for d in range(num_ranks)]
    offsets = _offsets(units)
    unit_of = {(d, g): offsets[d] + i for d in range(num_ranks) for i, g in enumerate(units[d])}

    # 4. which sources' rows fill each destination's share of expert g
    rows_PU = [[0] * offsets[-1] for _ in range(num_ranks)]
    for g in range(num_experts):
        supply = [row[g] for row in rows_PE]
        dests = sorted(rows_at[g], key=lambda d: unit_of[(d, g)])
        demand = {d: rows_at[g][d] for d in dests}
        for d in dests:  # a destination's own rows first: they stay on their rank
            take = min(supply[d], demand[d])
            rows_PU[d][unit_of[(d, g)]] += take
            supply[d] -= take
            demand[d] -= take
        for p in range(num_ranks):
            for d in dests:
                take = min(supply[p], demand[d])
                if take:
                    rows_PU[p][unit_of[(d, g)]] += take
                    supply[p] -= take
                    demand[d] -= take
    rows_after = [sum(sum(row[offsets[d] : offsets[d + 1]]) for row in rows_PU) for d in range(num_ranks)]
    return BalancePlan(
        tuple(tuple(row) for row in rows_PU),
        tuple(tuple(u) for u in units),
        tuple(tuple(b) for b in borrowed),
        tuple(rows_before),
        tuple(rows_after),
    )


# NOTE: measured on 2 gloo ranks of a 2-core AMD EPYC (benchmarks/balanced_dispatch.py, d_model 256,
# d_hidden 1024, 8 experts, top-2, all first choices on one expert): lending one expert cost 83 rows
# at 2 ranks and 97 at 4 (its calibration); the rest of the balanced path (the plan, the extra
# exchange, the second expert GEMM group, the gradient sum into the owner) about 160 more rows per
# call, fitted to the step times of 128 to 2048 tokens per rank, where forced balancing broke even
# near 300 tokens per rank (1.29 at 128, 1.08 at 256, 0.87 at 512, 0.77 at 1024 and 2048).
WEIGHT_COST_ROWS = 96
FIXED_COST_ROWS = 160
MIN_GAIN = 0.9


def worth_balancing(
    plan: BalancePlan,
    num_local_experts: int,
    weight_cost_rows: float = WEIGHT_COST_ROWS,
    fixed_cost_rows: float = FIXED_COST_ROWS,
    gain: float = MIN_GAIN,
) -> bool:
    """Whether the balanced plan should beat the standard dispatch: the rule of the layer's fallback.

    Each rank's time, in expert rows (one row through one expert, forward
    and backward): standard, rows_before[d]; balanced, rows_after[d] plus
    `weight_cost_rows` for each expert copy it receives or sends (the
    weights out in the forward, their gradient back in the backward: 2 W
    values moved for an expert of W = 2 or 3 D H weights, against 6 W flops
    for one row, so the ratio depends on the machine's exchange bandwidth
    against its GEMM speed, not on D or H), plus `fixed_cost_rows` for the
    rest of the balanced path. Balance when

        max_d (rows_after[d] + c * moved[d]) + fixed <= gain * max_d rows_before[d]

    i.e. when it should save at least 1 - gain of the busiest rank's time.
    So small calls, whose saved rows cannot pay for the weights, and
    near-even ones keep the standard dispatch. Example (the defaults), 2
    ranks, all first choices on one expert (max / mean 1.43 before): the
    owner lends one copy, so balancing needs mean + 96 + 160 <= 0.9 * 1.43 *
    mean, a mean of at least 890 rows per rank (445 tokens at top-2).
    A pure function of the plan: every rank decides alike.
    """
    if not any(plan.borrowed):
        return False
    moved = [len(b) for b in plan.borrowed]
    for d, sends in enumerate(plan.lent(num_local_experts)):
        moved[d] += len(sends)
    balanced = max(rows + weight_cost_rows * n for rows, n in zip(plan.rows_after, moved)) + fixed_cost_rows
    return balanced <= gain * max(plan.rows_before)


def _offsets(units: list[list[int]]) -> list[int]:
    """[P + 1] running sums of the ranks' unit counts."""
    offsets = [0]
    for ranks_units in units:
        offsets.append(offsets[-1] + len(ranks_units))
    return offsets
