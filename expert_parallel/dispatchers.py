"""Dispatchers: how routed rows reach the ranks holding their experts, and how the outputs come back.

One interface, five ways of moving tokens:

    counts = dispatcher.exchange_counts(x, routing, check, device)   # None without a group
    chunks, record = dispatcher.dispatch(x_TD, routing, counts, experts)
    y_chunks = (experts(c.x, c.rows_per_expert, c.borrowed) for c in chunks)
    out_TO = dispatcher.combine(y_chunks, record)

- LocalDispatcher: no group; every expert is on this rank.
- AllToAllDispatcher: each kept (token, expert) pair is one all-to-all row;
  with ExecutionConfig.exchange_chunks > 1 the local experts form chunks
  whose exchanges and GEMMs are pipelined.
- RankDispatcher: each token travels once to each rank holding one of its
  experts, is expanded to those experts there, and their weighted outputs
  come back summed into one row.
- BalancedDispatcher: per-assignment rows, planned per forward from the
  gathered counts so that every rank runs at most ceil(M / P) rows; a rank
  running a hot expert's rows borrows its weights for the forward (in the
  same exchange), and their gradient goes home in the backward. Falls back
  to AllToAllDispatcher where that cannot win (balance_plan.py). Only it
  reads `experts` in dispatch (the others take it and ignore it).
- FixedDispatcher: for decoding. C padded slots per (rank, expert), C a token
  bound every rank knows, so there is no count exchange and no host sync:
  one equal-split all-to-all each way. `for_call` picks it by itself for a
  small, agreed token bound at eval time. The only dispatcher that knows
  "fixed": the layer asks a dispatcher, not its kind, whether it promises
  no host sync (`host_sync_free`) and whether it traces into one graph
  (`traceable`).

`chunks` is lazy: chunk c's rows are waited for only when the experts reach
it, and `combine` starts sending chunk c's outputs back before it asks for
chunk c + 1's, which is what overlaps the exchanges with the GEMMs. The
record is frozen and holds everything `combine` needs, so nothing is kept on
the dispatcher between the two calls. The counts are a separate step, so that
an activation-checkpointing recompute can pass the forward's counts instead
of exchanging them again.

Redundant experts: with a placement, each logical expert id becomes one of
its physical replicas (placement.to_physical) before planning; counts,
splits and local experts are physical. The router, the aux losses and the
layer's statistics stay logical.

Legend: T tokens, D d_model, O d_out, K choices, N = T * K slots, E' physical
experts (P * e), e local experts, P ranks, R rows this rank sends, S rows it
receives for its experts, A (row, expert) assignments on the expert's rank,
C slots per (source rank, expert) under the fixed dispatch. Balanced dispatch:
b experts borrowed by this rank, n copies it lends, W one expert's weights
flattened, u work units (local experts, then borrowed ones).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from . import comm
from .balance_plan import BalancePlan, max_over_mean, plan_balance, worth_balancing
from .checks import InputCheck
from .config import ExecutionConfig
from .permutation import (
    DispatchPlan,
    PaddedPlan,
    RankDispatchPlan,
    combine,
    combine_padded,
    expand_by_expert,
    inverse_permutation,
    permute,
    permute_padded,
    permute_rows,
    plan_dispatch,
    plan_padded,
    plan_rank_dispatch,
    sort_by_id,
    source_to_expert_order,
    sum_rows,
    weighted_sum,
)
from .placement import Placement, to_physical
from .router import Routing


@dataclass(frozen=True)
class ExpertLayout:
    """Which experts this rank holds: physical experts rank * e ... rank * e + e - 1 of P * e.

    Without a placement physical and logical ids are the same; with one,
    placement.physical_to_logical[rank] names the logical expert of each.
    """

    rank: int
    size: int
    num_local_experts: int
    placement: Placement | None = None

    @property
    def first_expert(self) -> int:
        return self.rank * self.num_local_experts

    def physical(self, routing: Routing) -> Routing:
        return routing if self.placement is None else to_physical(routing, self.placement, self.rank)


@dataclass(frozen=True)
class ExpertRows:
    """What the local experts need for one chunk.

    x: [S, D] rows grouped by local expert, with rows_per_expert [e] host
    ints (0 outside the chunk); or x [e, C, D] padded slots with
    rows_per_expert None (torch.compile's capacity path). Under balanced
    dispatch, rows_per_expert has e + b entries, the borrowed experts' last.
    """

    x: Tensor
    rows_per_expert: list[int] | None
    borrowed: tuple | None = None  # balanced dispatch: lent experts' (w1, b1, w3, b3, w2, b2) [b, ...]


class RankRows(NamedTuple):
    """How even one forward left the ranks' work: the busiest rank's expert rows over the mean rows
    per rank, as the experts' owners would run them (before) and as they ran (after), and whether
    the balanced dispatch moved any. NaN where no counts were exchanged (the fixed dispatch)."""

    before: float
    after: float
    balanced: bool


ONE_RANK = RankRows(1.0, 1.0, False)


def rank_rows(rows_PE: list[list[int]], num_local_experts: int) -> RankRows:
    """RankRows of the standard dispatch: each rank runs its own experts' rows."""
    load_E = [sum(column) for column in zip(*rows_PE)]
    e = num_local_experts
    ratio = max_over_mean([sum(load_E[d * e : (d + 1) * e]) for d in range(len(rows_PE))])
    return RankRows(ratio, ratio, False)


@dataclass(frozen=True)
class GroupCounts:
    """The result of the count exchange: host ints every rank agrees on.

    rows_PE: [P][E'] kept rows of every rank per physical expert.
    rows_PP: [P][P] rows from each rank to each rank (once-per-rank dispatch; [] per rank otherwise).
    rank_plan: this rank's once-per-rank plan, made to count its rows (None otherwise).
    """

    rows_PE: list[list[int]]
    rows_PP: list[list[int]]
    rank_plan: RankDispatchPlan | None = None


class LocalDispatcher:
    """No group: the rows are permuted by expert and put back, nothing travels.

    Under torch.compile, capacity routing fills E * C padded slots (static
    shapes, batched GEMMs), so the layer is one graph; dropless routing runs
    here eagerly, between the layer's graphs (plan.CallPlan.island).
    """

    traceable = True  # capacity routing has static shapes under torch.compile
    host_sync_free = False

    def __init__(self, layout: ExpertLayout, execution: ExecutionConfig, where: str):
        self.layout, self.execution, self.where = layout, execution, where

    def exchange_counts(
        self, x: object, routing: Routing | None, check: InputCheck, device: torch.device
    ) -> None:
        check.raise_if_bad(self.where)
        return None

    def dispatch(
        self, x_TD: Tensor, routing: Routing, counts: None, experts=None
    ) -> tuple[list[ExpertRows], _LocalRecord]:
        physical = self.layout.physical(routing)
        if torch.compiler.is_compiling() and routing.capacity is not None:
            padded = plan_padded(physical, routing.capacity)
            return [ExpertRows(permute_padded(x_TD, padded), None)], _LocalRecord(
                routing.weights, None, padded
            )
        plan = plan_dispatch(physical)
        check_expert_load([plan.rows_per_expert], self.execution, self.where)
        return [ExpertRows(permute(x_TD, plan), plan.rows_per_expert)], _LocalRecord(
            routing.weights, plan, None
        )

    def combine(self, y_chunks: Iterable[Tensor], record: _LocalRecord) -> Tensor:
        (y,) = list(y_chunks)
        if record.padded is not None:
            return combine_padded(y, record.weights_TK, record.padded)
        return combine(y, record.weights_TK, record.plan)


@dataclass(frozen=True)
class _LocalRecord:
    weights_TK: Tensor
    plan: DispatchPlan | None
    padded: PaddedPlan | None
    rows_sent_away: int = 0
    rank_rows: RankRows = ONE_RANK


class _GroupDispatcher:
    """The count exchange every group dispatcher starts with, and the checks it makes possible."""

    def __init__(
        self, layout: ExpertLayout, execution: ExecutionConfig, group, where: str, clock: comm.ExchangeClock
    ):
        self.layout, self.execution, self.group, self.where, self.clock = (
            layout,
            execution,
            group,
            where,
            clock,
        )

    counts_rows_per_rank = False  # once-per-rank dispatch also exchanges rows per destination rank
    traceable = False  # the splits are host ints that change every step
    host_sync_free = False

    def _rank_plan(self, physical: Routing) -> RankDispatchPlan | None:
        return None

    def exchange_counts(
        self, x: object, routing: Routing | None, check: InputCheck, device: torch.device
    ) -> GroupCounts:
        """Every rank's kept rows per physical expert (and per destination rank); fails on every
        rank at once if any rank's input is bad, ranks disagree on dtype or grad mode, or an
        expert would get more rows than ExecutionConfig.max_tokens_per_expert.

        NOTE: counts go first, in a fixed-size collective, because the token
        all-to-all needs every rank's split sizes. Host sync. A rank whose
        `check` failed takes part with no rows, then raises (checks.py says why).
        """
        layout = self.layout
        num_physical = layout.size * layout.num_local_experts
        rank_plan = None
        if routing is None:  # this rank's input was bad: it still takes part, with no rows
            extra = layout.size if self.counts_rows_per_rank else 0
            counts = torch.zeros(num_physical + extra, dtype=torch.long, device=device)
        else:
            physical = layout.physical(routing)
            counts = physical.tokens_per_expert
            rank_plan = self._rank_plan(physical)
            if rank_plan is not None:
                counts = torch.cat([counts, torch.tensor(rank_plan.rows_per_rank, device=counts.device)])
        dtype_code = _DTYPE_CODES.get(x.dtype, -1) if isinstance(x, Tensor) else -1
        # Ranks building a graph and ranks not would disagree on the backward's exchanges: a hang.
        status = [int(not check.ok), dtype_code, int(torch.is_grad_enabled())]
        counts_PX, status_P = comm.gather_counts(counts, status, self.group, self.clock)
        check.raise_if_bad(self.where)
        _check_status(status_P, self.where)
        rows_PE = [row[:num_physical] for row in counts_PX]
        check_expert_load(rows_PE, self.execution, self.where)
        return GroupCounts(rows_PE, [row[num_physical:] for row in counts_PX], rank_plan)


class AllToAllDispatcher(_GroupDispatcher):
    """Each kept (token, expert) pair is one row; rows grouped chunk-major, one all-to-all per chunk.

    Every chunk's dispatch starts at once; chunk c's experts run as soon as
    its rows have arrived, and its outputs start back while chunk c + 1's
    experts run. Forward and backward overlap alike (comm.start_all_to_all).
    """

    def dispatch(
        self, x_TD: Tensor, routing: Routing, counts: GroupCounts, experts=None
    ) -> tuple[Iterator[ExpertRows], _AllToAllRecord]:
        layout = self.layout
        size, e, first = layout.size, layout.num_local_experts, layout.first_expert
        bounds = chunk_bounds(e, self.execution.exchange_chunks)
        plan = plan_dispatch(_chunk_major(layout.physical(routing), bounds, size))
        rows_per_block = iter(plan.rows_per_expert)  # (chunk, destination rank, local expert)
        chunks = []
        for a, b in bounds:
            send = [sum(next(rows_per_block) for _ in range(b - a)) for _ in range(size)]
            rows_from_Pj = [row[first + a : first + b] for row in counts.rows_PE]
            recv = [sum(row) for row in rows_from_Pj]
            rows_per_local = [0] * a + [sum(column) for column in zip(*rows_from_Pj)] + [0] * (e - b)
            order = None
            if b - a > 1:  # received source-major; the GEMMs want each expert's rows together
                by_expert_S = source_to_expert_order(rows_from_Pj, x_TD.device)
                order = (by_expert_S, inverse_permutation(by_expert_S))
            chunks.append(_Chunk(send, recv, rows_per_local, order))
        x_parts = permute(x_TD, plan).split([sum(c.send) for c in chunks])
        arriving = [
            comm.start_all_to_all(x_cD, c.recv, c.send, self.group, "dispatch", self.clock)
            for x_cD, c in zip(x_parts, chunks)
        ]
        rows_to_self = sum(c.send[layout.rank] for c in chunks)
        record = _AllToAllRecord(
            routing.weights,
            plan,
            tuple(chunks),
            plan.num_rows - rows_to_self,
            rank_rows(counts.rows_PE, layout.num_local_experts),
        )
        return _arrivals(chunks, arriving), record

    def combine(self, y_chunks: Iterable[Tensor], record: _AllToAllRecord) -> Tensor:
        returning = []
        for chunk, y_SO in zip(record.chunks, y_chunks):
            if chunk.order is not None:
                by_expert_S, by_source_S = chunk.order
                y_SO = permute_rows(y_SO, by_source_S, by_expert_S)
            returning.append(
                comm.start_all_to_all(y_SO, chunk.send, chunk.recv, self.group, "combine", self.clock)
            )
        y_parts = [comm.finish_all_to_all(*started) for started in returning]
        y_RO = y_parts[0] if len(y_parts) == 1 else torch.cat(y_parts)
        return combine(y_RO, record.weights_TK, record.plan)


@dataclass(frozen=True)
class _Chunk:
    """One chunk of local experts: rows sent to / received from each rank, rows per local expert,
    and (by_expert_S, by_source_S) where received rows are regrouped by expert (None: one expert)."""

    send: list[int]
    recv: list[int]
    rows_per_local_expert: list[int]
    order: tuple[Tensor, Tensor] | None


@dataclass(frozen=True)
class _AllToAllRecord:
    weights_TK: Tensor
    plan: DispatchPlan
    chunks: tuple[_Chunk, ...]
    rows_sent_away: int
    rank_rows: RankRows


def _arrivals(chunks: list[_Chunk], arriving: list) -> Iterator[ExpertRows]:
    """Each chunk's rows as the experts reach it: wait for its exchange, regroup by expert."""
    for chunk, started in zip(chunks, arriving):
        x_SD = comm.finish_all_to_all(*started)
        if chunk.order is not None:
            by_expert_S, by_source_S = chunk.order
            x_SD = permute_rows(x_SD, by_expert_S, by_source_S)
        yield ExpertRows(x_SD, chunk.rows_per_local_expert)


class RankDispatcher(_GroupDispatcher):
    """Once per rank: three exchanges out (rows, their weights, their local expert ids), one back.

    The weights travel so that the expert's rank can sum a token's outputs
    into one row; their gradient comes back through the same exchange.
    """

    counts_rows_per_rank = True

    def _rank_plan(self, physical: Routing) -> RankDispatchPlan:
        return plan_rank_dispatch(physical, self.layout.size)

    def dispatch(
        self, x_TD: Tensor, routing: Routing, counts: GroupCounts, experts=None
    ) -> tuple[list[ExpertRows], _RankRecord]:
        layout, tag = self.layout, self.clock
        plan = counts.rank_plan
        send = plan.rows_per_rank
        recv = [row[layout.rank] for row in counts.rows_PP]
        x_RD = x_TD.index_select(0, plan.token_R)
        weights_RK = routing.weights.index_select(0, plan.token_R) * plan.choice_RK
        x_SD = comm.all_to_all(x_RD, recv, send, self.group, "dispatch", tag)
        weights_SK = comm.all_to_all(weights_RK, recv, send, self.group, "weights", tag)
        experts_SK = comm.all_to_all(plan.local_expert_RK, recv, send, self.group, "ids", tag)
        row_A, slot_SK, rows_per_local_expert = expand_by_expert(experts_SK, layout.num_local_experts)
        record = _RankRecord(
            plan,
            send,
            recv,
            weights_SK,
            slot_SK,
            plan.num_rows - send[layout.rank],
            rank_rows(counts.rows_PE, layout.num_local_experts),
        )
        return [ExpertRows(x_SD.index_select(0, row_A), rows_per_local_expert)], record

    def combine(self, y_chunks: Iterable[Tensor], record: _RankRecord) -> Tensor:
        (y_AO,) = list(y_chunks)
        z_SO = weighted_sum(y_AO, record.weights_SK, record.slot_SK)
        z_RO = comm.all_to_all(z_SO, record.send, record.recv, self.group, "combine", self.clock)
        return sum_rows(z_RO, record.plan.row_TK)


@dataclass(frozen=True)
class _RankRecord:
    plan: RankDispatchPlan
    send: list[int]
    recv: list[int]
    weights_SK: Tensor
    slot_SK: Tensor
    rows_sent_away: int
    rank_rows: RankRows


class BalancedDispatcher(AllToAllDispatcher):
    """Balanced per forward: every rank runs at most ceil(M / P) of the call's M rows (balance_plan.py).

    From the gathered counts every rank makes the same BalancePlan: rows of a
    hot expert may run on any rank, which borrows that expert's weights for
    this forward. One exchange carries both, the rows (split by the plan)
    and the lent experts' weights (comm.all_to_all_many); its backward
    brings the rows' gradients back and the copies' weight gradients home,
    where index_select's backward sums them into the owner's gradient: the
    owner's .grad is the whole gradient, the optimizer state never moves.
    The outputs come back through one all-to-all, as in the standard dispatch.

    Falls back to the standard all-to-all dispatch (this class's parent)
    when balance_plan.worth_balancing says the plan cannot win: near-even
    loads, or calls too small to pay for the weights. Every rank decides alike.
    """

    def dispatch(
        self, x_TD: Tensor, routing: Routing, counts: GroupCounts, experts=None
    ) -> tuple[Iterator[ExpertRows] | list[ExpertRows], _AllToAllRecord | _BalancedRecord]:
        layout = self.layout
        size, e, rank = layout.size, layout.num_local_experts, layout.rank
        balance = plan_balance(counts.rows_PE, e)
        if not worth_balancing(balance, e):
            return super().dispatch(x_TD, routing, counts)  # its rank_rows: before = after
        if experts is None:
            raise ValueError(f"{self.where}: the balanced dispatch needs the local experts to lend them")
        offsets = balance.unit_offsets()
        plan = plan_dispatch(_to_units(layout.physical(routing), balance, rank))
        send = [sum(balance.rows_PU[rank][offsets[d] : offsets[d + 1]]) for d in range(size)]
        rows_from_Pu = [row[offsets[rank] : offsets[rank + 1]] for row in balance.rows_PU]
        recv = [sum(row) for row in rows_from_Pu]
        rows_per_unit = [sum(column) for column in zip(*rows_from_Pu)]
        # Lent weights: this rank's experts for each borrower (by borrower, then expert), one
        # flat [W] row per copy; a borrower receives its borrowed experts in ascending id.
        lent = balance.lent(e)[rank]
        weight_send = [sum(1 for d, _ in lent if d == p) for p in range(size)]
        weight_recv = [sum(1 for g in balance.borrowed[rank] if g // e == p) for p in range(size)]
        local_weights = experts.weights()
        lent_j = torch.tensor([j for _, j in lent], dtype=torch.long, device=x_TD.device)
        present = [w for w in local_weights if w is not None]
        w_send_nW = torch.cat([w.index_select(0, lent_j).flatten(1) for w in present], dim=1)
        x_SD, w_recv_bW = comm.all_to_all_many(
            [(permute(x_TD, plan), recv, send), (w_send_nW, weight_recv, weight_send)],
            self.group,
            "balanced dispatch",
            self.clock,
        )
        order = None
        if len(rows_per_unit) > 1:  # received source-major; the GEMMs want each unit's rows together
            by_unit_S = source_to_expert_order(rows_from_Pu, x_TD.device)
            order = (by_unit_S, inverse_permutation(by_unit_S))
            x_SD = permute_rows(x_SD, by_unit_S, order[1])
        borrowed = None
        if balance.borrowed[rank]:
            parts = iter(w_recv_bW.split([w[0].numel() for w in present], dim=1))
            num_borrowed = w_recv_bW.shape[0]
            borrowed = tuple(
                # contiguous: a column slice of [b, W] is strided, and grouped_mm takes only
                # contiguous weights (it would raise on this rank alone, with its peers waiting)
                None if w is None else next(parts).reshape(num_borrowed, *w.shape[1:]).contiguous()
                for w in local_weights
            )
        rank_rows_ = RankRows(max_over_mean(balance.rows_before), max_over_mean(balance.rows_after), True)
        record = _BalancedRecord(
            routing.weights, plan, send, recv, order, plan.num_rows - send[rank], rank_rows_
        )
        return [ExpertRows(x_SD, rows_per_unit, borrowed)], record

    def combine(self, y_chunks: Iterable[Tensor], record: _AllToAllRecord | _BalancedRecord) -> Tensor:
        if isinstance(record, _AllToAllRecord):
            return super().combine(y_chunks, record)
        (y_SO,) = list(y_chunks)
        if record.order is not None:
            by_unit_S, by_source_S = record.order
            y_SO = permute_rows(y_SO, by_source_S, by_unit_S)
        y_RO = comm.all_to_all(y_SO, record.send, record.recv, self.group, "balanced combine", self.clock)
        return combine(y_RO, record.weights_TK, record.plan)


@dataclass(frozen=True)
class _BalancedRecord:
    weights_TK: Tensor
    plan: DispatchPlan  # this rank's rows sorted by work unit (destination-major)
    send: list[int]
    recv: list[int]
    order: tuple[Tensor, Tensor] | None  # (by_unit_S, by_source_S), as _Chunk.order
    rows_sent_away: int
    rank_rows: RankRows


def _to_units(physical: Routing, balance: BalancePlan, rank: int) -> Routing:
    """`physical` with each kept slot's expert id replaced by the work unit it runs in.

    This rank's kept rows of expert g, in token order, fill g's units in unit
    order, balance.rows_PU[rank][u] rows each: sorting by unit then groups
    the rows by destination rank, and by unit within one (plan_dispatch).
    Example: g's 5 rows, units 0 (3 rows) and 4 (2): rows 0-2 -> 0, 3-4 -> 4.
    """
    device = physical.expert_ids.device
    rows_U = balance.rows_PU[rank]
    unit_expert = [g for units in balance.units for g in units]
    num_experts = physical.tokens_per_expert.numel()
    units_of = [[] for _ in range(num_experts)]
    for u, g in enumerate(unit_expert):
        if rows_U[u]:
            units_of[g].append(u)
    piece_units = [u for units in units_of for u in units]
    piece_rows = [rows_U[u] for u in piece_units]
    keep_N = physical.keep.reshape(-1)
    ids_N = torch.where(keep_N, physical.expert_ids.reshape(-1), num_experts)
    order_N, _, _, _ = sort_by_id(ids_N, num_experts + 1)  # kept slots first, by expert, in token order
    num_rows = sum(piece_rows)
    unit_R = torch.repeat_interleave(
        torch.tensor(piece_units, dtype=torch.long), torch.tensor(piece_rows, dtype=torch.long)
    ).to(device)
    unit_N = torch.zeros_like(ids_N)
    unit_N[order_N[:num_rows]] = unit_R
    return replace(
        physical,
        expert_ids=unit_N.view_as(physical.expert_ids),
        tokens_per_expert=torch.tensor(rows_U, dtype=torch.long, device=device),
    )


@dataclass(frozen=True)
class FixedCounts:
    """The fixed dispatch's counts: C slots per (source rank, physical expert), the same on every
    rank by construction (an agreed token bound), so nothing is exchanged."""

    capacity: int


class FixedDispatcher:
    """Decode dispatch: C slots per (source rank, physical expert), one equal-split all-to-all each way.

    C is a bound on the tokens of this call that every rank of the group holds
    without asking the others: `tokens_per_rank` (the caller's, the same value
    on every rank), or else this rank's own token count, which must then be
    the same on every rank. A token's K choices are distinct experts, so a
    rank sends at most T <= C rows to one expert: nothing is ever dropped,
    even with every token of every rank on one expert (P * C rows there).
    Each rank sends E' * C rows, its kept assignments in their slots and zero
    rows elsewhere, and receives [P, e, C] rows, which its experts run as
    batched GEMMs over [e, P * C] (Experts.padded); the outputs go back the
    same way and each token gathers its own slots.

    No count all-gather, no all-reduce, no host sync: every size is known on
    the host from C, E' and P. What that costs: E' / K times the rows of the
    per-assignment exchange and a GEMM over every local expert's P * C slots,
    which is why the layer picks it by itself only for small bounds (`for_call`).
    The autograd all-to-all makes it differentiable: outputs and gradients
    equal the other dispatchers' to rounding.

    Without a count exchange no status travels either: bad input on one rank
    raises there, before any exchange, and its peers raise CollectiveError
    when it leaves the group (or at the group's timeout). A dead peer makes
    the all-to-all fail with CollectiveError, as on every path.
    """

    traceable = False
    host_sync_free = True  # so the layer skips the NaN / Inf checks of its input and router logits

    def __init__(
        self,
        layout: ExpertLayout,
        execution: ExecutionConfig,
        group,
        where: str,
        clock: comm.ExchangeClock,
        tokens_per_rank: int | None = None,
    ):
        self.layout, self.execution, self.group = layout, execution, group
        self.where, self.clock, self.tokens_per_rank = where, clock, tokens_per_rank

    def exchange_counts(
        self, x: object, routing: Routing | None, check: InputCheck, device: torch.device
    ) -> FixedCounts:
        """C, from the bound alone; raises this rank's bad input at once (no exchange could carry it)."""
        check.raise_if_bad(self.where)
        # NOTE: tokens of the input, not rows of `routing`: with weights on the experts' input
        # each (token, choice) is a row of its own, and still at most T rows reach one expert.
        num_tokens = x.numel() // x.shape[-1]
        capacity = num_tokens if self.tokens_per_rank is None else self.tokens_per_rank
        if num_tokens > capacity:
            raise ValueError(
                f"{self.where}: {num_tokens} tokens on this rank, over the fixed dispatch's bound of "
                f"{capacity} tokens per rank (tokens_per_rank): every rank must stay within the bound"
            )
        cap = self.execution.max_tokens_per_expert
        if cap is not None and self.layout.size * capacity > cap:
            raise ValueError(
                f"{self.where}: the fixed dispatch gives every expert {self.layout.size} x {capacity} "
                f"slots, over ExecutionConfig.max_tokens_per_expert={cap}: lower the token bound"
            )
        return FixedCounts(capacity)

    def dispatch(
        self, x_TD: Tensor, routing: Routing, counts: FixedCounts, experts=None
    ) -> tuple[list[ExpertRows], _FixedRecord]:
        size, e, capacity = self.layout.size, self.layout.num_local_experts, counts.capacity
        # Expert e' fills slots e' * C ... e' * C + C - 1; experts are numbered rank-major, so
        # destination p's slots are one contiguous block of e * C rows.
        plan = plan_padded(self.layout.physical(routing), capacity)
        x_RD = permute_padded(x_TD, plan).view(size * e * capacity, x_TD.shape[-1])
        splits = [e * capacity] * size
        x_SD = comm.all_to_all(x_RD, splits, splits, self.group, "fixed dispatch", self.clock)
        width = x_TD.shape[-1]
        x_eSD = x_SD.view(size, e, capacity, width).transpose(0, 1).reshape(e, size * capacity, width)
        record = _FixedRecord(routing.weights, plan, splits, (size - 1) * e * capacity)
        return [ExpertRows(x_eSD, None)], record

    def combine(self, y_chunks: Iterable[Tensor], record: _FixedRecord) -> Tensor:
        (y_eSO,) = list(y_chunks)
        size, e, capacity = self.layout.size, self.layout.num_local_experts, record.plan.capacity
        width = y_eSO.shape[-1]
        y_SO = y_eSO.view(e, size, capacity, width).transpose(0, 1).reshape(size * e * capacity, width)
        y_RO = comm.all_to_all(y_SO, record.splits, record.splits, self.group, "fixed combine", self.clock)
        return combine_padded(y_RO.view(size * e, capacity, width), record.weights_TK, record.plan)


@dataclass(frozen=True)
class _FixedRecord:
    weights_TK: Tensor
    plan: PaddedPlan
    splits: list[int]
    rows_sent_away: int  # padded slots: every slot for another rank travels, filled or not
    rank_rows: RankRows = RankRows(float("nan"), float("nan"), False)  # no counts exchanged


# NOTE: E' * C padded rows per rank and exchange. Measured on 2 gloo ranks (benchmarks.decode,
# 8 experts, d_model 256): the fixed step was faster up to 64 rows, even at 128, slower beyond,
# where the padded GEMMs cost more than the count exchange saves. Not measured on NCCL.
AUTO_FIXED_MAX_ROWS = 128


def for_call(dispatcher, tokens_per_rank: int | None, *, training: bool, grad_enabled: bool):
    """The dispatcher of one forward: the layer's own, or the fixed dispatch for a small decode step.

    ExecutionConfig.dispatch "fixed": always the fixed dispatch, with C =
    `tokens_per_rank` if given, else the call's own tokens. Otherwise the
    fixed dispatch is picked when all of these hold, each the same on every
    rank, so that every rank picks alike with no exchange:
    - the caller states `tokens_per_rank`, a bound on every rank's tokens in
      this call (Transformer.decode passes its batch bound for decode steps);
    - the layer is in eval mode and gradients are off (never in training:
      there T is large and the padding would cost E' / K times the rows);
    - the padded exchange is small: E' * tokens_per_rank <= AUTO_FIXED_MAX_ROWS;
    - with ExecutionConfig.max_tokens_per_expert, P * tokens_per_rank is within it.
    """
    if isinstance(dispatcher, LocalDispatcher) or tokens_per_rank is None:
        return dispatcher
    layout, execution = dispatcher.layout, dispatcher.execution
    if not isinstance(dispatcher, FixedDispatcher):
        cap = execution.max_tokens_per_expert
        small = layout.size * layout.num_local_experts * tokens_per_rank <= AUTO_FIXED_MAX_ROWS
        within_cap = cap is None or layout.size * tokens_per_rank <= cap
        if training or grad_enabled or not small or not within_cap:
            return dispatcher
    return FixedDispatcher(
        layout, execution, dispatcher.group, dispatcher.where, dispatcher.clock, tokens_per_rank
    )


def make_dispatcher(
    layout: ExpertLayout, execution: ExecutionConfig, group, where: str, clock: comm.ExchangeClock
):
    """The dispatcher for this layout: local without a group, else by ExecutionConfig.dispatch."""
    if group is None:
        return LocalDispatcher(layout, execution, where)
    if execution.dispatch == "once_per_rank":
        return RankDispatcher(layout, execution, group, where, clock)
    if execution.dispatch == "fixed":
        return FixedDispatcher(layout, execution, group, where, clock)
    if execution.dispatch == "balanced":
        return BalancedDispatcher(layout, execution, group, where, clock)
    return AllToAllDispatcher(layout, execution, group, where, clock)


def check_expert_load(rows_PE: list[list[int]], execution: ExecutionConfig, where: str) -> None:
    """Refuse, on every rank alike, a forward that would send an expert more rows than its cap."""
    cap = execution.max_tokens_per_expert
    if cap is None:
        return
    load_E = [sum(column) for column in zip(*rows_PE)]
    heaviest = max(range(len(load_E)), key=load_E.__getitem__)
    if load_E[heaviest] > cap:
        raise ValueError(
            f"{where}: expert {heaviest} would receive {load_E[heaviest]} rows in one forward, "
            f"over ExecutionConfig.max_tokens_per_expert={cap}; the router sends it too many tokens: "
            f"set a capacity_factor, raise the cap, or rebalance the router"
        )


def chunk_bounds(num_local_experts: int, chunks: int) -> list[tuple[int, int]]:
    """[a, b) local expert ranges of `chunks` near-equal chunks (at most one per expert)."""
    n = min(chunks, num_local_experts)
    return [(c * num_local_experts // n, (c + 1) * num_local_experts // n) for c in range(n)]


def _chunk_major(routing: Routing, bounds: list[tuple[int, int]], size: int) -> Routing:
    """`routing` with expert ids renumbered so that sorting by id groups rows by
    (chunk, destination rank, local expert): each chunk's rows are then one
    contiguous all-to-all input. With one chunk the order is the experts' own.

    Example, 2 ranks of 4 local experts, bounds [(0, 2), (2, 4)]: global
    experts in the order 0 1 4 5 2 3 6 7, so expert 4 gets id 2.
    """
    if len(bounds) == 1:
        return routing
    e = bounds[-1][1]
    order = [p * e + j for a, b in bounds for p in range(size) for j in range(a, b)]
    order_E = torch.tensor(order, device=routing.expert_ids.device)
    position_E = inverse_permutation(order_E)
    return replace(
        routing,
        expert_ids=position_E[routing.expert_ids],
        tokens_per_expert=routing.tokens_per_expert[order_E],
    )


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_CODES = {dtype: code for code, dtype in enumerate(_DTYPES)}


def _check_status(status_P: list[list[int]], where: str) -> None:
    """Raise, on every rank alike, if any rank's input was bad or ranks disagree on dtype or grad mode."""
    bad_ranks = [p for p, (failed, _, _) in enumerate(status_P) if failed]
    if bad_ranks:
        raise ValueError(f"{where}: rank(s) {bad_ranks} of the group got invalid input (see their error)")
    dtypes = {
        p: str(_DTYPES[code]) if code >= 0 else "unsupported" for p, (_, code, _) in enumerate(status_P)
    }
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"{where}: ranks send tokens of different dtypes: {dtypes}")
    grad_modes = {p: bool(mode) for p, (_, _, mode) in enumerate(status_P)}
    if len(set(grad_modes.values())) > 1:
        raise RuntimeError(
            f"{where}: some ranks run with gradients enabled and some without ({grad_modes}); "
            f"every rank of the group must run forward (and backward) alike"
        )
