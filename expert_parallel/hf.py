"""Hugging Face MoE blocks <-> MoELayer: load a transformers block's weights into a layer, and back.

`from_hf_block(block, group)` builds a dropless MoELayer that computes what the
block computes, holding only this rank's experts; `copy_to_hf_block(layer,
block)` writes a layer's weights back. The block is read by its attributes,
not its class name, so blocks with the same math load too:

- router `block.gate`, with `weight [E, D]` (an nn.Linear in transformers 4.x,
  a router module returning (logits, weights, ids) in 5.x):
  - softmax over E, top-k, renormalised unless `norm_topk_prob` is False
    (Mixtral has no such flag and always renormalises; Qwen2/3-MoE), times
    `routed_scaling_factor` if the router has one (DeepSeek-V2's "greedy");
  - with `e_score_correction_bias` (DeepSeek-V3 and its relatives): sigmoid
    scores, that bias added for selection only, group-limited selection
    (`n_group`, `topk_group`; a group scores the sum of its two best biased
    scores), `norm_topk_prob`, `routed_scaling_factor`.
- experts `block.experts`: fused `gate_up_proj [E, 2I, D]` (gate rows first)
  and `down_proj [E, D, I]` (transformers 5.x), or a ModuleList of per-expert
  MLPs with `gate_proj`/`up_proj`/`down_proj` (or Mixtral 4.x's `w1`/`w3`/`w2`)
  Linear layers without bias; SiLU-gated: down(silu(gate x) * up x).
- optional shared experts `block.shared_expert` (Qwen2-MoE, with a sigmoid
  `block.shared_expert_gate`) or `block.shared_experts` (DeepSeek-V3): one dense
  gated MLP of the same form, replicated on every rank.

Anything else (router biases on the experts, another activation, transposed
or interleaved fused weights) raises ValueError naming it. With a 5.x router,
`from_hf_block` also runs the block's router and the layer's routing on a few
random tokens and raises if they disagree, so a block that has these
attributes but other routing math is refused rather than silently misread.

Not carried over: Mixtral's `router_jitter_noise` (training only, and it
scales the experts' input too, unlike MoEConfig.router_jitter) and the
model-level load-balancing loss (the layer gets aux_loss_coef=0 unless given).

Legend: E experts, e local experts, D d_model, I expert hidden width (H in
MoELayer), T tokens.
"""

from __future__ import annotations

import copy
from dataclasses import fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ExecutionConfig, MoEConfig
from .layer import MoELayer
from .router import route


def from_hf_block(block: nn.Module, group=None, *, name: str | None = None, **overrides) -> MoELayer:
    """A MoELayer over `group` computing what the transformers MoE `block` computes.

    Every rank passes the whole block (the same weights); rank r of P keeps
    the router, the shared experts and global experts r*E/P ... (r+1)*E/P - 1.
    The layer is dropless, has no aux loss, and takes the block's device and
    dtype; `overrides` are MoEConfig fields that replace the derived ones
    (e.g. capacity_factor=1.25, aux_loss_coef=0.01) or ExecutionConfig fields
    (e.g. dispatch="once_per_rank"). The global random state is left as it
    was. Its forward returns an MoEOutput whose `out` is the block's output
    tensor (blocks of transformers 4.x also return router logits; the layer does not).
    """
    execution, moe_overrides = _split_overrides(overrides)
    config = _config_from_block(block, moe_overrides)
    with torch.random.fork_rng(devices=[]):
        layer = MoELayer(config, group, execution=execution, name=name)
    weight = block.gate.weight
    layer.to(device=weight.device, dtype=weight.dtype)  # the selection bias stays fp32 (MoELayer._apply)
    with torch.no_grad():
        for mine, theirs in _paired_tensors(layer, block, layer.first_expert, layer.num_local_experts):
            mine.copy_(theirs)
    _check_routing(block, layer)
    return layer


def _split_overrides(overrides: dict) -> tuple[ExecutionConfig, dict]:
    """(the ExecutionConfig of the overrides naming its fields, the rest: MoEConfig fields)."""
    execution_fields = {f.name for f in fields(ExecutionConfig)}
    execution = ExecutionConfig(**{k: v for k, v in overrides.items() if k in execution_fields})
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
    theirs = _config_from_block(block, {f: getattr(mine, f) for f in _NOT_IN_A_BLOCK})
    differ = [f.name for f in fields(MoEConfig) if getattr(theirs, f.name) != getattr(mine, f.name)]
    if differ or theirs.shared_hidden != mine.shared_hidden:
        pairs = ", ".join(f"{f}: layer {getattr(mine, f)!r}, block {getattr(theirs, f)!r}" for f in differ)
        raise ValueError(f"copy_to_hf_block: the layer does not fit the block ({pairs or 'shared width'})")
    first, count = layer.first_expert, layer.num_local_experts
    experts = {}
    if gather and layer.group is not None:
        experts = {n: _all_gather_experts(getattr(layer.experts, n), layer.group) for n in ("w1", "w3", "w2")}
        first, count = 0, mine.num_experts
    with torch.no_grad():
        for source, target in _paired_tensors(layer, block, first, count, experts):
            target.copy_(source)


