"""Hugging Face MoE blocks <-> MoELayer: load a transformers block's weights into a layer, and back.

`from_hf_block(block, group)` builds a dropless MoELayer that computes what the
block computes, holding only this rank's experts; `copy_to_hf_block(layer,
block)` writes a layer's weights back. The block is read by its attributes,
not its class name, so blocks with the same math load too:

- router `block.gate` or `block.router` (GPT-OSS, Llama 4, Granite-MoE), with
  `weight [E, D]` and optionally `bias [E]` (GPT-OSS), or with them on its
  `wg` Linear (Hunyuan-MoE); an nn.Linear in
  transformers 4.x, a router module returning (logits, weights, ids) in 5.x,
  or Llama 4's returning (scores [T, E], logits):
  - softmax over E, top-k, renormalised unless `norm_topk_prob` is False
    (Mixtral, GPT-OSS, Granite-MoE and Hunyuan-MoE have no such flag and
    always renormalise; Qwen2/3-MoE), times `routed_scaling_factor` if the router has
    one (DeepSeek-V2's "greedy");
  - with a selection-only bias `e_score_correction_bias` on the router
    (DeepSeek-V3 and its relatives) or on the block, passed to the router
    (MiniMax-M2): sigmoid scores, that bias added for selection only,
    group-limited selection (`n_group`, `topk_group`; a group scores the sum
    of its two best biased scores), `norm_topk_prob` (absent: renormalised),
    `routed_scaling_factor`;
  - with the bias in the router's `moe_statics` (ERNIE-4.5-MoE): softmax
    scores plus the bias for selection only, the chosen probabilities
    divided by max(their sum, `norm_min`);
  - experts whose forward takes the hidden states alone (Llama 4: the block
    runs every expert on x * score): sigmoid of the chosen logits, not
    renormalised, applied to the experts' input (MoEConfig.scale_expert_input).
- experts `block.experts`: fused `gate_up_proj` and `down_proj`, as
  `[E, 2I, D]` and `[E, D, I]` (transformers 5.x) or transposed `[E, D, 2I]`
  and `[E, I, D]` (`is_transposed`, or told by the shapes: Llama 4, GPT-OSS),
  gate half first or interleaved (`is_concatenated=False`: GPT-OSS), with
  `gate_up_proj_bias [E, 2I]` and `down_proj_bias [E, D]` where `has_bias`;
  or a ModuleList of per-expert MLPs with `gate_proj`/`up_proj`/`down_proj`
  (or Mixtral 4.x's `w1`/`w3`/`w2`) Linear layers without bias. SiLU-gated,
  down(silu(gate x) * up x), or, for experts with `alpha` and `limit`,
  GPT-OSS's clamped SwiGLU (MoEConfig activation "clamped_swiglu"); a fused
  module's own `_apply_gate` is checked on probe values.
- optional shared experts `block.shared_expert` (Qwen2-MoE, with a sigmoid
  `block.shared_expert_gate`; Llama 4), `block.shared_experts` (DeepSeek-V3,
  ERNIE-4.5) or `block.shared_mlp` (Hunyuan-MoE): one dense gated MLP of the
  same form, without biases, replicated on every rank.

Anything else (another activation, a gate-less or post-normed expert, biased
shared experts) raises ValueError naming it. With a 5.x router, `from_hf_block` also runs the
block's router and the layer's routing on a few random tokens and raises if
they disagree, so a block that has these attributes but other routing math
is refused rather than silently misread.

Not carried over: Mixtral's `router_jitter_noise` (training only, and it
scales the experts' input too, unlike MoEConfig.router_jitter) and the
model-level load-balancing loss (the layer gets aux_loss_coef=0 unless given).

Legend: E experts, e local experts, D d_model, I expert hidden width (H in
MoELayer), T tokens.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ExecutionConfig, MoEConfig
from ..experts import Activation
from ..layer import MoELayer
from ..router import route

EXPERT_TENSORS = ("w1", "w3", "w2", "b1", "b3", "b2")  # the layer's per-expert tensors a block may hold

# Where a block keeps a selection-only bias (relative to the block), and the scores it is added to.
_SELECTION_BIASES = (
    ("gate.e_score_correction_bias", "sigmoid"),  # DeepSeek-V3, GLM-4.5, dots1
    ("e_score_correction_bias", "sigmoid"),  # MiniMax-M2: on the block, an argument of its router
    ("gate.moe_statics.e_score_correction_bias", "softmax"),  # ERNIE-4.5-MoE
)


def from_hf_block(
    block: nn.Module,
    group=None,
    *,
    name: str | None = None,
    execution: ExecutionConfig | None = None,
    **overrides,
) -> MoELayer:
    """A MoELayer over `group` computing what the transformers MoE `block` computes.

    Every rank passes the whole block (the same weights); rank r of P keeps
    the router, the shared experts and global experts r*E/P ... (r+1)*E/P - 1.
    The layer is dropless, has no aux loss, and takes the block's device and
    dtype; `overrides` are MoEConfig fields that replace the derived ones
    (e.g. capacity_factor=1.25, aux_loss_coef=0.01). `execution`: how the
    layer runs (default ExecutionConfig()); ExecutionConfig fields among the
    overrides (e.g. dispatch="once_per_rank") replace its own. The global
    random state is left as it was. Its forward returns an MoEOutput whose
    `out` is the block's output tensor (blocks of transformers 4.x also
    return router logits; the layer does not).
    """
    execution, moe_overrides = split_overrides(overrides, execution)
    config = config_from_block(block, moe_overrides)
    with torch.random.fork_rng(devices=[]):
        layer = MoELayer(config, group, execution=execution, name=name)
    weight = router_linear(block).weight
    layer.to(device=weight.device, dtype=weight.dtype)  # the selection bias stays fp32 (MoELayer._apply)
    with torch.no_grad():
        for mine, theirs in _paired_tensors(layer, block, layer.first_expert, layer.num_local_experts):
            mine.copy_(theirs)
    check_routing(block, layer)
    return layer


def split_overrides(
    overrides: dict, execution: ExecutionConfig | None = None
) -> tuple[ExecutionConfig, dict]:
    """(`execution` with the overrides naming ExecutionConfig fields, the rest: MoEConfig fields).

    Callers holding an ExecutionConfig pass it whole; naming its fields among
    the overrides is a shorthand for one-off calls.
    """
    execution_fields = {f.name for f in fields(ExecutionConfig)}
    mine = {k: v for k, v in overrides.items() if k in execution_fields}
    execution = replace(execution, **mine) if execution is not None else ExecutionConfig(**mine)
    return execution, {k: v for k, v in overrides.items() if k not in execution_fields}


def copy_to_hf_block(layer: MoELayer, block: nn.Module, *, gather: bool = False) -> None:
    """Write `layer`'s weights into `block` (its router, shared experts and experts).

    Under expert parallelism each rank holds only its experts, so by default
    each rank writes those alone: the other experts of its block keep their
    old values, and no rank's block is complete. With gather=True, all ranks
    of the layer's group must call this together; the experts are all-gathered
    and every rank's block receives all of them.
    """
    if layer.placement is not None:
        raise ValueError(
            "copy_to_hf_block: the layer holds redundant experts (a placement); "
            "call layer.apply_placement(None) first to return to one copy of each expert"
        )
    mine = layer.config
    theirs = config_from_block(block, {f: getattr(mine, f) for f in _NOT_IN_A_BLOCK})
    differ = [f.name for f in fields(MoEConfig) if getattr(theirs, f.name) != getattr(mine, f.name)]
    if differ or theirs.shared_hidden != mine.shared_hidden:
        pairs = ", ".join(f"{f}: layer {getattr(mine, f)!r}, block {getattr(theirs, f)!r}" for f in differ)
        raise ValueError(f"copy_to_hf_block: the layer does not fit the block ({pairs or 'shared width'})")
    first, count = layer.first_expert, layer.num_local_experts
    experts = {}
    if gather and layer.group is not None:
        experts = {
            n: all_gather_experts(getattr(layer.experts, n), layer.group)
            for n in EXPERT_TENSORS
            if getattr(layer.experts, n) is not None
        }
        first, count = 0, mine.num_experts
    with torch.no_grad():
        for source, target in _paired_tensors(layer, block, first, count, experts):
            target.copy_(source)


# Training rules a transformers block does not carry: a layer may differ from its block in these.
_NOT_IN_A_BLOCK = (
    "capacity_factor", "min_capacity", "drop_policy", "aux_loss_coef", "z_loss_coef", "aux_loss_scope",
    "selection_bias_rate", "router_jitter", "eval_capacity_factor",
)  # fmt: skip


def router_of(block: nn.Module) -> nn.Module:
    """The block's router: `block.gate`, or `block.router` (GPT-OSS, Llama 4, Granite-MoE)."""
    return getattr(block, router_name(block))


