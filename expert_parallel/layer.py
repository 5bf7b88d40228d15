"""MoELayer: route -> permute -> exchange -> experts -> exchange back -> combine.

Legend: T tokens on this rank, D d_model, O d_out, E experts, e local experts,
P ranks in the group, R rows this rank sends (kept assignments), S rows it
receives for its own experts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import comm
from .config import MoEConfig
from .dispatch import (
    DispatchPlan,
    RankDispatchPlan,
    combine,
    expand_by_expert,
    inverse_permutation,
    permute,
    permute_rows,
    plan_dispatch,
    plan_rank_dispatch,
    source_to_expert_order,
    sum_rows,
    weighted_sum,
)
from .experts import Experts, uniform_
from .placement import Placement
from .router import Routing, route, switch_aux_loss
from .shared import SharedExperts


@dataclass(frozen=True)
class RoutingStats:
    """What the last forward did with this rank's tokens.

    tokens_per_expert: [E] kept assignments per global expert (this rank's tokens).
    num_routed: T * K assignments made;  num_dropped: those over capacity.
    capacity: per-expert capacity used (None when dropless).
    rows_sent_to_other_ranks: rows this rank's forward all-to-all sent away
        (the same number comes back in the second exchange).
    """

    tokens_per_expert: Tensor
    num_routed: int
    num_dropped: int
    capacity: int | None
    rows_sent_to_other_ranks: int


class MoELayer(nn.Module):
    """Mixture-of-Experts feed-forward, experts sharded over `group`.

    forward(x [..., D]) -> [..., O]. Rank r of a group of P holds global
    experts r*E/P ... (r+1)*E/P - 1. With group None (or of size 1) it holds
    all E experts: that single-process layer is the definition of correct.
    After forward: `aux_loss` (coefficients applied, add it to the loss) and
    `stats` (a RoutingStats).

    `forced_expert_ids`: for benchmarks and tests only. Set it to a [T, K]
    long tensor (T = this rank's tokens in the next forward) to override the
    router's choice of experts, e.g. to measure skewed or all-to-one loads;
    None (the default) routes normally. See `route`.

    `placement` (redundant experts, EPLB-style; see placement.balance): rank r
    holds s = (E + R) / P physical experts, the logical experts
    `placement.physical_to_logical[r]`, listed in `local_expert_ids`. Each
    rank splits its kept rows for logical expert g evenly over g's replicas
    (see `_to_physical`); the router, aux losses and `stats` stay logical.
    After backward call `sync_replica_grads()` (parallel.sum_gradients does)
    so that every replica gets its logical expert's whole gradient and the
    replicas stay identical. `apply_placement` changes the layout of a
    trained layer, moving weights (and optimizer state) between ranks.
    None (the default): rank r holds r*E/P ... (r+1)*E/P - 1, no replicas.

    Initialisation depends only on the seed drawn from the default generator
    of group rank 0, not on the layout: after torch.manual_seed(s), a layer
    over P ranks holds exactly its slice of the experts a group=None layer
    would hold, and every rank holds the same router.
    """

    def __init__(
        self,
        config: MoEConfig,
        group=None,
        stats_group=None,
        *,
        name: str | None = None,
        placement: Placement | None = None,
    ):
        super().__init__()
        rank, size = comm.rank_and_size(group)
        self.config = config
        self.group = group if size > 1 else None
        stats_group = group if stats_group is None else stats_group
        self.stats_group = stats_group if comm.rank_and_size(stats_group)[1] > 1 else None
        self.rank, self.group_size = rank, size
        self.where = f"MoELayer{f' {name!r}' if name else ''} on rank {rank} of {size}"
        self._set_placement(placement)
        self.router = nn.Linear(config.d_model, config.num_experts, bias=config.router_bias)
        self.experts = Experts(config, self.num_local_experts)
        self.shared_experts = SharedExperts(config) if config.num_shared_experts else None
        if config.selection_bias:
            self.register_buffer("selection_bias", torch.zeros(config.num_experts))
        else:
            self.selection_bias = None
        # Choices per expert (before drops) in this optimizer step's training forwards, this rank only.
        self.register_buffer(
            "step_choices", torch.zeros(config.num_experts, dtype=torch.long), persistent=False
        )
        seed = int(torch.randint(0, 2**62, ()))
        agreed = config.to_dict()
        if placement is not None:  # every rank must hold the same placement
            agreed["placement"] = placement.physical_to_logical.tolist()
        self.reset_parameters(comm.agree_on_init(agreed, seed, self.group))
        self.aux_loss: Tensor | None = None
        self.forced_expert_ids: Tensor | None = None
        self.stats: RoutingStats | None = None
        self.exchange_clock = comm.ExchangeClock()  # seconds in collectives, forward and backward

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Router from `seed`; logical expert g from `seed + 1 + g` (so replicas start equal);
        shared experts from `seed + 1 + E`."""
        bound = 1.0 / self.config.d_model**0.5
        generator = torch.Generator().manual_seed(seed)
        uniform_(self.router.weight, bound, generator)
        if self.router.bias is not None:
            uniform_(self.router.bias, bound, generator)
        for local_id, logical_id in enumerate(self.local_expert_ids):
            generator.manual_seed(seed + 1 + logical_id)
            self.experts.reset_expert(local_id, generator)
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters(generator.manual_seed(seed + 1 + self.config.num_experts))
        if self.selection_bias is not None:
            self.selection_bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        config = self.config
        problem = _input_problem(x, config, self.router.weight)
        routing = None
        if problem is None:
            x_TD = x.reshape(-1, config.d_model)
            try:
                routing = route(
                    self._router_logits(x_TD),
                    config,
                    self.forced_expert_ids,
                    selection_bias_E=self.selection_bias,
                    training=self.training,
                    sequence_length=x.shape[-2] if x.dim() >= 3 else None,
                )
            except ValueError as err:
                problem = (ValueError, str(err))
            x_TD = _to_autocast_dtype(x_TD)
            if self.group is not None and torch.is_grad_enabled() and not x_TD.requires_grad:
                # NOTE: the dispatch exchange's backward runs only where the rows need a
                # gradient; a rank whose input needs none would skip it while its peers
                # wait in it (a hang). A leaf that does makes every rank run it alike.
                x_TD = x_TD.detach().requires_grad_()
        expert_routing = routing  # over physical experts (replicas) with a placement
        if routing is not None and self.placement is not None:
            expert_routing = _to_physical(
                routing,
                self._logical_to_physical,
                self._replica_count,
                self.group_size * self.num_local_experts,
                self.rank,
            )
        if self.group is None:
            if problem is not None:
                raise problem[0](f"{self.where}: {problem[1]}")
            plan = plan_dispatch(expert_routing)
            self._check_expert_load([plan.rows_per_expert])
            y_RO, rows_away = self.experts(permute(x_TD, plan), plan.rows_per_expert), 0
            out_TO = combine(y_RO, routing.weights, plan)
        elif config.dispatch == "once_per_rank":
            rank_plan = plan_rank_dispatch(expert_routing, self.group_size) if routing is not None else None
            _, rows_PP = self._gather_counts(x, expert_routing, problem, rank_plan)
            out_TO, rows_away = self._run_once_per_rank(x_TD, expert_routing, rank_plan, rows_PP)
        else:
            rows_PE, _ = self._gather_counts(x, expert_routing, problem)
            bounds = _chunk_bounds(self.num_local_experts, config.exchange_chunks)
            plan = plan_dispatch(_chunk_major(expert_routing, bounds, self.group_size))
            y_RO, rows_away = self._run_on_owners(permute(x_TD, plan), plan, rows_PE, bounds)
            out_TO = combine(y_RO, routing.weights, plan)
        if self.shared_experts is not None:
            out_TO = out_TO + self.shared_experts(x_TD)
        self.aux_loss = (
            config.aux_loss_coef * self._balance_loss(routing) + config.z_loss_coef * routing.z_loss
        )
        self.stats = RoutingStats(
            tokens_per_expert=routing.tokens_per_expert.detach(),
            num_routed=routing.keep.numel(),
            num_dropped=int(routing.num_dropped),
            capacity=routing.capacity,
            rows_sent_to_other_ranks=rows_away,
        )
        return out_TO.view(*x.shape[:-1], config.d_out)

    def _router_logits(self, x_TD: Tensor) -> Tensor:
        """[T, E] router logits in float32, also under autocast.

        NOTE: fp32 even under bf16 autocast, so that a bf16 run chooses the same
        experts as an fp32 run (a bf16 logit moves near-ties across each other).
        Jitter (training only): the router sees x * U(1 - eps, 1 + eps).
        """
        eps = self.config.router_jitter
        if self.training and eps > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        bias = self.router.bias.float() if self.router.bias is not None else None
        with torch.autocast(x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.router.weight.float(), bias)

    def _balance_loss(self, routing: Routing) -> Tensor:
        """The aux loss of config.aux_loss_scope; counts this step's choices for the selection bias.

        "global_batch": f_i from the step's choices so far, summed over
        stats_group (one [E] all-reduce per forward); P_i stays local.
        """
        if not self.training:
            return routing.aux_loss
        self.step_choices += routing.choices_per_expert
        if self.config.aux_loss_scope != "global_batch":
            return routing.aux_loss
        choices_E = comm.sum_counts(self.step_choices, self.stats_group, f"{self.where}: global-batch counts")
        return switch_aux_loss(choices_E, routing.mean_probs)

    def _apply(self, fn, recurse=True):
        # NOTE: the selection bias stays float32 through .to(bf16) / .half(): its updates
        # (1e-3 steps) would vanish in bf16, and HF keeps DeepSeek's correction bias in fp32.
        bias = self.selection_bias
        super()._apply(fn, recurse)
        if bias is not None and self.selection_bias.dtype != torch.float32:
            self.selection_bias = bias.to(device=self.selection_bias.device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Call after each optimizer step (every rank of stats_group): ends the step's statistics.

        With config.selection_bias_rate u > 0: bias += u * sign(mean load - load),
        load = the step's choices per expert summed over stats_group, so every
        rank holds the same bias. Then resets the step's counts, which
        "global_batch" aux losses accumulate over micro-batches.
        """
        if self.selection_bias is not None and self.config.selection_bias_rate > 0:
            load_E = comm.sum_counts(
                self.step_choices, self.stats_group, f"{self.where}: selection-bias load"
            )
            load_E = load_E.double()
            step_E = torch.sign(load_E.mean() - load_E) * self.config.selection_bias_rate
            self.selection_bias += step_E.to(self.selection_bias.dtype)
        self.step_choices.zero_()

    def _gather_counts(
        self,
        x: Tensor,
        routing: Routing | None,
        problem: tuple[type, str] | None,
        rank_plan: RankDispatchPlan | None = None,
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Every rank's kept assignments per (physical) expert [P][E], and rows per destination rank
        [P][P] under once-per-rank dispatch ([P][0] otherwise); fails on every rank at once if any
        rank's input is bad."""
        size, num_experts = self.group_size, self.group_size * self.num_local_experts
        once = self.config.dispatch == "once_per_rank"
        device = self.router.weight.device
        if routing is None:
            counts = torch.zeros(num_experts + (size if once else 0), dtype=torch.long, device=device)
        else:
            counts = routing.tokens_per_expert
            if once:
                counts = torch.cat([counts, torch.tensor(rank_plan.rows_per_rank, device=device)])
        dtype_code = _DTYPE_CODES.get(x.dtype, -1) if isinstance(x, Tensor) else -1
        # Ranks building a graph and ranks not would disagree on the backward's exchanges: a hang.
        status = [int(problem is not None), dtype_code, int(torch.is_grad_enabled())]
        counts_PX, status_P = comm.gather_counts(counts, status, self.group, self.exchange_clock)
        rows_PE = [row[:num_experts] for row in counts_PX]
        rows_PP = [row[num_experts:] for row in counts_PX]
        if problem is not None:
            raise problem[0](f"{self.where}: {problem[1]}")
        bad_ranks = [p for p, (failed, _, _) in enumerate(status_P) if failed]
        if bad_ranks:
            raise ValueError(
                f"{self.where}: rank(s) {bad_ranks} of the group got invalid input (see their error)"
            )
        dtypes = {
            p: str(_DTYPES[code]) if code >= 0 else "unsupported" for p, (_, code, _) in enumerate(status_P)
        }
        if len(set(dtypes.values())) > 1:
            raise TypeError(f"{self.where}: ranks send tokens of different dtypes: {dtypes}")
        grad_modes = {p: bool(mode) for p, (_, _, mode) in enumerate(status_P)}
        if len(set(grad_modes.values())) > 1:
            raise RuntimeError(
                f"{self.where}: some ranks run with gradients enabled and some without ({grad_modes}); "
                f"every rank of the group must run forward (and backward) alike"
            )
        self._check_expert_load(rows_PE)
        return rows_PE, rows_PP

    def _check_expert_load(self, rows_PE: list[list[int]]) -> None:
        """Refuse, on every rank alike, a forward that would send an expert more rows than its cap."""
        cap = self.config.max_tokens_per_expert
        if cap is None:
            return
        load_E = [sum(column) for column in zip(*rows_PE)]
        heaviest = max(range(len(load_E)), key=load_E.__getitem__)
        if load_E[heaviest] > cap:
            raise ValueError(
                f"{self.where}: expert {heaviest} would receive {load_E[heaviest]} rows in one forward, "
                f"over MoEConfig.max_tokens_per_expert={cap}; the router sends it too many tokens: "
                f"set a capacity_factor, raise the cap, or rebalance the router"
            )

    def _run_on_owners(
        self, x_RD: Tensor, plan: DispatchPlan, rows_PE: list[list[int]], bounds: list[tuple[int, int]]
    ) -> tuple[Tensor, int]:
        """Send rows to the ranks owning their experts, run them there, bring the outputs back.

        In chunks of local experts `bounds` ([a, b) each; x_RD's rows grouped
        chunk-major, see _chunk_major): every chunk's dispatch starts at once,
        then chunk c's experts run as soon as its rows have arrived and its
        outputs start back while chunk c + 1's experts run.
        """
        size, first, tag = self.group_size, self.first_expert, self.exchange_clock
        rows_per_block = iter(plan.rows_per_expert)  # (chunk, destination rank, local expert)
        chunks = []
        for a, b in bounds:
            send = [sum(next(rows_per_block) for _ in range(b - a)) for _ in range(size)]
            rows_from_Pj = [row[first + a : first + b] for row in rows_PE]
            chunks.append((a, b, send, rows_from_Pj, [sum(row) for row in rows_from_Pj]))
        x_parts = x_RD.split([sum(send) for _, _, send, _, _ in chunks])
        arriving = [
            comm.start_all_to_all(x_cD, recv, send, self.group, "dispatch", tag)
            for x_cD, (_, _, send, _, recv) in zip(x_parts, chunks)
        ]
        returning = []
        for (a, b, send, rows_from_Pj, recv), started in zip(chunks, arriving):
            y_SO = self._run_chunk(comm.finish_all_to_all(*started), rows_from_Pj, a, b)
            returning.append(comm.start_all_to_all(y_SO, send, recv, self.group, "combine", tag))
        y_parts = [comm.finish_all_to_all(*started) for started in returning]
        y_RO = y_parts[0] if len(y_parts) == 1 else torch.cat(y_parts)
        rows_to_self = sum(send[self.rank] for _, _, send, _, _ in chunks)
        return y_RO, plan.num_rows - rows_to_self

    def _run_chunk(self, x_SD: Tensor, rows_from_Pj: list[list[int]], a: int, b: int) -> Tensor:
        """Local experts a..b-1 over the rows received for them, in the order they came (source-major)."""
        e = self.num_local_experts
        rows_per_local_expert = [0] * a + [sum(column) for column in zip(*rows_from_Pj)] + [0] * (e - b)
        if b - a == 1:
            return self.experts(x_SD, rows_per_local_expert)
        by_expert_S = source_to_expert_order(rows_from_Pj, x_SD.device)
        by_source_S = inverse_permutation(by_expert_S)
        y_SO = self.experts(permute_rows(x_SD, by_expert_S, by_source_S), rows_per_local_expert)
        return permute_rows(y_SO, by_source_S, by_expert_S)

    def _run_once_per_rank(
        self, x_TD: Tensor, routing: Routing, plan: RankDispatchPlan, rows_PP: list[list[int]]
    ) -> tuple[Tensor, int]:
        """Each token once to each rank holding one of its experts; its weighted outputs summed there.

        Three exchanges out (rows, their weights, their local expert ids) and one back.
        The weights travel so that the expert's rank can sum a token's outputs
        into one row; their gradient comes back through the same exchange.
        """
        tag = self.exchange_clock
        send_splits = plan.rows_per_rank
        recv_splits = [row[self.rank] for row in rows_PP]
        x_RD = x_TD.index_select(0, plan.token_R)
        weights_RK = routing.weights.index_select(0, plan.token_R) * plan.choice_RK
        x_SD = comm.all_to_all(x_RD, recv_splits, send_splits, self.group, "dispatch", tag)
        weights_SK = comm.all_to_all(weights_RK, recv_splits, send_splits, self.group, "weights", tag)
        experts_SK = comm.all_to_all(plan.local_expert_RK, recv_splits, send_splits, self.group, "ids", tag)
        row_A, slot_SK, rows_per_local_expert = expand_by_expert(experts_SK, self.num_local_experts)
        y_AO = self.experts(x_SD.index_select(0, row_A), rows_per_local_expert)
        z_SO = weighted_sum(y_AO, weights_SK, slot_SK)
        z_RO = comm.all_to_all(z_SO, send_splits, recv_splits, self.group, "combine", tag)
        return sum_rows(z_RO, plan.row_TK), plan.num_rows - send_splits[self.rank]

    def _set_placement(self, placement: Placement | None) -> None:
        """Check `placement` against the config and group; set the local layout it gives this rank."""
        num_experts, size = self.config.num_experts, self.group_size
        if placement is None:
            if num_experts % size:
                raise ValueError(
                    f"MoEConfig.num_experts={num_experts} is not divisible by the group size {size}"
                )
            self.num_local_experts = num_experts // size
            self.first_expert = self.rank * self.num_local_experts
            self.local_expert_ids = list(range(self.first_expert, self.first_expert + self.num_local_experts))
            self.placement = None
            return
        physical_PS = placement.physical_to_logical
        if (
            physical_PS.dim() != 2
            or physical_PS.shape[0] != size
            or placement.replica_count.numel() != num_experts
        ):
            raise ValueError(
                f"{self.where}: placement for {physical_PS.shape[0]} ranks and "
                f"{placement.replica_count.numel()} experts, but the group has {size} ranks and "
                f"MoEConfig.num_experts={num_experts}"
            )
        if sorted(set(physical_PS.flatten().tolist())) != list(range(num_experts)):
            raise ValueError(f"{self.where}: placement does not hold every logical expert at least once")
        self.placement = placement
        self.num_local_experts = physical_PS.shape[1]
        self.first_expert = self.rank * self.num_local_experts  # first local physical id
        self.local_expert_ids = physical_PS[self.rank].tolist()
        device = self.router.weight.device if hasattr(self, "router") else None
        self.register_buffer(
            "_logical_to_physical", placement.logical_to_physical.to(device), persistent=False
        )
        self.register_buffer("_replica_count", placement.replica_count.to(device), persistent=False)

    @torch.no_grad()
    def sync_replica_grads(self) -> None:
        """Give every replica of a logical expert the sum of all its replicas' gradients (over the group).

        Call after backward, on every rank of the group, before the optimizer
        step (parallel.sum_gradients does). Each replica then holds the gradient
        the no-replica layer's logical expert gets, so replicas stay identical.
        NOTE: one all-reduce of [E, ...] per expert tensor, all E logical experts:
        simple, not minimal traffic. No-op without a placement.
        """
        if self.placement is None:
            return
        params = list(self.experts.parameters())
        ids = torch.tensor(self.local_expert_ids, device=params[0].device)
        full = []
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            full.append(param.grad.new_zeros((self.config.num_experts, *param.shape[1:])))
            full[-1].index_add_(0, ids, param.grad)
        comm.sum_tensors(full, self.group, f"{self.where}: replica gradients")
        for param, total in zip(params, full):
            param.grad.copy_(total.index_select(0, ids))

    @torch.no_grad()
    def apply_placement(
        self, placement: Placement | None, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Lay the experts out as `placement` says (None: contiguous, no replicas), keeping their weights.

        Every rank of the group calls it with the same placement (checked).
        Weights move between ranks by an all-gather of the local experts over
        the group (each rank receives every physical expert: simple, not minimal
        traffic); with `optimizer`, its per-expert state (AdamW exp_avg,
        exp_avg_sq) moves the same way. Gradients are dropped (set to None).
        The parameters stay the same objects, so an optimizer keeps tracking them.
        """
        comm.agree_on_init(
            {"placement": None if placement is None else placement.physical_to_logical.tolist()},
            0,
            self.group,
        )
        old_ids = (
            torch.arange(self.config.num_experts)
            if self.placement is None
            else self.placement.physical_to_logical.flatten()
        )
        if self.placement is not None:
            del self._logical_to_physical, self._replica_count
        self._set_placement(placement)
        new_ids = torch.tensor(self.local_expert_ids)

        def moved(tensor_sX: Tensor) -> Tensor:
            gathered = comm.all_gather_rows(tensor_sX.contiguous(), self.group, f"{self.where}: placement")
            full = gathered.new_empty((self.config.num_experts, *tensor_sX.shape[1:]))
            full[old_ids.to(full.device)] = gathered  # replicas are identical: any copy will do
            return full[new_ids.to(full.device)].clone()

        for param in self.experts.parameters():
            old_shape = param.shape
            param.data = moved(param.data)
            param.grad = None
            state = optimizer.state.get(param, {}) if optimizer is not None else {}
            for slot, value in state.items():
                if isinstance(value, Tensor) and value.shape == old_shape:
                    state[slot] = moved(value)
        self.experts.num_local_experts = self.num_local_experts

    def extra_repr(self) -> str:
        if self.placement is not None:
            return (
                f"logical experts {self.local_expert_ids} of {self.config.num_experts} "
                f"on rank {self.rank} of {self.group_size}"
            )
        return (
            f"experts {self.first_expert}..{self.first_expert + self.num_local_experts - 1} "
            f"of {self.config.num_experts} on rank {self.rank} of {self.group_size}"
        )


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_CODES = {dtype: code for code, dtype in enumerate(_DTYPES)}


def _to_physical(
    routing: Routing, logical_to_physical_EX: Tensor, replica_count_E: Tensor, num_physical: int, rotate: int
) -> Routing:
    """`routing` with each kept assignment's logical expert replaced by one of its physical replicas.

    This rank's kept rows for logical expert g, in token order (slot t * K + k),
    are c rows; g has n replicas; row j goes to replica (floor(j * n / c) + rotate) % n
    (of logical_to_physical[g], ascending physical ids). `rotate` (the rank)
    spreads experts with few rows per rank (c < n) over all their replicas.
    Example: c = 5, n = 2, rotate = 1: rows 0-2 -> replica 1, rows 3-4 -> replica 0.
    Dropped slots keep their id (unused). tokens_per_expert becomes [P * s] per physical expert.
    """
    num_experts = replica_count_E.numel()
    keep_N = routing.keep.reshape(-1)
    logical_N = torch.where(keep_N, routing.expert_ids.reshape(-1), num_experts)
    # NOTE: stable, so each expert's rows keep token order.
    order_N = logical_N.argsort(stable=True)
    sorted_N = logical_N[order_N]
    counts_E1 = torch.bincount(logical_N, minlength=num_experts + 1)
    starts_E1 = counts_E1.cumsum(0) - counts_E1
    j_N = torch.arange(sorted_N.numel(), device=sorted_N.device) - starts_E1[sorted_N]
    count_E1 = F.pad(replica_count_E, (0, 1), value=1)
    n_N, c_N = count_E1[sorted_N], counts_E1[sorted_N].clamp_min(1)
    replica_N = (j_N * n_N // c_N + rotate) % n_N
    physical_EX = F.pad(logical_to_physical_EX, (0, 0, 0, 1), value=0)
    physical_N = torch.empty_like(logical_N)
    physical_N[order_N] = physical_EX[sorted_N, replica_N]
    physical_N = torch.where(keep_N, physical_N, routing.expert_ids.reshape(-1))
    tokens_per_physical = torch.zeros(num_physical, dtype=torch.long, device=keep_N.device)
    tokens_per_physical.scatter_add_(0, physical_N, keep_N.long())
    return replace(
        routing, expert_ids=physical_N.view_as(routing.expert_ids), tokens_per_expert=tokens_per_physical
    )


def _chunk_bounds(num_local_experts: int, chunks: int) -> list[tuple[int, int]]:
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
    device = routing.expert_ids.device
    order_E = torch.tensor(order, device=device)
    position_E = inverse_permutation(order_E)
    return replace(
        routing,
        expert_ids=position_E[routing.expert_ids],
        tokens_per_expert=routing.tokens_per_expert[order_E],
    )


def _input_problem(x: object, config: MoEConfig, weight: Tensor) -> tuple[type, str] | None:
    """(exception class, message) for an input the layer cannot take, else None."""
    if not isinstance(x, Tensor):
        return TypeError, f"expects a torch.Tensor, got {type(x).__name__}"
    if not x.is_floating_point():
        return TypeError, f"expects a floating-point input, got {x.dtype}"
    if x.dim() == 0 or x.shape[-1] != config.d_model:
        return ValueError, f"expects input [..., d_model={config.d_model}], got {tuple(x.shape)}"
    if x.device != weight.device:
        return ValueError, f"input is on {x.device} but the layer's parameters are on {weight.device}"
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return TypeError, f"input dtype {x.dtype} differs from the layer's parameters ({weight.dtype})"
    # NOTE: host sync. A NaN in a feature the router ignores would still poison the expert outputs.
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x.reshape(-1, x.shape[-1]))).any(dim=-1).sum())
        return ValueError, f"input contains NaN or Inf ({bad} tokens)"
    return None


def _to_autocast_dtype(x_TD: Tensor) -> Tensor:
    """Under autocast, the tokens travel and meet the experts in the autocast dtype (e.g. bf16)."""
    if torch.is_autocast_enabled(x_TD.device.type):
        return x_TD.to(torch.get_autocast_dtype(x_TD.device.type))
    return x_TD