# Training rules a transformers block does not carry: a layer may differ from its block in these.
_NOT_IN_A_BLOCK = (
    "capacity_factor", "min_capacity", "drop_policy", "aux_loss_coef", "z_loss_coef", "aux_loss_scope",
    "selection_bias_rate", "router_jitter", "eval_capacity_factor",
)  # fmt: skip


def _config_from_block(block: nn.Module, overrides: dict) -> MoEConfig:
    gate, experts = _required(block, "gate"), _required(block, "experts")
    hf_config = getattr(block, "config", None) or getattr(experts, "config", None)
    num_experts, d_model = _required(gate, "weight").shape
    w1, _, _ = _expert_views(experts, 0, 1, where=type(block).__name__)
    top_k = _first_attr((gate, block, hf_config), "top_k", "num_experts_per_tok")
    if top_k is None:
        raise ValueError(f"{type(block).__name__}: cannot tell top_k (no gate.top_k or num_experts_per_tok)")
    values = dict(
        d_model=d_model,
        d_hidden=w1[0].shape[1],
        num_experts=num_experts,
        top_k=top_k,
        activation="swiglu",
        bias=False,
        router_bias=getattr(gate, "bias", None) is not None,
        capacity_factor=None,
        aux_loss_coef=0.0,
    )
    normalize = _first_attr((gate, block), "norm_topk_prob")
    if hasattr(gate, "e_score_correction_bias"):
        num_groups = _first_attr((gate, hf_config), "num_group", "n_group") or 1
        values.update(
            score_func="sigmoid",
            normalize_weights=bool(normalize),
            selection_bias=True,
            num_groups=num_groups,
            group_topk=_first_attr((gate, hf_config), "topk_group"),
            routed_scaling_factor=float(_first_attr((gate, hf_config), "routed_scaling_factor") or 1.0),
        )
    else:
        # Without norm_topk_prob, Mixtral's router renormalises and DeepSeek-V2's
        # (which has a topk_method) does not.
        if normalize is None:
            normalize = getattr(gate, "topk_method", None) is None
        values.update(
            score_func="softmax",
            normalize_weights=bool(normalize),
            routed_scaling_factor=float(_first_attr((gate,), "routed_scaling_factor") or 1.0),
        )
    shared = _shared_mlp(block)
    if shared is not None:
        width = _mlp_views(shared, "shared expert")[0].shape[1]
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


def _paired_tensors(layer: MoELayer, block: nn.Module, first: int, count: int, experts: dict | None = None):
    """(layer tensor, block tensor view) pairs of equal shape, for experts first..first+count-1.

    `experts` maps w1/w3/w2 to [count, ...] tensors standing in for the layer's
    own local experts (the all-gathered ones in copy_to_hf_block).
    """
    gate = block.gate
    yield layer.router.weight, gate.weight
    if layer.router.bias is not None:
        yield layer.router.bias, gate.bias
    if getattr(layer, "selection_bias", None) is not None:
        yield layer.selection_bias, gate.e_score_correction_bias
    w1, w3, w2 = _expert_views(block.experts, first, count, where=type(block).__name__)
    for name, views in (("w1", w1), ("w3", w3), ("w2", w2)):
        stacked = (experts or {}).get(name, getattr(layer.experts, name))
        for g, view in enumerate(views):
            yield stacked[g], view
    shared = _shared_mlp(block)
    if shared is not None:
        for name, view in zip(("w1", "w3", "w2"), _mlp_views(shared, "shared expert")):
            yield getattr(layer.shared_experts, name), view
        if getattr(block, "shared_expert_gate", None) is not None:
            yield layer.shared_experts.gate, block.shared_expert_gate.weight.data[0]  # [D] of a Linear(D, 1)