def router_name(block: nn.Module) -> str:
    for name in ("gate", "router"):
        if getattr(block, name, None) is not None:
            return name
    raise ValueError(f"{type(block).__name__} has no 'gate' or 'router': not a supported MoE block")


def router_linear(block: nn.Module) -> nn.Module:
    """The module holding the router's `weight` [E, D] (and `bias`): the router, or its `wg` (Hunyuan-MoE)."""
    return block.get_submodule(router_linear_name(block))


def router_linear_name(block: nn.Module) -> str:
    name = router_name(block)
    router = getattr(block, name)
    if getattr(router, "weight", None) is None and isinstance(getattr(router, "wg", None), nn.Linear):
        return f"{name}.wg"
    return name


def selection_bias_name(block: nn.Module) -> str | None:
    """Where the block keeps its selection-only bias, relative to the block (None: it has none)."""
    return next((name for name, _ in _SELECTION_BIASES if tensor_at(block, name) is not None), None)


def tensor_at(module: nn.Module, name: str) -> Tensor | None:
    """The parameter or buffer `name` (dotted) of `module`; None where there is none."""
    owner, _, leaf = name.rpartition(".")
    try:
        holder = module.get_submodule(owner) if owner else module
    except AttributeError:
        return None
    return getattr(holder, leaf, None)


