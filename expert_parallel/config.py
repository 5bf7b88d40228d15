"""Validated configs: MoEConfig (what a layer computes), ExecutionConfig (how it runs).

One validation style for every config in the project: frozen dataclasses
whose __post_init__ calls `check_int`, `check_real` and `check_choice`, and
one builder, `from_section`, that makes any of them from a TOML section and
names `section.key` in its errors. Reading the TOML file and its overrides
is config_file.py's.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields

SCORE_FUNCS = ("softmax", "sigmoid")
DROP_POLICIES = ("position", "probs")
ACTIVATIONS = ("relu", "gelu", "silu", "swiglu")
# The experts' choices: also GPT-OSS's clamped SwiGLU (not offered to the dense feed-forward).
EXPERT_ACTIVATIONS = (*ACTIVATIONS, "clamped_swiglu")
GATED_ACTIVATIONS = ("swiglu", "clamped_swiglu")  # with a second input projection w3
AUX_LOSS_SCOPES = ("micro_batch", "global_batch", "sequence")
DISPATCH_MODES = ("per_assignment", "once_per_rank", "fixed", "balanced")
GEMMS = ("auto", "loop", "grouped_mm")


@dataclass(frozen=True)
class MoEConfig:
    """What an MoE layer computes; identical on every rank of a group.

    d_model: input width D.            d_hidden: expert hidden width H.
    d_out: output width O (None -> d_model; resolved at construction).
    num_experts: E, the global expert count.      top_k: K choices per token.
    score_func: "softmax" (over all E) or "sigmoid" (per expert).
    normalize_weights: rescale the K chosen scores to sum to 1.
    normalize_min: with normalize_weights, divide the K chosen scores by
        max(their sum, normalize_min) (ERNIE-4.5's moe_norm_min); 0 divides by
        the sum itself (for softmax: a softmax over the K chosen logits).
    capacity_factor: C = max(min_capacity, ceil(capacity_factor * T * K / E))
        assignments kept per expert, T = tokens in the call on this rank;
        None means dropless (every assignment kept).
    drop_policy: which assignments an over-full expert keeps:
        "position" (choice rank, then token index) or "probs" (highest score).
    activation: "relu", "gelu", "silu", or "swiglu" (act(x@w1) * (x@w3)) @ w2;
        or "clamped_swiglu" (GPT-OSS): with a = x@w1, u = x@w3, c = min(a, swiglu_limit),
        (c * sigmoid(swiglu_alpha * c) * (clamp(u, -swiglu_limit, swiglu_limit) + 1)) @ w2.
    swiglu_alpha, swiglu_limit: the two constants of "clamped_swiglu" (GPT-OSS:
        1.702 and 7.0); required by it, None for every other activation.
    bias: experts carry biases.        router_bias: the router Linear has a bias.
    aux_loss_coef, z_loss_coef: weights of the load-balancing and z losses in
        the layer's `MoEOutput.aux_loss`.
    aux_loss_scope: over which tokens the aux loss's f_i (share of choices per
        expert) is counted: "micro_batch" (this call on this rank), "global_batch"
        (summed over the layer's stats_group and over the micro-batches of the
        step so far) or "sequence" (per sequence of a [B, S, D] input, averaged).

    Routing of today's open models (docs/configuration.md#routers-of-open-models):
    routed_scaling_factor: multiplies the final routed weights (DeepSeek-V3: 2.5).
    selection_bias: a per-expert bias buffer [E] added to the scores (softmax
        probabilities or sigmoid scores) for choosing experts only; the weights
        use the unbiased scores (DeepSeek-V3's auxiliary-loss-free balancing).
    selection_bias_rate: u in bias += u * sign(mean load - load), applied by
        `MoELayer.after_optimizer_step()` after each optimizer step (0: frozen).
    num_groups, group_topk: group-limited routing (DeepSeek-V2/V3). Experts
        form num_groups contiguous groups; a token keeps the group_topk groups
        with the highest sum of their two best scores, then picks its top_k
        experts inside them (group_topk None: all groups).
    num_shared_experts, d_shared_hidden: always-on experts of hidden width
        d_shared_hidden (None -> d_hidden) each, run as one dense feed-forward
        of width num_shared_experts * d_shared_hidden, replicated on every rank.
    shared_expert_gate: scale the shared output by sigmoid(x @ g) (Qwen2-MoE).
    router_jitter: eps; in training the router sees x * U(1 - eps, 1 + eps).
    scale_expert_input: each chosen expert sees x * weight and the outputs are
        summed unweighted, out = sum_k expert_k(weight_k * x) (Llama 4), instead
        of sum_k weight_k * expert_k(x). The weight's gradient flows through the
        expert. Under once_per_rank dispatch each (token, expert) pair then
        travels as its own row (its input differs from expert to expert).
    eval_capacity_factor: the capacity factor outside training (None: as in
        training). A factor >= num_experts / top_k never drops.

    How the layer runs (dispatch mode, chunking, caps, GEMM kernel) is not
    here: see ExecutionConfig. Code that builds a layer from another model
    fills MoEConfig alone.

    Defaults follow the modern dropless top-2 softmax router (Mixtral-like
    routing, SimpleMoE-like experts): see docs/configuration.md.
    """

    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int = 2
    d_out: int | None = None
    score_func: str = "softmax"
    normalize_weights: bool = True
    normalize_min: float = 0.0
    capacity_factor: float | None = None
    min_capacity: int = 4
    drop_policy: str = "position"
    activation: str = "relu"
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None
    bias: bool = True
    router_bias: bool = True
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    aux_loss_scope: str = "micro_batch"
    routed_scaling_factor: float = 1.0
    selection_bias: bool = False
    selection_bias_rate: float = 0.0
    num_groups: int = 1
    group_topk: int | None = None
    num_shared_experts: int = 0
    d_shared_hidden: int | None = None
    shared_expert_gate: bool = False
    router_jitter: float = 0.0
    eval_capacity_factor: float | None = None
    scale_expert_input: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "d_hidden", "num_experts", "top_k"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.d_out is None:
            object.__setattr__(self, "d_out", self.d_model)
        _check_int("d_out", self.d_out, minimum=1)
        _check_int("min_capacity", self.min_capacity, minimum=0)
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        _check_choice("score_func", self.score_func, SCORE_FUNCS)
        _check_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        _check_choice("activation", self.activation, EXPERT_ACTIVATIONS)
        self._check_clamped_swiglu()
        _check_choice("aux_loss_scope", self.aux_loss_scope, AUX_LOSS_SCOPES)
        self._check_routing_features()
        bools = ("normalize_weights", "bias", "router_bias", "selection_bias", "shared_expert_gate")
        for name in (*bools, "scale_expert_input"):
            check_bool("MoEConfig", name, getattr(self, name))
        if self.capacity_factor is not None:
            _check_real("capacity_factor", self.capacity_factor)
            if not self.capacity_factor > 0:
                raise ValueError(
                    f"MoEConfig.capacity_factor must be > 0 or None (dropless), got {self.capacity_factor!r}"
                )
        for name in ("aux_loss_coef", "z_loss_coef"):
            _check_real(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise ValueError(f"MoEConfig.{name} must be >= 0, got {getattr(self, name)!r}")

    def _check_clamped_swiglu(self) -> None:
        constants = ("swiglu_alpha", "swiglu_limit")
        if self.activation != "clamped_swiglu":
            given = [name for name in constants if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"MoEConfig.{given[0]}={getattr(self, given[0])!r} is a constant of "
                    f"activation='clamped_swiglu', not of activation={self.activation!r}"
                )
            return
        for name in constants:
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"MoEConfig.{name} is required by activation='clamped_swiglu'")
            _check_real(name, value)
            if not value > 0:
                raise ValueError(f"MoEConfig.{name} must be > 0, got {value!r}")

    def _check_routing_features(self) -> None:
        for name in ("routed_scaling_factor", "selection_bias_rate", "router_jitter", "normalize_min"):
            _check_real(name, getattr(self, name))
        if self.normalize_min < 0 or (self.normalize_min > 0 and not self.normalize_weights):
            raise ValueError(
                f"MoEConfig.normalize_min={self.normalize_min!r} must be >= 0, "
                f"and > 0 only with normalize_weights=true"
            )
        if not self.routed_scaling_factor > 0:
            raise ValueError(
                f"MoEConfig.routed_scaling_factor must be > 0, got {self.routed_scaling_factor!r}"
            )
        if self.selection_bias_rate < 0 or (self.selection_bias_rate > 0 and not self.selection_bias):
            raise ValueError(
                f"MoEConfig.selection_bias_rate={self.selection_bias_rate!r} must be >= 0, "
                f"and > 0 only with selection_bias=true"
            )
        if not 0 <= self.router_jitter < 1:
            raise ValueError(f"MoEConfig.router_jitter must be in [0, 1), got {self.router_jitter!r}")
        _check_int("num_groups", self.num_groups, minimum=1)
        if self.num_experts % self.num_groups:
            raise ValueError(
                f"MoEConfig.num_groups={self.num_groups} must divide num_experts={self.num_experts}"
            )
        if self.group_topk is not None:
            _check_int("group_topk", self.group_topk, minimum=1)
            if self.group_topk > self.num_groups:
                raise ValueError(
                    f"MoEConfig.group_topk={self.group_topk} exceeds num_groups={self.num_groups}"
                )
            per_group = self.num_experts // self.num_groups
            reachable = self.group_topk * per_group
            if reachable < self.top_k:
                raise ValueError(
                    f"MoEConfig: group_topk={self.group_topk} groups of {per_group} "
                    f"experts hold {reachable} experts, fewer than top_k={self.top_k}"
                )
        _check_int("num_shared_experts", self.num_shared_experts, minimum=0)
        if self.d_shared_hidden is not None:
            _check_int("d_shared_hidden", self.d_shared_hidden, minimum=1)
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError("MoEConfig.shared_expert_gate needs num_shared_experts >= 1")
        if self.eval_capacity_factor is not None:
            _check_real("eval_capacity_factor", self.eval_capacity_factor)
            if not self.eval_capacity_factor > 0:
                raise ValueError(
                    f"MoEConfig.eval_capacity_factor must be > 0 or None, got {self.eval_capacity_factor!r}"
                )

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None

    @property
    def shared_hidden(self) -> int:
        """Hidden width of the one dense feed-forward that runs the shared experts (0: none)."""
        return self.num_shared_experts * (self.d_shared_hidden or self.d_hidden)

    def capacity(self, num_tokens: int, training: bool = True) -> int | None:
        """Assignments each expert keeps for `num_tokens` tokens; None when dropless.

        Outside training, eval_capacity_factor (when set) replaces capacity_factor.
        """
        factor = self.capacity_factor
        if not training and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        if factor is None:
            return None
        wanted = math.ceil(factor * num_tokens * self.top_k / self.num_experts)
        return max(self.min_capacity, wanted)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> MoEConfig:
        return from_section(cls, "moe", values)


@dataclass(frozen=True)
class ExecutionConfig:
    """How an MoE layer runs: choices that change speed and memory, never the result.

    dispatch: what one all-to-all row carries under expert parallelism:
        "per_assignment" (each kept (token, expert) pair) or "once_per_rank"
        (each token once per destination rank, expanded to its experts there,
        whose weighted outputs are summed there and sent back as one row),
        or "fixed" (for decoding: C padded slots per (rank, expert), C a token
        bound every rank knows, so no count exchange and no host sync: one
        equal-split all-to-all each way; C = the forward's `tokens_per_rank`,
        else its own token count, which must then be equal on every rank),
        or "balanced" (per_assignment rows, but planned from the gathered
        counts so that every rank runs at most ceil(M / P) of the call's M
        rows: a hot expert's rows run on idle ranks, which borrow its weights
        for the forward and send its gradient home; it falls back to
        per_assignment by itself where that cannot win, balance_plan.py).
        All give the same outputs and gradients (to rounding); see
        docs/dispatch.md for which is faster where. Under "per_assignment" or
        "once_per_rank" the layer picks "fixed" by itself for an eval forward
        without gradients whose caller states a small agreed token bound
        (Transformer.decode's decode steps; dispatchers.for_call has the rule).
    exchange_chunks: under "per_assignment" dispatch, each rank's local
        experts form this many chunks (at most one per local expert), whose
        all-to-alls and expert GEMMs are pipelined: chunk c's experts compute
        while chunk c + 1's rows travel, forward and backward. 1: no overlap.
        Each expert sees the same rows in the same order whatever the count,
        so outputs and gradients are bitwise equal for any value.
    max_tokens_per_expert: a hard bound on the rows one expert may receive in
        one forward, summed over the group; over it, every rank raises
        ValueError instead of running out of memory (None: no bound).
    gemm: the experts' GEMM kernel, "loop" (one GEMM per expert), "grouped_mm"
        (torch's grouped GEMM) or "auto" (where it was measured faster).

    Every rank of a group must run the same ExecutionConfig (checked at construction).
    """

    dispatch: str = "per_assignment"
    exchange_chunks: int = 1
    max_tokens_per_expert: int | None = None
    gemm: str = "auto"

    def __post_init__(self) -> None:
        check_choice("ExecutionConfig", "dispatch", self.dispatch, DISPATCH_MODES)
        check_int("ExecutionConfig", "exchange_chunks", self.exchange_chunks, minimum=1)
        if self.max_tokens_per_expert is not None:
            check_int("ExecutionConfig", "max_tokens_per_expert", self.max_tokens_per_expert, minimum=1)
        check_choice("ExecutionConfig", "gemm", self.gemm, GEMMS)
        if self.exchange_chunks > 1 and self.dispatch != "per_assignment":
            raise ValueError(
                f"ExecutionConfig.exchange_chunks={self.exchange_chunks} needs dispatch='per_assignment' "
                f"(once_per_rank rows carry several experts each, and fixed slots travel in one exchange)"
            )

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def from_section(cls: type, section: str, values: dict):
    """Build the dataclass `cls` from a TOML section, naming `section.key` in every error.

    Unknown keys are rejected; values must match the field's annotation (int,
    float, str, bool, or those | None); an int is accepted for a float.
    """
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown key(s) {[f'{section}.{k}' for k in unknown]}; known: {sorted(hints)}")
    converted = {}
    for key, value in values.items():
        allowed = typing.get_args(hints[key]) or (hints[key],)
        if value is None and type(None) in allowed:
            converted[key] = None
        elif float in allowed and isinstance(value, int) and not isinstance(value, bool):
            converted[key] = float(value)
        elif any(t is not type(None) and type(value) is t for t in allowed):
            converted[key] = value
        else:
            names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
            raise ValueError(f"{section}.{key} must be {names}, got {value!r}")
    return cls(**converted)


def check_int(owner: str, name: str, value: object, minimum: int) -> None:
    """ValueError naming `owner.name` unless value is an int (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value!r}")


def check_real(owner: str, name: str, value: object) -> None:
    """ValueError naming `owner.name` unless value is a finite int or float (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")


def check_choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {choices}, got {value!r}")


def check_bool(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be a bool, got {value!r}")


def _check_int(name: str, value: object, minimum: int) -> None:
    check_int("MoEConfig", name, value, minimum)


def _check_real(name: str, value: object) -> None:
    check_real("MoEConfig", name, value)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    check_choice("MoEConfig", name, value, choices)
