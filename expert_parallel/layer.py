"""MoELayer: route -> dispatch -> experts -> combine (+ shared experts), results returned.

Legend: T tokens on this rank, D d_model, O d_out, E experts, e local experts,
P ranks in the group, K choices per token.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import comm
from .config import ExecutionConfig, MoEConfig
from .dispatchers import ExpertLayout, FixedDispatcher, GroupCounts, for_call, make_dispatcher
from .experts import Experts, uniform_
from .permutation import scaled_assignments, sum_choices
from .placement import Placement
from .router import Routing, route, switch_aux_loss
from .shared import SharedExperts


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
    """

    tokens_per_expert: Tensor
    choices_per_expert: Tensor
    num_routed: int
    num_dropped: Tensor
    capacity: int | None
    rows_sent_to_other_ranks: Tensor


class MoEOutput(NamedTuple):
    """out: [..., O].  aux_loss: scalar, coefficients applied (add it to the loss).  stats: RoutingStats."""

    out: Tensor
    aux_loss: Tensor
    stats: RoutingStats


class Inference(NamedTuple):
    """What an inference caller (Transformer.decode) tells a forward about itself.

    capacity_factor: replaces MoEConfig.capacity_factor and eval_capacity_factor
        for this call; None (the default) routes dropless. Generation routes
        dropless: with a capacity, a later token can push an earlier one out of
        a full expert, so decoding with a KV cache could not equal the forward
        over the whole sequence.
    tokens_per_rank: a bound on the tokens of this call on every rank of the
        group, the same value on all of them (a decode step: the batch bound).
        With it, an eval forward without gradients may use the fixed dispatch
        (dispatchers.for_call); a rank over the bound raises ValueError.
    """

    capacity_factor: float | None = None
    tokens_per_rank: int | None = None


@dataclass(frozen=True, eq=False)
class _Decision:
    """What a training forward decided, for its activation-checkpointing recompute to reuse."""

    expert_ids_TK: Tensor
    keep_TK: Tensor
    counts: GroupCounts | None
    batch_choices_E: Tensor | None