def config_from_block(block: nn.Module, overrides: dict) -> MoEConfig:
    where = type(block).__name__
    router, experts = router_of(block), _required(block, "experts")
    hf_config = getattr(block, "config", None) or getattr(experts, "config", None)
    num_experts, d_model = _required(router_linear(block), "weight").shape
    views = _expert_views(experts, 0, 1, where=where)
    activation = _expert_activation(experts, where)
    top_k = _first_attr((router, block, hf_config), "top_k", "num_experts_per_tok")
    if top_k is None:
        raise ValueError(f"{where}: cannot tell top_k (no router top_k or num_experts_per_tok)")
    values = dict(
        d_model=d_model,
        d_hidden=views["w1"][0].shape[1],
        num_experts=num_experts,
        top_k=top_k,
        activation=activation.name,
        swiglu_alpha=activation.alpha,
        swiglu_limit=activation.limit,
        bias="b1" in views,
        router_bias=getattr(router_linear(block), "bias", None) is not None,
        capacity_factor=None,
        aux_loss_coef=0.0,
    )
    normalize = _first_attr((router, block), "norm_topk_prob")
    bias = selection_bias_name(block)
    if bias is not None:
        score_func = dict(_SELECTION_BIASES)[bias]
        values.update(
            score_func=score_func,
            normalize_weights=True if normalize is None else bool(normalize),
            selection_bias=True,
            routed_scaling_factor=float(_first_attr((router, hf_config), "routed_scaling_factor") or 1.0),
        )
        if score_func == "sigmoid":
            values.update(
                num_groups=_first_attr((router, hf_config), "num_group", "n_group") or 1,
                group_topk=_first_attr((router, hf_config), "topk_group"),
            )
        else:
            values.update(normalize_min=float(getattr(router, "norm_min", 0.0) or 0.0))
    elif _experts_take_tokens_only(experts):
        values.update(score_func="sigmoid", normalize_weights=False, scale_expert_input=True)
    else:
        # Without norm_topk_prob, Mixtral's router renormalises and DeepSeek-V2's
        # (which has a topk_method) does not.
        if normalize is None:
            normalize = getattr(router, "topk_method", None) is None
        values.update(
            score_func="softmax",
            normalize_weights=bool(normalize),
            routed_scaling_factor=float(_first_attr((router,), "routed_scaling_factor") or 1.0),
        )
    shared = shared_mlp(block)
    if shared is not None:
        width = _mlp_views(shared, f"{where}.{shared_attribute(block)}")[0].shape[1]
        count = getattr(hf_config, "n_shared_experts", None) or 1
        count = count if width % count == 0 else 1
        values.update(
            num_shared_experts=count,
            d_shared_hidden=width // count,
            shared_expert_gate=getattr(block, "shared_expert_gate", None) is not None,
        )
    known = {f.name for f in fields(MoEConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"from_hf_block: MoEConfig has no field(s) {unknown}")
    return MoEConfig(**{**values, **overrides})


def _experts_take_tokens_only(experts: nn.Module) -> bool:
    """Whether the experts' forward takes the hidden states alone, no routing (Llama 4's): the
    block then runs every expert on every token, its input scaled by the token's score."""
    if isinstance(experts, nn.ModuleList):
        return False
    parameters = inspect.signature(experts.forward).parameters.values()
    return len([p for p in parameters if p.kind is not p.VAR_KEYWORD and p.kind is not p.VAR_POSITIONAL]) == 1


def _paired_tensors(layer: MoELayer, block: nn.Module, first: int, count: int, experts: dict | None = None):
    """(layer tensor, block tensor view) pairs of equal shape, for experts first..first+count-1.

    `experts` maps w1/w3/w2 (and b1/b3/b2) to [count, ...] tensors standing in
    for the layer's own local experts (the all-gathered ones in copy_to_hf_block).
    """
    linear = router_linear(block)
    yield layer.router.weight, linear.weight
    if layer.router.bias is not None:
        yield layer.router.bias, linear.bias
    if getattr(layer, "selection_bias", None) is not None:
        bias = tensor_at(block, selection_bias_name(block))
        yield layer.selection_bias, bias.data.view(-1)  # [E]; ERNIE-4.5 holds [1, E]
    views = _expert_views(block.experts, first, count, where=type(block).__name__)
    for name, column in views.items():
        stacked = (experts or {}).get(name, getattr(layer.experts, name))
        for g, view in enumerate(column):
            yield stacked[g], view
    shared = shared_mlp(block)
    if shared is not None:
        for name, view in zip(("w1", "w3", "w2"), _mlp_views(shared, "shared expert")):
            yield getattr(layer.shared_experts, name), view
        if getattr(block, "shared_expert_gate", None) is not None:
            yield layer.shared_experts.gate, block.shared_expert_gate.weight.data[0]  # [D] of a Linear(D, 1)


@dataclass(frozen=True)
class FusedLayout:
    """How fused experts hold their weights, and the maps to and from the layer's w1, w3 [D, I], w2 [I, D].

    transposed: gate_up_proj [E, D, 2I] and down_proj [E, I, D], applied as x @ w
        (Llama 4, GPT-OSS); else [E, 2I, D] and [E, D, I], applied as F.linear.
    interleaved: gate and up columns alternate along 2I, g0 u0 g1 u1 ... (GPT-OSS);
        else the gate half comes first.
    bias: gate_up_proj_bias [E, 2I] (laid out as the 2I axis) and down_proj_bias [E, D].
    Every map works on one expert or on a leading E dimension; `split` returns views.
    """

    transposed: bool = False
    interleaved: bool = False
    bias: bool = False

    def split(self, gate_up: Tensor) -> tuple[Tensor, Tensor]:
        """(w1, w3) [..., D, I] views of gate_up [..., 2I, D] (or [..., D, 2I] transposed)."""
        return self.split_pair(gate_up if self.transposed else gate_up.transpose(-1, -2))

    def join(self, w1: Tensor, w3: Tensor) -> Tensor:
        """gate_up in this layout from w1, w3 [..., D, I]."""
        joined = self.join_pair(w1, w3)
        return joined if self.transposed else joined.transpose(-1, -2)

    def split_pair(self, pair: Tensor) -> tuple[Tensor, Tensor]:
        """The gate and up halves (views) of the last dimension, 2I, as this layout orders it."""
        half = pair.shape[-1] // 2
        if self.interleaved:
            return pair[..., 0::2], pair[..., 1::2]
        return pair[..., :half], pair[..., half:]

    def join_pair(self, gate: Tensor, up: Tensor) -> Tensor:
        if self.interleaved:
            return torch.stack([gate, up], dim=-1).flatten(-2)
        return torch.cat([gate, up], dim=-1)

    def w2(self, down: Tensor) -> Tensor:
        """w2 [..., I, D] (a view) of down_proj [..., D, I] (or [..., I, D] transposed)."""
        return down if self.transposed else down.transpose(-1, -2)

    def down(self, w2: Tensor) -> Tensor:
        return self.w2(w2)  # a transpose is its own inverse


def fused_layout(experts: nn.Module, where: str) -> FusedLayout:
    """The layout of fused experts, from their flags (transformers 5's use_experts_implementation) or,
    for experts without them (Llama 4), from the shapes; refuses experts the layer cannot compute."""
    for flag, wanted in (("has_gate", True), ("has_post_expert_norm", False)):
        if getattr(experts, flag, wanted) != wanted:
            raise ValueError(f"{where}: experts with {flag}={not wanted} are not supported")
    gate_up, down = experts.gate_up_proj, _required(experts, "down_proj")
    (_, rows, columns), (_, down_rows, down_columns) = gate_up.shape, down.shape
    plain = rows == 2 * down_columns and columns == down_rows  # [E, 2I, D] and [E, D, I]
    flipped = columns == 2 * down_rows and rows == down_columns  # [E, D, 2I] and [E, I, D]: never both
    transposed = getattr(experts, "is_transposed", None)
    if transposed is None:
        transposed = flipped
    if not (flipped if transposed else plain):
        raise ValueError(
            f"{where}: gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not "
            f"{'[E, D, 2I] and [E, I, D]' if transposed else '[E, 2I, D] and [E, D, I]'}"
        )
    biases = [getattr(experts, n, None) is not None for n in ("gate_up_proj_bias", "down_proj_bias")]
    has_bias = getattr(experts, "has_bias", any(biases))
    if has_bias and not all(biases):
        raise ValueError(f"{where}: experts with has_bias=True but no gate_up_proj_bias and down_proj_bias")
    if any(biases) and not has_bias:
        raise ValueError(f"{where}: experts with has_bias=False hold biases; not supported")
    interleaved = not getattr(experts, "is_concatenated", True)
    return FusedLayout(transposed=bool(transposed), interleaved=interleaved, bias=bool(has_bias))


def _expert_views(experts: nn.Module, first: int, count: int, where: str) -> dict[str, list[Tensor]]:
    """Lists of `count` views into the block's expert weights, by the layer's names: w1, w3 [D, I],
    w2 [I, D], and with biases b1, b3 [I], b2 [D].

    Views, so the same lists serve for reading and for writing back.
    """
    picked = range(first, first + count)
    if hasattr(experts, "gate_up_proj"):
        layout = fused_layout(experts, where)
        gate_up, down = experts.gate_up_proj.data, experts.down_proj.data
        views = {"w1": [], "w3": [], "w2": [layout.w2(down[g]) for g in picked]}
        for g in picked:
            w1, w3 = layout.split(gate_up[g])
            views["w1"].append(w1)
            views["w3"].append(w3)
        if layout.bias:
            pairs = [layout.split_pair(experts.gate_up_proj_bias.data[g]) for g in picked]
            views.update(
                b1=[b1 for b1, _ in pairs],
                b3=[b3 for _, b3 in pairs],
                b2=[experts.down_proj_bias.data[g] for g in picked],
            )
        return views
    if isinstance(experts, nn.ModuleList):
        mlps = [_mlp_views(experts[g], f"{where}.experts[{g}]") for g in picked]
        return {name: list(column) for name, column in zip(("w1", "w3", "w2"), zip(*mlps))}
    raise ValueError(
        f"{where}: experts are neither fused (gate_up_proj, down_proj) nor a ModuleList of MLPs, "
        f"got {type(experts).__name__}"
    )


def _expert_activation(experts: nn.Module, where: str) -> Activation:
    """SiLU-gated, or GPT-OSS's clamped SwiGLU for experts with `alpha` and `limit`; a fused
    module's own gating (`_apply_gate`, on the fused gate/up columns) is checked on probe values."""
    if isinstance(experts, nn.ModuleList):
        return Activation("swiglu")  # each MLP's act_fn is checked with its weights (_mlp_views)
    alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
    if alpha is not None and limit is not None:
        activation = Activation("clamped_swiglu", float(alpha), float(limit))
    else:
        _check_silu(getattr(experts, "act_fn", None), f"{where}.experts")
        activation = Activation("swiglu")
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is not None:
        reach = 2.0 * (activation.limit or 6.0)  # past the clamps
        a_NI = torch.linspace(-reach, reach, 48).view(6, 8)
        u_NI = torch.linspace(reach, -reach, 48).roll(5).view(6, 8)
        layout = fused_layout(experts, where)
        theirs = apply_gate(layout.join_pair(a_NI, u_NI))
        if not torch.allclose(theirs, activation(a_NI, u_NI), rtol=1e-5, atol=1e-6):
            raise ValueError(
                f"{where}.experts: their gating (_apply_gate) is not {activation.name}"
                f"{f' (alpha {activation.alpha}, limit {activation.limit})' if activation.alpha else ''}; "
                f"only SiLU-gated and GPT-OSS's clamped SwiGLU experts are supported"
            )
    return activation


def _mlp_views(mlp: nn.Module, where: str) -> tuple[Tensor, Tensor, Tensor]:
    """w1, w3 [D, I] and w2 [I, D] views of a gated MLP: down(silu(gate x) * up x)."""
    for names in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
        linears = [getattr(mlp, n, None) for n in names]
        if all(isinstance(lin, nn.Linear) for lin in linears):
            if any(lin.bias is not None for lin in linears):
                raise ValueError(f"{where}: MLP layers with biases are not supported")
            _check_silu(getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None), where)
            return tuple(lin.weight.data.t() for lin in linears)
    raise ValueError(
        f"{where}: expected Linear gate_proj/up_proj/down_proj or w1/w3/w2, got {type(mlp).__name__}"
    )


