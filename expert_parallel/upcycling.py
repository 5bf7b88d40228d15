"""Sparse upcycling: a trained dense model made into an MoE whose initial output is the dense one's.

Legend: D d_model, F the dense feed-forward's hidden width, g granularity, H = F / g an expert's
hidden width, O d_out, E experts, r = E / g copies, e local experts.

The layout (Megatron-Core's `upcycling_utils`, "Upcycling Large Language Models into Mixture of
Experts", He et al. 2024): the dense FFN's F hidden units are cut into g shards of H consecutive
units, and each shard is copied r times. Expert i is shard i % g of copy i // g:

    w1[i] = W1[:, s] (w3 the same)   w2[i] = c * W2[s, :]   s = the units of shard i % g, c below

Because the hidden units of a feed-forward act independently, the g shards' outputs sum to the dense
output exactly, whatever the activation. The router is a seeded init in virtual groups: the g
experts of one copy share one router row (the first r rows of the seeded router, each repeated g
times), so their logits are equal and a token's top-k takes whole copies: with top_k = m * g, m
copies, one of each shard per copy. Its combine weights then give each copy's g experts one equal
weight, and

    normalised top-k (weights sum to routed_scaling_factor s):   out = (s / g) * c * dense   ->  c = g / s
    softmax over all E, not normalised, top_k = E (sum 1):       out = (s / g) * c * dense   ->  c = g / s

so the MoE output equals the dense one for any router values (`down_scale`). Megatron instead
spreads c over both projections (c^(1/2) or c^(1/3) on each), which is exact only for a
positively homogeneous activation (relu, squared relu); scaling w2 alone is exact for gelu, silu
and swiglu too.

Not exact (ValueError from `down_scale`, naming the field; `exact=False` upcycles anyway):
top_k not a multiple of g (a copy would be taken in part), unnormalised weights with top_k < E
(their sum depends on the router: `exact=False` scales by Megatron's g * E / top_k, exact only for
a uniform router), normalize_min > 0 (the floor can win), a capacity factor (drops), a
group-limited router whose groups split a copy, scale_expert_input with an activation other than
relu. Expert biases and the router bias start at 0; shared experts start with their w2 at 0, so
they add nothing until trained.

`expert_weights` and `router_rows` are the pure functions; `upcycle` writes them into an MoE
Transformer (only this rank's experts, also under FSDP); `load_dense` reads a dense run's checkpoint
into it (the trainer's `train.init_from`), and with an optimizer the dense run's AdamW state
(`upcycle_optimizer_state`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from . import checkpoint
from .config import MoEConfig
from .materialize import write_held
from .model import DenseFFN, ModelConfig, Transformer


def down_scale(config: MoEConfig, granularity: int, *, exact: bool = True) -> float:
    """c, the factor on every expert's w2 that makes the upcycled layer's output the dense one's
    (module doc), after checking that `config` routes so that it is exact; a ValueError naming the
    field otherwise (with exact=False only the shape rules are checked, and c is Megatron's).

    Worked example: E = 4, top_k = 2, g = 2, normalised softmax: a token takes one copy, weight
    1/2 on each of its two shards, so out = (1/2) * c * (shard 0 + shard 1) = dense for c = 2.
    """
    g, E, k = granularity, config.num_experts, config.top_k
    if g < 1 or E % g:
        raise ValueError(f"upcycling: granularity {g} must divide MoEConfig.num_experts={E}")
    s = config.routed_scaling_factor
    summed = config.normalize_weights or (config.score_func == "softmax" and k == E)
    if not exact:
        return g / s if summed else g * E / (k * s)
    problems = []
    if k % g:
        problems.append(f"MoEConfig.top_k={k} is not a multiple of granularity {g} (copies taken in part)")
    if not summed:
        problems.append(
            f"MoEConfig.normalize_weights=false with top_k={k} < num_experts={E} ({config.score_func}): "
            f"the weights' sum depends on the router"
        )
    if config.normalize_min > 0:
        problems.append(f"MoEConfig.normalize_min={config.normalize_min} (the floor can replace the sum)")
    if config.capacity_factor is not None:
        problems.append(f"MoEConfig.capacity_factor={config.capacity_factor} (a drop loses a shard)")
    if config.group_topk is not None and (E // config.num_groups) % g:
        problems.append(
            f"MoEConfig.num_groups={config.num_groups} with group_topk: groups of {E // config.num_groups} "
            f"experts split the copies of {g} shards"
        )
    if config.scale_expert_input and config.activation != "relu":
        problems.append(
            f"MoEConfig.scale_expert_input with activation={config.activation!r} "
            f"(expert(w * x) != w * expert(x) unless relu)"
        )
    if problems:
        raise ValueError(
            "upcycling would not start equal to the dense model: "
            + "; ".join(problems)
            + " (exact=False upcycles anyway)"
        )
    return g / s


def expert_weights(
    w1_DF: Tensor,
    w2_FO: Tensor,
    w3_DF: Tensor | None,
    *,
    num_experts: int,
    granularity: int,
    scale: float,
    expert_ids: list[int] | None = None,
) -> dict[str, Tensor]:
    """The stacked weights of the experts `expert_ids` (default: all E) made from one dense FFN
    out = act(x @ w1 [* x @ w3]) @ w2, in the experts' layout: {"w1": [e, D, H], "w2": [e, H, O]}
    and "w3" [e, D, H] when gated. Expert i: shard i % g of the F hidden units, w2 times `scale`.

    Worked example: F = 4, g = 2, E = 4: experts 0 and 2 hold units 0-1, experts 1 and 3 units 2-3.
    """
    F = w1_DF.shape[1]
    g = granularity
    if F % g or num_experts % g:
        raise ValueError(
            f"upcycling: granularity {g} must divide the dense hidden width {F} and the {num_experts} experts"
        )
    H = F // g
    ids = list(range(num_experts)) if expert_ids is None else list(expert_ids)
    if any(not 0 <= i < num_experts for i in ids):
        raise ValueError(f"upcycling: expert ids {ids} outside [0, {num_experts})")
    units = [slice((i % g) * H, (i % g + 1) * H) for i in ids]
    out = {
        "w1": torch.stack([w1_DF[:, s] for s in units]),
        "w2": torch.stack([w2_FO[s, :] * scale for s in units]),
    }
    if w3_DF is not None:
        out["w3"] = torch.stack([w3_DF[:, s] for s in units])
    return out


def router_rows(router_ED: Tensor, granularity: int) -> Tensor:
    """[E, ...] -> [E, ...]: the first E / g rows of a (seeded) router, each repeated g times, so that
    the g experts of one copy score alike (virtual groups). g = 1 keeps the router as it is."""
    copies = router_ED.shape[0] // granularity
    return router_ED[:copies].repeat_interleave(granularity, dim=0)


def granularity_of(config: ModelConfig, dense: ModelConfig) -> int:
    """g = the dense FFN's width / the experts' width, after checking that `config` is `dense` with MoE
    feed-forwards (everything else equal) and that the widths divide."""
    if dense.moe is not None:
        raise ValueError("upcycling: the model to upcycle must be dense (its ModelConfig.moe is set)")
    moe = config.moe
    if moe is None:
        raise ValueError("upcycling: the target ModelConfig has no moe section")
    differing = [
        name
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "norm_eps", "tie_embeddings")
        if getattr(config, name) != getattr(dense, name)
    ]
    keeps_dense = any(not config.is_moe_block(i) for i in range(config.n_layers))
    if keeps_dense and config.d_ff_dense != dense.d_ff_dense:
        differing.append("d_ff_dense")
    if keeps_dense and config.dense_activation != dense.dense_activation:
        differing.append("dense_activation")
    if differing:
        values = ", ".join(f"{n}: {getattr(dense, n)} -> {getattr(config, n)}" for n in differing)
        raise ValueError(f"upcycling: the MoE model must be the dense one but for its FFNs; {values}")
    if dense.dense_activation != moe.activation:
        raise ValueError(
            f"upcycling: MoEConfig.activation={moe.activation!r} must be the dense model's "
            f"dense_activation={dense.dense_activation!r}"
        )
    if moe.d_out != dense.d_model:
        raise ValueError(f"upcycling: MoEConfig.d_out={moe.d_out} must be the dense d_model={dense.d_model}")
    if dense.d_ff_dense % moe.d_hidden:
        raise ValueError(
            f"upcycling: MoEConfig.d_hidden={moe.d_hidden} must divide the dense model's "
            f"d_ff_dense={dense.d_ff_dense} (granularity = d_ff_dense / d_hidden)"
        )
    return dense.d_ff_dense // moe.d_hidden


@torch.no_grad()
def upcycle(dense: Transformer, moe: Transformer, *, exact: bool = True) -> int:
    """Write the dense model's weights into `moe`, in place; returns the granularity g.

    `moe` is any build of the MoE config (one process, `build.build_model` over ep, FSDP): every dense
    tensor is copied whole (this rank's part under FSDP), each MoE block's experts are made from the
    dense block's FFN (`expert_weights`, only this rank's logical experts) and its router from its own
    seeded init in virtual groups (`router_rows`). Every rank of a group must call it (the router of
    an FSDP build is gathered).
    """
    g = granularity_of(moe.config, dense.config)
    scale = down_scale(moe.config.moe, g, exact=exact)
    source = dict(dense.named_parameters())
    layers = dict(moe.moe_layers())
    prefixes = tuple(f"{name}." for name in layers)
    for name, param in moe.named_parameters():
        if name.startswith(prefixes):
            continue
        if name not in source or source[name].shape != param.shape:
            raise ValueError(f"upcycling: the dense model has no tensor {name} of shape {tuple(param.shape)}")
        write_held(param, source[name].detach())
    for name, layer in layers.items():
        ffn = dense.get_submodule(name)
        if not isinstance(ffn, DenseFFN):
            raise ValueError(f"upcycling: {name} of the dense model is not a dense feed-forward")
        w3_DF = None if ffn.w3 is None else ffn.w3.weight.t()
        weights = expert_weights(
            ffn.w1.weight.t(),
            ffn.w2.weight.t(),
            w3_DF,
            num_experts=layer.config.num_experts,
            granularity=g,
            scale=scale,
            expert_ids=layer.local_expert_ids,
        )
        for pname, values_eXY in weights.items():
            for j, values_XY in enumerate(values_eXY):
                write_held(getattr(layer.experts, pname), values_XY, index=j)
        for bias in (layer.experts.b1, layer.experts.b2, layer.experts.b3):
            if bias is not None:
                write_held(bias, torch.zeros(bias.shape))
        for param in (layer.router.weight, layer.router.bias):
            if param is not None:
                write_held(param, router_rows(_full(param), g))
        if layer.shared_experts is not None:
            shared_w2 = layer.shared_experts.w2
            write_held(shared_w2, torch.zeros(shared_w2.shape))
        if layer.selection_bias is not None:
            layer.selection_bias.zero_()
    return g


def _full(param: Tensor) -> Tensor:
    """The whole tensor (an FSDP shard gathered: a collective on every rank)."""
    return param.full_tensor() if isinstance(param, DTensor) else param.detach()


def dense_checkpoint(path: Path) -> tuple[Path, ModelConfig]:
    """(the checkpoint directory, the dense ModelConfig) of a run's out_dir (its latest checkpoint) or of
    one `checkpoints/step_<N>` directory, as launch.generate finds them."""
    path = Path(path)
    step_dir, out_dir = (path, path.parent.parent) if (path / ".metadata").is_file() else (None, path)
    if step_dir is None:
        step_dir = checkpoint.latest(path / "checkpoints")
        if step_dir is None:
            raise ValueError(f"upcycling: no checkpoint under {path / 'checkpoints'} (nor is {path} one)")
    config_file = out_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"upcycling: {config_file} is missing: the dense run's config is read from it")
    return step_dir, ModelConfig.from_dict(json.loads(config_file.read_text())["model"])


def load_dense(
    path: Path, moe: Transformer, optimizer: torch.optim.Optimizer | None = None, *, exact: bool = True
) -> tuple[int, int]:
    """Upcycle the dense checkpoint at `path` (`dense_checkpoint`) into `moe`, in place: (its step, g).

    With `optimizer` (an AdamW over `moe`'s parameters, before its first step) the dense run's AdamW
    state comes along (`upcycle_optimizer_state`). Each rank reads the whole dense model (under a
    process group every rank must call it) and keeps its own part. The caller's RNG state is kept:
    the dense model's seed draw and the checkpoint's RNG state do not reach it.
    """
    step_dir, config = dense_checkpoint(path)
    granularity_of(moe.config, config)  # a mismatch fails before the read
    with torch.random.fork_rng(devices=[]):
        with torch.device("meta"):
            dense = Transformer(config)
        dense.to_empty(device="cpu")
        dense.tie_weights()
        dense_optimizer = None if optimizer is None else torch.optim.AdamW(dense.parameters())
        step = checkpoint.load(step_dir, dense, dense_optimizer)
    granularity = upcycle(dense, moe, exact=exact)
    if optimizer is not None:
        upcycle_optimizer_state(dense, dense_optimizer, moe, optimizer, granularity)
    return step, granularity


@torch.no_grad()
def upcycle_optimizer_state(
    dense: Transformer,
    dense_optimizer: torch.optim.Optimizer,
    moe: Transformer,
    optimizer: torch.optim.Optimizer,
    granularity: int,
) -> None:
    """Give `optimizer` (AdamW over `moe`, no step taken) the dense run's AdamW state, so that
    training continues instead of restarting Adam's moments in mid-schedule.

    Every tensor copied from the dense model takes its moments and step. Expert i takes the moments
    of its shard (`expert_weights` applied to exp_avg and exp_avg_sq), times its expected share of
    the dense gradient: its copy gets 1 / r of the tokens (r = E / g copies), and w2 also carries the
    combine weight 1 / g, so exp_avg is scaled by 1 / r (w1, w3) or 1 / E (w2), exp_avg_sq by their
    squares. The routers, shared experts and expert biases, which the dense model lacks, start
    fresh. An approximation of the state the MoE would have had, not an exactness matter: the
    first update already differs from the dense one.
    """
    dense_params = dict(dense.named_parameters())
    names = {id(p): n for n, p in moe.named_parameters()}
    layers = dict(moe.moe_layers())
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            layer_name, _, tail = name.partition(".experts.")
            if layer_name in layers and tail in ("w1", "w2", "w3"):
                ffn = dense.get_submodule(layer_name)
                _expert_moments(layers[layer_name], ffn, dense_optimizer, optimizer, tail)
                continue
            if any(name.startswith(f"{layer}.") for layer in layers):
                continue
            source = dense_optimizer.state.get(dense_params[name], {})
            if source:
                state = optimizer.state[param]
                state["step"] = source["step"].clone()
                for slot in ("exp_avg", "exp_avg_sq"):
                    state[slot] = torch.zeros_like(param)
                    write_held(state[slot], source[slot])


def _expert_moments(layer, ffn: DenseFFN, dense_optimizer, optimizer, which: str) -> None:
    """The AdamW state of one stacked expert tensor from the dense FFN's (upcycle_optimizer_state)."""
    dense_state = {
        w: dense_optimizer.state.get(getattr(ffn, w).weight, {}) if getattr(ffn, w) is not None else {}
        for w in ("w1", "w2", "w3")
    }
    if not dense_state["w1"]:
        return
    E = layer.config.num_experts
    granularity = ffn.w1.weight.shape[0] // layer.config.d_hidden
    copies = E // granularity
    param = getattr(layer.experts, which)
    state = optimizer.state[param]
    state["step"] = dense_state["w1"]["step"].clone()
    for slot, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
        share = (1 / copies) ** power  # of w1, w3; w2's is (1 / E) ** power
        w3_DF = None if ffn.w3 is None else dense_state["w3"][slot].t() * share
        moments_eXY = expert_weights(
            dense_state["w1"][slot].t() * share,
            dense_state["w2"][slot].t(),
            w3_DF,
            num_experts=E,
            granularity=granularity,
            scale=(1 / E) ** power,
            expert_ids=layer.local_expert_ids,
        )[which]
        state[slot] = torch.zeros_like(param)
        for j, values_XY in enumerate(moments_eXY):
            write_held(state[slot], values_XY, index=j)