def _expert_views(experts: nn.Module, first: int, count: int, where: str):
    """Three lists of `count` views into the block's expert weights: w1, w3 [D, I] and w2 [I, D].

    Views, so the same lists serve for reading and for writing back.
    """
    if hasattr(experts, "gate_up_proj"):
        for flag, wanted in (
            ("has_gate", True),
            ("has_bias", False),
            ("is_transposed", False),
            ("is_concatenated", True),
            ("has_post_expert_norm", False),
        ):
            if getattr(experts, flag, wanted) != wanted:
                raise ValueError(f"{where}: experts with {flag}={not wanted} are not supported")
        _check_silu(getattr(experts, "act_fn", None), f"{where}.experts")
        gate_up_EXD, down_EDI = experts.gate_up_proj.data, _required(experts, "down_proj").data
        hidden = gate_up_EXD.shape[1] // 2
        if gate_up_EXD.shape[1] != 2 * hidden or down_EDI.shape[2] != hidden:
            raise ValueError(
                f"{where}: gate_up_proj {tuple(gate_up_EXD.shape)} and down_proj {tuple(down_EDI.shape)} "
                f"are not [E, 2I, D] and [E, D, I]"
            )
        picked = range(first, first + count)
        return (
            [gate_up_EXD[g, :hidden].t() for g in picked],
            [gate_up_EXD[g, hidden:].t() for g in picked],
            [down_EDI[g].t() for g in picked],
        )
    if isinstance(experts, nn.ModuleList):
        views = [_mlp_views(experts[g], f"{where}.experts[{g}]") for g in range(first, first + count)]
        return tuple(list(column) for column in zip(*views))
    raise ValueError(
        f"{where}: experts are neither fused (gate_up_proj, down_proj) nor a ModuleList of MLPs, "
        f"got {type(experts).__name__}"
    )


def _mlp_views(mlp: nn.Module, where: str) -> tuple[Tensor, Tensor, Tensor]:
    """w1, w3 [D, I] and w2 [I, D] views of a gated MLP: down(silu(gate x) * up x)."""
    for names in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
        linears = [getattr(mlp, n, None) for n in names]
        if all(isinstance(lin, nn.Linear) for lin in linears):
            if any(lin.bias is not None for lin in linears):
                raise ValueError(f"{where}: MLP layers with biases are not supported")
            _check_silu(getattr(mlp, "act_fn", None), where)
            return tuple(lin.weight.data.t() for lin in linears)
    raise ValueError(
        f"{where}: expected Linear gate_proj/up_proj/down_proj or w1/w3/w2, got {type(mlp).__name__}"
    )


def _shared_mlp(block: nn.Module) -> nn.Module | None:
    shared = getattr(block, "shared_expert", None)
    return shared if shared is not None else getattr(block, "shared_experts", None)


def _check_silu(act: object, where: str) -> None:
    probe = torch.linspace(-6, 6, 25)
    if not callable(act) or not torch.allclose(act(probe), F.silu(probe)):
        raise ValueError(f"{where}: activation {act!r} is not SiLU; only SiLU-gated experts are supported")


@torch.no_grad()
def _check_routing(block: nn.Module, layer: MoELayer, num_tokens: int = 64) -> None:
    """Refuse a block whose router, run on random tokens, disagrees with the layer's routing."""
    gate = block.gate
    if gate.weight.dtype not in (torch.float32, torch.float64):
        # NOTE: the check is of the math, in fp32: in bf16 the block's router (bf16 logits
        # in Mixtral and Qwen) and the layer's (fp32 logits) may break near-ties differently.
        gate = copy.deepcopy(gate).float()
    weight = gate.weight
    generator = torch.Generator().manual_seed(0)
    x_TD = torch.randn(num_tokens, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
    theirs = gate(x_TD)
    if not (isinstance(theirs, tuple) and len(theirs) == 3):
        return  # a transformers 4.x nn.Linear router: routing lives in the block's forward
    _, weights_TK, ids_TK = theirs
    bias = layer.router.bias.float() if layer.router.bias is not None else None
    logits_TE = F.linear(x_TD.float(), layer.router.weight.float(), bias)  # as the layer computes them
    dropless = replace(layer.config, capacity_factor=None, eval_capacity_factor=None)  # as the block
    routing = route(logits_TE, dropless, selection_bias_E=layer.selection_bias, training=False)
    want_TE = torch.zeros(num_tokens, layer.config.num_experts, device=weight.device)
    got_TE = torch.zeros_like(want_TE)
    want_TE.scatter_(1, ids_TK.long(), weights_TK.float())
    got_TE.scatter_(1, routing.expert_ids, routing.weights.float())
    if not torch.allclose(got_TE, want_TE, rtol=1e-4, atol=1e-4):
        raise ValueError(
            f"{type(block).__name__}: its router and the layer's routing disagree on random tokens "
            f"(max |weight diff| {(got_TE - want_TE).abs().max().item():.3g}); its routing math is not "
            f"one MoEConfig describes (derived: {layer.config})"
        )


def _all_gather_experts(local_eXY: Tensor, group) -> Tensor:
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


def __getattr__(name: str):
    """`from_pretrained`, `save_pretrained` and `HFMoEBlock` live in hf_pretrained (built on the above).

    NOTE: looked up on first use (PEP 562), so that either module may be imported first.
    """
    if name in ("from_pretrained", "save_pretrained", "HFMoEBlock"):
        from . import hf_pretrained

        return getattr(hf_pretrained, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