# A block's shared experts: one dense gated MLP, by the attribute it lives in.
SHARED_ATTRIBUTES = ("shared_expert", "shared_experts", "shared_mlp")  # shared_mlp: Hunyuan-MoE


def shared_attribute(block: nn.Module) -> str | None:
    return next((a for a in SHARED_ATTRIBUTES if getattr(block, a, None) is not None), None)


def shared_mlp(block: nn.Module) -> nn.Module | None:
    attribute = shared_attribute(block)
    return getattr(block, attribute) if attribute is not None else None


def _check_silu(act: object, where: str) -> None:
    probe = torch.linspace(-6, 6, 25)
    if not callable(act) or not torch.allclose(act(probe), F.silu(probe)):
        raise ValueError(f"{where}: activation {act!r} is not SiLU; only SiLU-gated experts are supported")


@torch.no_grad()
def check_routing(block: nn.Module, layer: MoELayer, num_tokens: int = 64) -> None:
    """Refuse a block whose router, run on random tokens, disagrees with the layer's routing."""
    router, weight = router_of(block), router_linear(block).weight
    dtype = weight.dtype
    if dtype not in (torch.float32, torch.float64):
        # NOTE: the check is of the math, in fp32: in bf16 the block's router (bf16 logits
        # in Mixtral and Qwen) and the layer's (fp32 logits) may break near-ties differently.
        router, dtype = copy.deepcopy(router).float(), torch.float32
    generator = torch.Generator().manual_seed(0)
    x_TD = torch.randn(num_tokens, weight.shape[1], generator=generator).to(weight.device, dtype)
    want_TE = _router_weights(block, router, x_TD, layer)
    if want_TE is None:
        return  # a transformers 4.x nn.Linear router: routing lives in the block's forward
    bias = layer.router.bias.float() if layer.router.bias is not None else None
    logits_TE = F.linear(x_TD.float(), layer.router.weight.float(), bias)  # as the layer computes them
    dropless = replace(layer.config, capacity_factor=None, eval_capacity_factor=None)  # as the block
    routing = route(logits_TE, dropless, selection_bias_E=layer.selection_bias, training=False)
    got_TE = torch.zeros_like(want_TE)
    got_TE.scatter_(1, routing.expert_ids, routing.weights.float())
    if not torch.allclose(got_TE, want_TE, rtol=1e-4, atol=1e-4):
        raise ValueError(
            f"{type(block).__name__}: its router and the layer's routing disagree on random tokens "
            f"(max |weight diff| {(got_TE - want_TE).abs().max().item():.3g}); its routing math is not "
            f"one MoEConfig describes (derived: {layer.config})"
        )


