"""MoELayer: route -> plan -> dispatch -> experts -> combine -> stats, results returned.

`forward` is the whole path, in numbered steps. What it builds on lives
beside it: the call's plan (plan.py: capacity, dispatcher, checks), the input
check (checks.py), the activation-checkpointing memo (recompute.py), the
torch.compile islands (eager.py), the dispatchers (dispatchers.py) and where
the experts live (migration.py).

Legend: T tokens on this rank, D d_model, O d_out, E experts, e local experts,
P ranks in the group, K choices per token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import comm, migration
from .checks import InputCheck
from .config import ExecutionConfig, MoEConfig
from .dispatchers import ExpertLayout, make_dispatcher
from .eager import outside_graph
from .experts import Experts, NormalInit, normal_, uniform_
from .permutation import scaled_assignments, sum_choices
from .placement import Placement
from .plan import CallPlan, Inference, plan_call
from .recompute import Decision, Decisions
from .router import Routing, route, selection_bias_step, switch_aux_loss
from .shared import SharedExperts

__all__ = ["Inference", "MoELayer", "MoEOutput", "RoutingStats", "stack_routes"]


class RoutingStats(NamedTuple):
    """What one forward did with this rank's tokens (tensors stay on the device: no host sync).

    tokens_per_expert: [E] long, kept assignments per (logical) expert.
    choices_per_expert: [E] long, assignments per expert before capacity
        drops: sum them over a step's micro-batches for `choices_before_E`
        (global-batch aux loss) and `after_optimizer_step` (selection bias).
    num_routed: T * K assignments made.   num_dropped: 0-d long, those over capacity.
    capacity: per-expert capacity used (None when dropless).
    rows_sent_to_other_ranks: 0-d long, rows this rank's forward all-to-all
        sent away (the same number comes back in the second exchange).
    expert_ids: [T, K] long, each token's logical expert ids as chosen (or
        replayed), best first, before capacity drops; logical under a
        placement with replicas too. The record of router record and replay:
        pass them back as `forward(..., routes=)` (docs/post-training.md).
    rank_rows_before: 0-d float, the busiest rank's expert rows over the mean
        rows per rank of the group, for the whole group's call, as each
        expert's owner would run them (the standard dispatch); 1 without a
        group, NaN under the fixed dispatch (no counts are exchanged).
    rank_rows_after: 0-d float, the same for the rows as they ran: under
        dispatch "balanced", at most ceil(M / P) / (M / P) for M rows in all.
    balanced: 0-d bool, whether the balanced dispatch moved rows (False where
        it fell back to the standard dispatch, and under every other dispatch).
    """

    tokens_per_expert: Tensor
    choices_per_expert: Tensor
    num_routed: int
    num_dropped: Tensor
    capacity: int | None
    rows_sent_to_other_ranks: Tensor
    expert_ids: Tensor
    rank_rows_before: Tensor
    rank_rows_after: Tensor
    balanced: Tensor


class Traffic(NamedTuple):
    """What one dispatch moved: rows sent to other ranks (0-d long), RankRows as 0-d tensors."""

    rows_sent_away: Tensor
    rank_rows_before: Tensor
    rank_rows_after: Tensor
    balanced: Tensor

    @staticmethod
    def of(record, device: torch.device) -> Traffic:
        before, after, balanced = record.rank_rows
        return Traffic(
            torch.tensor(record.rows_sent_away, device=device),
            torch.tensor(before, dtype=torch.float32, device=device),
            torch.tensor(after, dtype=torch.float32, device=device),
            torch.tensor(balanced, device=device),
        )


class MoEOutput(NamedTuple):
    """out: [..., O].  aux_loss: scalar, coefficients applied (add it to the loss).  stats: RoutingStats."""

    out: Tensor
    aux_loss: Tensor
    stats: RoutingStats


def stack_routes(outputs: list[MoEOutput], batch: int) -> Tensor:
    """[B, S, L, K] long: the expert ids of a model's L MoE layers (their MoEOutputs, in order)
    over B sequences of S tokens, each layer's `stats.expert_ids` [B * S, K] as [B, S, K]; the
    `routes` a model's forward replays."""
    ids = [moe.stats.expert_ids.view(batch, -1, moe.stats.expert_ids.shape[-1]) for moe in outputs]
    return torch.stack(ids, dim=2)