class MoELayer(nn.Module):
    """Mixture-of-Experts feed-forward, experts sharded over `group`.

    forward(x [..., D], choices_before_E=None) -> MoEOutput(out [..., O],
    aux_loss, stats). Rank r of a group of P holds global experts r*E/P ...
    (r+1)*E/P - 1. With group None (or of size 1) it holds all E experts: that
    single-process layer is the definition of correct. Nothing is written to
    the layer during forward: results are returned, and the caller owns the
    step's accounting (sum `stats.choices_per_expert` over micro-batches).

    `execution`: how it runs (dispatch, chunks, caps, GEMM); the same on every rank.
    `stats_group`: the ranks whose loads the global-batch aux loss and the
    selection bias sum (default: `group`).

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
    the token rows again); see `_forward_key`.

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
        # Training forwards' decisions by key, alive while their autograd graph is (see _forward_key).
        self._decisions: weakref.WeakValueDictionary[int, _Decision] = weakref.WeakValueDictionary()
        self._warned_recompute = False

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Router from `seed` (default: `init_seed`); logical expert g from `seed + 1 + g` (so
        replicas start equal); shared experts from `seed + 1 + E`.

        On the meta device it writes nothing; on sharded (FSDP) parameters only
        this rank's part (materialize.write_held).
        """
        seed = self.init_seed if seed is None else seed
        if self.router.weight.is_meta:
            return
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

    def forward(
        self, x: Tensor, choices_before_E: Tensor | None = None, *, inference: Inference | None = None
    ) -> MoEOutput:
        """x [..., D] -> MoEOutput. choices_before_E [E]: this rank's choices in the step's earlier
        micro-batches, for aux_loss_scope "global_batch" (None: this is the first).
        inference: an inference caller's capacity factor and token bound (Inference)."""
        dispatcher = for_call(
            self.dispatcher,
            None if inference is None else inference.tokens_per_rank,
            training=self.training,
            grad_enabled=torch.is_grad_enabled(),
        )
        # NOTE: the fixed dispatch promises no host synchronisation, so it skips the NaN / Inf
        # checks of the input and router logits (a NaN then reaches that token's output).
        check_finite = not isinstance(dispatcher, FixedDispatcher)
        problem = _input_problem(x, self.config, self.router.weight, check_finite)
        key = self._forward_key()
        decision = self._recomputing(key)
        x_TD, routing, problem = self._route(x, problem, decision, inference, check_finite)
        out_TO, rows_away, counts = self._in_graph_or_not(self._count_dispatch_combine, routing)(
            dispatcher, x, x_TD, routing, problem, decision and decision.counts
        )
        if self.shared_experts is not None:
            out_TO = out_TO + self.shared_experts(x_TD)
        batch_choices_E = self._step_choices(routing, choices_before_E, decision)
        if decision is None and batch_choices_E is not None and self.stats_group is not None:
            where = f"{self.where}: global-batch counts"
            batch_choices_E = _outside_graph(comm.sum_counts)(batch_choices_E, self.stats_group, where)
        if key is not None and decision is None and torch.is_grad_enabled():
            decision = _Decision(routing.expert_ids, routing.keep, counts, batch_choices_E)
            out_TO = _remember(self._decisions, key, decision, out_TO)
        return MoEOutput(
            out_TO.view(*x.shape[:-1], self.config.d_out),
            self._aux_loss(routing, batch_choices_E),
            RoutingStats(
                routing.tokens_per_expert.detach(),
                routing.choices_per_expert,
                routing.keep.numel(),
                routing.num_dropped,
                routing.capacity,
                rows_away,
            ),
        )

    def _route(
        self,
        x: Tensor,
        problem,
        decision: _Decision | None,
        inference: Inference | None = None,
        check_finite: bool = True,
    ):
        """(x_TD, routing, None), or (None, None, problem) for an input the layer cannot take."""
        if problem is not None:
            return None, None, problem
        x_TD = x.reshape(-1, self.config.d_model)
        config = self.config if inference is None else _routing_with(self.config, inference.capacity_factor)
        try:
            routing = route(
                self._router_logits(x_TD),
                config,
                self.forced_expert_ids,
                selection_bias_E=self.selection_bias,
                training=self.training,
                check_finite=check_finite,
                sequence_length=x.shape[-2] if x.dim() >= 3 else None,
                decided=None if decision is None else (decision.expert_ids_TK, decision.keep_TK),
            )
        except ValueError as err:
            return None, None, (ValueError, str(err))
        return _to_autocast_dtype(x_TD), routing, None

    def _in_graph_or_not(self, function, routing: Routing | None):
        """`function` as it is, or (under torch.compile) run eagerly between graphs: a group's
        exchanges and dropless experts take host split sizes that change every step, which a
        graph would recompile for. Capacity routing on one process stays in the graph."""
        if self.group is None and routing is not None and routing.capacity is not None:
            return function
        return _outside_graph(function)

    def _count_dispatch_combine(
        self, dispatcher, x: object, x_TD: Tensor, routing: Routing, problem, counts: GroupCounts | None
    ) -> tuple[Tensor, Tensor, GroupCounts | None]:
        """(out [T, O], rows sent to other ranks, counts): `dispatcher`'s count exchange (unless
        `counts` are given: a recompute) -> dispatch -> experts -> combine. With weights on the experts'
        input, the dispatchers carry each (token, choice) as a token of its own (scaled_assignments)."""
        scaled = self.config.scale_expert_input and routing is not None
        if scaled:
            x_TD, routing = scaled_assignments(x_TD, routing)  # T * K rows from here to the combine
        if counts is None:
            counts = dispatcher.exchange_counts(x, routing, problem, self.router.weight.device)
        if self.group is not None and torch.is_grad_enabled() and not x_TD.requires_grad:
            # NOTE: the dispatch exchange's backward runs only where the rows need a
            # gradient; a rank whose input needs none would skip it while its peers
            # wait in it (a hang). A leaf that does makes every rank run it alike.
            x_TD = x_TD.detach().requires_grad_()
        chunks, record = dispatcher.dispatch(x_TD, routing, counts)
        # NOTE: lazy where the chunks arrive one by one (the combine overlaps them); a list
        # otherwise, since torch.compile breaks a generator's graph once more per break inside it.
        y_chunks = (self.experts(chunk.x, chunk.rows_per_expert) for chunk in chunks)
        if isinstance(chunks, list):
            y_chunks = list(y_chunks)
        out_TO = dispatcher.combine(y_chunks, record)
        if scaled:
            out_TO = sum_choices(out_TO, self.config.top_k)
        return out_TO, torch.tensor(record.rows_sent_away, device=out_TO.device), counts

    def _step_choices(
        self, routing: Routing, choices_before_E: Tensor | None, decision: _Decision | None
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

    def _forward_key(self) -> int | None:
        """A key that a training forward shares with its activation-checkpointing recompute only.

        NOTE: drawn from torch's default CPU generator, whose state
        torch.utils.checkpoint restores before it recomputes (preserve_rng_state,
        the default), so the recompute draws the same key, while every other
        forward draws a new one. Drawn in every training forward (grad mode or
        not), so a recompute consumes the generator as its forward did. This
        moves the default generator's stream by one draw per training forward.
        Not under torch.compile, which recomputes inside its own graph.
        """
        if not self.training or torch.compiler.is_compiling():
            return None
        return int(torch.randint(0, 2**62, ()))

    def _recomputing(self, key: int | None) -> _Decision | None:
        """The decision of the forward this call recomputes; None when it is not a recompute."""
        if key is None or not _in_backward():
            return None
        decision = self._decisions.get(key)
        if decision is None and not self._warned_recompute:
            self._warned_recompute = True
            warnings.warn(
                f"{self.where}: a forward inside backward found no decision to reuse, so it routes "
                f"again (near-ties may flip, counts are exchanged again). Checkpoint with "
                f"torch.utils.checkpoint(..., use_reentrant=False) and preserve_rng_state=True",
                stacklevel=3,
            )
        return decision

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
    @torch.no_grad()
    def after_optimizer_step(self, choices_E: Tensor | None = None) -> None:
        """Call after each optimizer step, on every rank of stats_group, with this rank's choices
        per expert summed over the step's training forwards (RoutingStats.choices_per_expert).

        With config.selection_bias_rate u > 0: bias += u * sign(mean load - load),
        load = choices_E summed over stats_group, so every rank holds the same
        bias. Without a selection bias (or at rate 0) it does nothing.
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
        step_E = torch.sign(load_E.mean() - load_E) * self.config.selection_bias_rate
        self.selection_bias += step_E.to(self.selection_bias.dtype)

    def _set_placement(self, placement: Placement | None) -> None:
        """Check `placement` against the config and group; set the local layout and its dispatcher."""
        num_experts, size = self.config.num_experts, self.group_size
        if placement is None:
            if num_experts % size:
                raise ValueError(
                    f"MoEConfig.num_experts={num_experts} is not divisible by the group size {size}"
                )
            self.num_local_experts = num_experts // size
            self.first_expert = self.rank * self.num_local_experts
            self.local_expert_ids = list(range(self.first_expert, self.first_expert + self.num_local_experts))
        else:
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
            self.num_local_experts = physical_PS.shape[1]
            self.first_expert = self.rank * self.num_local_experts  # first local physical id
            self.local_expert_ids = physical_PS[self.rank].tolist()
        self.placement = placement
        layout = ExpertLayout(self.rank, size, self.num_local_experts, placement)
        self.dispatcher = make_dispatcher(layout, self.execution, self.group, self.where, self.exchange_clock)

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


def _input_problem(
    x: object, config: MoEConfig, weight: Tensor, check_finite: bool = True
) -> tuple[type, str] | None:
    """(exception class, message) for an input the layer cannot take, else None; the NaN / Inf
    check (a host sync) only with `check_finite`."""
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
    # NOTE: host sync (skipped under torch.compile, where it would break the graph).
    # A NaN in a feature the router ignores would still poison the expert outputs.
    if check_finite and not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x.reshape(-1, x.shape[-1]))).any(dim=-1).sum())
        return ValueError, f"input contains NaN or Inf ({bad} tokens)"
    return None


def _routing_with(config: MoEConfig, capacity_factor: float | None) -> MoEConfig:
    """`config` with `capacity_factor` in training and eval alike (the same object where that
    changes nothing: a replace validates the whole config, some 15 us per call)."""
    if config.capacity_factor == capacity_factor and config.eval_capacity_factor is None:
        return config
    return replace(config, capacity_factor=capacity_factor, eval_capacity_factor=None)


def _to_autocast_dtype(x_TD: Tensor) -> Tensor:
    """Under autocast, the tokens travel and meet the experts in the autocast dtype (e.g. bf16)."""
    if torch.is_autocast_enabled(x_TD.device.type):
        return x_TD.to(torch.get_autocast_dtype(x_TD.device.type))
    return x_TD


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread (an activation-checkpointing
    recompute runs forwards there)."""
    return torch._C._current_graph_task_id() != -1


@torch._disable_dynamo  # NOTE: imports dynamo on first call only; torch.compiler.disable would at import
def _run_outside_graph(function, *args):
    """function(*args), eagerly between graphs under torch.compile (one graph break)."""
    return function(*args)


def _outside_graph(function):
    """`function`, to run eagerly under torch.compile and as it is otherwise."""
    if torch.compiler.is_compiling():
        return functools.partial(_run_outside_graph, function)
    return function


class _Remember(torch.autograd.Function):
    """Identity that keeps a training forward's decision alive as long as its autograd graph."""

    @staticmethod
    def forward(ctx, out_TO: Tensor, decision: _Decision) -> Tensor:
        ctx.decision = decision
        return out_TO.view_as(out_TO)

    @staticmethod
    def backward(ctx, grad_TO: Tensor):
        return grad_TO, None


def _remember(
    decisions: weakref.WeakValueDictionary, key: int, decision: _Decision, out_TO: Tensor
) -> Tensor:
    decisions[key] = decision
    return _Remember.apply(out_TO, decision)