def _router_weights(block: nn.Module, router: nn.Module, x_TD: Tensor, layer: MoELayer) -> Tensor | None:
    """[T, E] fp32: the block's router's weight of each expert for each token (0 where not chosen);
    None for a router that only computes logits (transformers 4.x)."""
    if selection_bias_name(block) == "e_score_correction_bias":  # MiniMax-M2: the block hands it over
        out = router(x_TD, layer.selection_bias.to(x_TD.dtype))
    else:
        out = router(x_TD)
    if not isinstance(out, tuple):
        return None
    if len(out) == 2:  # Llama 4: (scores [T, E], logits): the scores of the unchosen experts are 0
        return out[0].float()
    if len(out) != 3:
        raise ValueError(f"{type(block).__name__}: its router returns {len(out)} values; not supported")
    _, weights_TK, ids_TK = out
    want_TE = torch.zeros(x_TD.shape[0], layer.config.num_experts, device=x_TD.device)
    return want_TE.scatter_(1, ids_TK.long(), weights_TK.float())


def all_gather_experts(local_eXY: Tensor, group) -> Tensor:
    """[E, X, Y]: every rank's local experts, in global order.

    NOTE: torch.distributed outside comm.py, on purpose: this runs once, off the
    training math path, and needs a plain all-gather of equal-size tensors that
    comm.py (which only carries the layer's own collectives) has no reason to offer.
    """
    import torch.distributed as dist

    parts = [torch.empty_like(local_eXY) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local_eXY.detach().contiguous(), group=group)
    return torch.cat(parts)


def _required(module: object, name: str):
    value = getattr(module, name, None)
    if value is None:
        raise ValueError(f"{type(module).__name__} has no {name!r}: not a supported MoE block")
    return value


def _first_attr(objects, *names):
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None) if obj is not None else None
            if value is not None:
                return value
    return None