def layer_routes(routes_BSLK: Tensor | None, shape: tuple[int, ...], layers: int, where: str) -> list:
    """[B, S, L, K] routes -> L of [B * S, K], one per MoE layer (None: L Nones); a ValueError unless
    they are [B, S, layers, K] for tokens of `shape` [B, S]."""
    if routes_BSLK is None:
        return [None] * layers
    expected = (*shape, layers)
    if not isinstance(routes_BSLK, Tensor) or routes_BSLK.dim() != 4 or routes_BSLK.shape[:3] != expected:
        got = tuple(routes_BSLK.shape) if isinstance(routes_BSLK, Tensor) else type(routes_BSLK).__name__
        raise ValueError(
            f"{where}: routes must be [B, S, L_moe={layers}, K] for tokens {tuple(shape)}, got {got}"
        )
    return [routes_BSLK[:, :, i].reshape(-1, routes_BSLK.shape[-1]) for i in range(layers)]


class MoELayer(nn.Module):
    """Mixture-of-Experts feed-forward, experts sharded over `group`.

    forward(x [..., D], choices_before_E=None, *, inference=None, routes=None) -> MoEOutput(out [..., O],
    aux_loss, stats). Rank r of a group of P holds global experts r*E/P ...
    (r+1)*E/P - 1. With group None (or of size 1) it holds all E experts: that
    single-process layer is the definition of correct. Nothing is written to
    the layer during forward: results are returned, and the caller owns the
    step's accounting (sum `stats.choices_per_expert` over micro-batches).

    `execution`: how it runs (dispatch, chunks, caps, GEMM); the same on every rank.
    `stats_group`: the ranks whose loads the global-batch aux loss and the
    selection bias sum (default: `group`).

    `routes` (forward's keyword): [T, K] integer logical expert ids to replay,
    e.g. a rollout's `stats.expert_ids`: the tokens go to exactly those
    experts, weighted by the router's own scores of them from the live logits
    (so the router still learns); a row of -1 routes natively. Capacity still
    applies after the replay. Bad routes are a ValueError naming the layer
    (under a group raised after the count exchange, so no peer hangs). See
    router.route and docs/post-training.md.

    `forced_expert_ids`: for benchmarks and tests only. Set it to a [T, K]
    long tensor (T = this rank's tokens in the next forward) to override the
    router's choice of experts, e.g. to measure skewed or all-to-one loads;
    None (the default) routes normally. See `route`.

    `placement` (redundant experts, EPLB-style; see placement.balance): rank r
    holds s = (E + R) / P physical experts, the logical experts
    `placement.physical_to_logical[r]`, listed in `local_expert_ids`; the
    dispatcher splits each rank's rows for a logical expert over its replicas
    (placement.to_physical). After backward call `sync_replica_grads()`
    (parallel.sum_gradients does) so that every replica gets its logical
    expert's whole gradient and the replicas stay identical. `apply_placement`
    changes the layout of a trained layer, moving weights (and optimizer
    state) between ranks. None (the default): no replicas.

    Activation checkpointing: a recompute of a training forward reuses that
    forward's choice of experts, its drops and its count exchanges (it sends
    the token rows again); see recompute.py.

    Initialisation depends only on the seed drawn from the default generator
    of group rank 0, not on the layout: after torch.manual_seed(s), a layer
    over P ranks holds exactly its slice of the experts a group=None layer
    would hold, and every rank holds the same router. `init_seed` replaces that
    draw (the model derives one per layer); it is kept as `init_seed`, so that
    a layer built on the meta device is initialised after `to_empty` by
    `reset_parameters()`.
    """

    def __init__(
        self,
        config: MoEConfig,
        group=None,
        stats_group=None,
        *,
        execution: ExecutionConfig | None = None,
        name: str | None = None,
        placement: Placement | None = None,
        init_seed: int | None = None,
    ):
        super().__init__()
        rank, size = comm.rank_and_size(group)
        self.config = config
        self.execution = execution or ExecutionConfig()
        self.group = group if size > 1 else None
        stats_group = group if stats_group is None else stats_group
        self.stats_group = stats_group if comm.rank_and_size(stats_group)[1] > 1 else None
        self.rank, self.group_size = rank, size
        self.where = f"MoELayer{f' {name!r}' if name else ''} on rank {rank} of {size}"
        self.exchange_clock = comm.ExchangeClock()  # seconds in collectives, forward and backward
        self._set_placement(placement)
        self.router = nn.Linear(config.d_model, config.num_experts, bias=config.router_bias)
        self.experts = Experts(config, self.num_local_experts, gemm=self.execution.gemm)
        self.shared_experts = SharedExperts(config) if config.num_shared_experts else None
        if config.selection_bias:
            self.register_buffer("selection_bias", torch.zeros(config.num_experts))
        else:
            self.selection_bias = None
        if init_seed is None:  # NOTE: on the CPU generator, also when built under torch.device("meta")
            init_seed = int(torch.randint(0, 2**62, (), device="cpu"))
        agreed = {**config.to_dict(), "execution": self.execution.to_dict()}
        if placement is not None:  # every rank must hold the same placement
            agreed["placement"] = placement.physical_to_logical.tolist()
        self.init_seed = comm.agree_on_init(agreed, init_seed, self.group)
        self.reset_parameters()
        self.forced_expert_ids: Tensor | None = None
        # Training forwards' decisions by key, alive while their autograd graph is (recompute.py).
        self._decisions = Decisions(self.where)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None, *, init: NormalInit | None = None) -> None:
        """Router from `seed` (default: `init_seed`); logical expert g from `seed + 1 + g` (so
        replicas start equal); shared experts from `seed + 1 + E`. Each tensor from nn.Linear's
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)), or with `init` from its normal distributions (the
        byte-level model passes GPT-2's: model.Transformer).

        On the meta device it writes nothing; on sharded (FSDP) parameters only
        this rank's part (materialize.write_held).
        """
        seed = self.init_seed if seed is None else seed
        if self.router.weight.is_meta:
            return
        bound = 1.0 / self.config.d_model**0.5
        generator = torch.Generator().manual_seed(seed)
        for param in (self.router.weight, self.router.bias):
            if param is None:
                continue
            if init is None:
                uniform_(param, bound, generator)
            else:
                normal_(param, init.router_std if param.dim() == 2 else 0.0, generator)
        for local_id, logical_id in enumerate(self.local_expert_ids):
            generator.manual_seed(seed + 1 + logical_id)
            self.experts.reset_expert(local_id, generator, init)
        if self.shared_experts is not None:
            generator.manual_seed(seed + 1 + self.config.num_experts)
            self.shared_experts.reset_parameters(generator, init)
        if self.selection_bias is not None:
            self.selection_bias.zero_()

    def forward(
        self,
        x: Tensor,
        choices_before_E: Tensor | None = None,
        *,
        inference: Inference | None = None,
        routes: Tensor | None = None,
    ) -> MoEOutput:
        """x [..., D] -> MoEOutput. choices_before_E [E]: this rank's choices in the step's earlier
        micro-batches, for aux_loss_scope "global_batch" (None: this is the first).
        inference: an inference caller's capacity factor and token bound (Inference).
        routes: [T, K] integer logical expert ids to replay, T = x's tokens (-1 rows: natively)."""
        grad = torch.is_grad_enabled()
        plan = plan_call(self.config, self.dispatcher, inference, training=self.training, grad_enabled=grad)
        # NOTE: a bad input is not raised here: under a group this rank must still join step 2's
        # count exchange, so that its peers fail with it instead of hanging (checks.py).
        check = InputCheck.of(x, self.config.d_model, self.router.weight, plan.check_finite)
        key = self._decisions.key(self.training)
        decision = self._decisions.recall(key)  # the forward's, when this call is its recompute
        # 1. route: each token's K experts and weights (a recompute reuses the forward's choice)
        x_TD, routing, check = self._route(x, check, plan, decision, routes)
        # 2. plan the exchange  3. dispatch  4. experts  5. combine: one eager island under compile
        out_TO, traffic, counts = plan.island(self._dispatch_experts_combine, check.ok)(
            plan.dispatcher, x, x_TD, routing, check, decision and decision.counts
        )
        if self.shared_experts is not None:
            out_TO = out_TO + self.shared_experts(x_TD)
        # 6. stats: the global-batch counts over stats_group (their own island), aux loss, RoutingStats
        batch_choices_E = self._step_choices(routing, choices_before_E, decision)
        if decision is None and batch_choices_E is not None and self.stats_group is not None:
            where = f"{self.where}: global-batch counts"
            batch_choices_E = outside_graph(comm.sum_counts)(batch_choices_E, self.stats_group, where)
        if key is not None and decision is None and grad:
            decision = Decision(routing.expert_ids, routing.keep, counts, batch_choices_E)
            out_TO = self._decisions.remember(key, decision, out_TO)
        stats = RoutingStats(
            routing.tokens_per_expert.detach(),
            routing.choices_per_expert,
            routing.keep.numel(),
            routing.num_dropped,
            routing.capacity,
            traffic.rows_sent_away,
            routing.expert_ids,
            traffic.rank_rows_before,
            traffic.rank_rows_after,
            traffic.balanced,
        )
        return MoEOutput(
            out_TO.view(*x.shape[:-1], self.config.d_out), self._aux_loss(routing, batch_choices_E), stats
        )

    def _dispatch_experts_combine(
        self, dispatcher, x: object, x_TD: Tensor, routing: Routing, check: InputCheck, counts
    ) -> tuple[Tensor, Traffic, object]:
        """Steps 2-5 of forward: (out [T, O], what travelled (Traffic), the count exchange's result).

        `counts`: the forward's, on a recompute (no exchange then). With weights
        on the experts' input, each (token, choice) travels as a token of its own.
        """
        scaled = self.config.scale_expert_input and routing is not None
        if scaled:
            x_TD, routing = scaled_assignments(x_TD, routing)  # T * K rows from here to the combine
        # 2. plan the exchange: every rank's rows per expert (a host sync); a bad input raises here
        if counts is None:
            counts = dispatcher.exchange_counts(x, routing, check, self.router.weight.device)
        if self.group is not None and torch.is_grad_enabled() and not x_TD.requires_grad:
            # NOTE: the dispatch exchange's backward runs only where the rows need a
            # gradient; a rank whose input needs none would skip it while its peers
            # wait in it (a hang). A leaf that does makes every rank run it alike.
            x_TD = x_TD.detach().requires_grad_()
        # 3. dispatch: the rows to the ranks holding their experts
        chunks, record = dispatcher.dispatch(x_TD, routing, counts, self.experts)
        # 4. experts (with the balanced dispatch, also the ones this rank borrows). NOTE: lazy where the
        # chunks arrive one by one (the combine overlaps them); a list otherwise, since torch.compile
        # breaks a generator's graph once more per break in it.
        y_chunks = (self.experts(chunk.x, chunk.rows_per_expert, chunk.borrowed) for chunk in chunks)
        if isinstance(chunks, list):
            y_chunks = list(y_chunks)
        # 5. combine: the outputs back, weighted and summed per token
        out_TO = dispatcher.combine(y_chunks, record)
        if scaled:
            out_TO = sum_choices(out_TO, self.config.top_k)
        return out_TO, Traffic.of(record, out_TO.device), counts

    def _route(
        self,
        x: Tensor,
        check: InputCheck,
        plan: CallPlan,
        decision: Decision | None,
        routes_TK: Tensor | None = None,
    ):
        """(x_TD, routing, check): step 1; (None, None, check) for an input the layer cannot take,
        whose check now says why (also a ValueError of `route`'s own checks, bad routes included).
        A recompute's decision holds the forward's (replayed) ids, and wins over `routes_TK`."""
        if not check.ok:
            return None, None, check
        x_TD = x.reshape(-1, self.config.d_model)
        try:
            routing = route(
                self._router_logits(x_TD),
                plan.routing,
                self.forced_expert_ids,
                selection_bias_E=self.selection_bias,
                training=self.training,
                check_finite=plan.check_finite,
                sequence_length=x.shape[-2] if x.dim() >= 3 else None,
                decided=None if decision is None else (decision.expert_ids_TK, decision.keep_TK),
                routes_TK=routes_TK,
            )
        except ValueError as err:
            return None, None, InputCheck(ValueError, str(err))
        return _to_autocast_dtype(x_TD), routing, check

    def _step_choices(
        self, routing: Routing, choices_before_E: Tensor | None, decision: Decision | None
    ) -> Tensor | None:
        """ "global_batch" in training: this rank's choices in the step so far, this micro-batch's
        included (the forward then sums them over stats_group, one [E] all-reduce); the forward's
        sum on a recompute; None for the other scopes."""
        if not self.training or self.config.aux_loss_scope != "global_batch":
            return None
        if decision is not None:
            return decision.batch_choices_E
        if choices_before_E is None:
            return routing.choices_per_expert
        return routing.choices_per_expert + choices_before_E.to(routing.choices_per_expert.device)

    def _aux_loss(self, routing: Routing, batch_choices_E: Tensor | None) -> Tensor:
        """aux_loss_coef * balance + z_loss_coef * z loss; "global_batch" counts f_i in batch_choices_E."""
        balance = routing.aux_loss
        if batch_choices_E is not None:
            balance = switch_aux_loss(batch_choices_E, routing.mean_probs)
        return self.config.aux_loss_coef * balance + self.config.z_loss_coef * routing.z_loss

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

    def _apply(self, fn, recurse=True):
        # NOTE: the selection bias stays float32 through .to(bf16) / .half(): its updates
        # (1e-3 steps) would vanish in bf16, and HF keeps DeepSeek's correction bias in fp32.
        bias = self.selection_bias
        super()._apply(fn, recurse)
        if bias is not None and self.selection_bias.dtype != torch.float32:
            self.selection_bias = bias.to(device=self.selection_bias.device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def after_optimizer_step(self, choices_E: Tensor | None = None) -> None:
        """Call after each optimizer step, on every rank of stats_group, with this rank's choices
        per expert summed over the step's training forwards (RoutingStats.choices_per_expert).

        With config.selection_bias_rate u > 0: bias += u * sign(mean load - load),
        load = choices_E summed over stats_group, so every rank holds the same
        bias (router.selection_bias_step). Without a selection bias (or at rate 0)
        it does nothing.
        """
        if self.selection_bias is None or self.config.selection_bias_rate == 0:
            return
        if choices_E is None:
            raise ValueError(
                f"{self.where}: after_optimizer_step needs the step's choices per expert "
                f"(the sum of RoutingStats.choices_per_expert over its micro-batches) to update the "
                f"selection bias"
            )
        load_E = comm.sum_counts(choices_E, self.stats_group, f"{self.where}: selection-bias load").double()
        step_E = selection_bias_step(load_E, self.config.selection_bias_rate)
        self.selection_bias += step_E.to(self.selection_bias.dtype)

    def _set_placement(self, placement: Placement | None) -> None:
        """Check `placement` against the config and group; set the local layout and its dispatcher."""
        self.num_local_experts, self.first_expert, self.local_expert_ids = migration.local_experts(
            self.config.num_experts, self.rank, self.group_size, placement, self.where
        )
        self.placement = placement
        layout = ExpertLayout(self.rank, self.group_size, self.num_local_experts, placement)
        self.dispatcher = make_dispatcher(layout, self.execution, self.group, self.where, self.exchange_clock)

    def sync_replica_grads(self) -> None:
        """Give every replica of a logical expert the sum of all its replicas' gradients (over the group).

        Call after backward, on every rank of the group, before the optimizer
        step (parallel.sum_gradients does). Each replica then holds the gradient
        the no-replica layer's logical expert gets, so replicas stay identical.
        No-op without a placement (migration.sync_replica_grads).
        """
        migration.sync_replica_grads(self)

    def apply_placement(
        self, placement: Placement | None, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Lay the experts out as `placement` says (None: contiguous, no replicas), keeping their weights
        and moving `optimizer`'s per-expert state with them; every rank of the group calls it with the
        same placement (migration.apply_placement)."""
        migration.apply_placement(self, placement, optimizer)

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


def _to_autocast_dtype(x_TD: Tensor) -> Tensor:
    """Under autocast, the tokens travel and meet the experts in the autocast dtype (e.g. bf16)."""
    if torch.is_autocast_enabled(x_TD.device.type):
        return x_TD.to(torch.get_autocast_dtype(x_TD.device.type))
    return x_TD
