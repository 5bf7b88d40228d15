"""Sparse upcycling of a dense Hugging Face model: Llama into Mixtral, Qwen2 into Qwen2-MoE.

`upcycle(dense, num_experts=E, top_k=k, granularity=g, seed=s)` returns the MoE transformers model
whose logits equal the dense model's; `save_upcycled(dense, path, ...)` writes it as a Hugging Face
directory (transformers' own save_pretrained), which transformers and `hf.from_pretrained` (at any
ep size) load. The expert weights are `upcycling.expert_weights`'s, in transformers 5's fused layout:

    experts.gate_up_proj [E, 2I, D]: expert i's gate rows, then its up rows (shard i % g of the
        dense gate_proj and up_proj, I = intermediate_size / g)
    experts.down_proj [E, D, I]: shard i % g of the dense down_proj's columns, times g

and the router `mlp.gate.weight` [E, D] ~ N(0, initializer_range) from a generator seeded by
(seed, its name), its first E / g rows each repeated g times (`upcycling.router_rows`). Both
families renormalise the top-k weights (Qwen2-MoE's config is written with norm_topk_prob=true,
which Qwen1.5-MoE's own checkpoints leave false), so the output is exact when top_k is a multiple of
g (`upcycling.down_scale`). Qwen2-MoE's gated shared expert starts silent: its down_proj and its
gate are 0 (sigmoid(0) * 0), gate_proj and up_proj drawn as the router.

Not supported, a ValueError: a Llama with attention or MLP biases (Mixtral has none), another
activation than silu, other families. The whole MoE model is built in memory once (parameters
allocated, not initialised) before it is written.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from ..materialize import derive_seed
from ..upcycling import down_scale, expert_weights, router_rows
from .pretrained import _materialize, _parameters_on_meta

# The dense config's fields the MoE config takes over unchanged.
_COMMON = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
_QWEN2_WINDOW = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")


def moe_config(dense_config, num_experts: int, top_k: int, granularity: int):
    """The MoE transformers config of a dense Llama or Qwen2 config: E experts of width
    intermediate_size / g, top_k of them per token."""
    from transformers import MixtralConfig, Qwen2MoeConfig

    kind = dense_config.model_type
    F, g = dense_config.intermediate_size, granularity
    if g < 1 or F % g:
        raise ValueError(f"upcycling: granularity {g} must divide intermediate_size={F}")
    if dense_config.hidden_act != "silu":
        raise ValueError(f"upcycling: hidden_act={dense_config.hidden_act!r}; the MoE families here use silu")
    common = {name: getattr(dense_config, name) for name in _COMMON if hasattr(dense_config, name)}
    common["head_dim"] = getattr(dense_config, "head_dim", None)
    common["dtype"] = getattr(dense_config, "dtype", None)
    if kind == "llama":
        biased = [name for name in ("attention_bias", "mlp_bias") if getattr(dense_config, name, False)]
        if biased:
            raise ValueError(f"upcycling: Llama with {biased} = true; Mixtral has no such biases")
        return MixtralConfig(
            **common, intermediate_size=F // g, num_local_experts=num_experts, num_experts_per_tok=top_k
        )
    if kind == "qwen2":
        common.pop("head_dim")  # Qwen2-MoE derives it
        window = {name: getattr(dense_config, name) for name in _QWEN2_WINDOW if hasattr(dense_config, name)}
        return Qwen2MoeConfig(
            **common,
            **window,
            intermediate_size=F,
            moe_intermediate_size=F // g,
            shared_expert_intermediate_size=F // g,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            qkv_bias=True,
        )
    raise ValueError(
        f"upcycling: model_type {kind!r}; supported: 'llama' (-> Mixtral), 'qwen2' (-> Qwen2-MoE)"
    )


def moe_state_dict(
    dense_state: dict[str, Tensor], config, granularity: int, seed: int, *, exact: bool = True
) -> dict[str, Tensor]:
    """The MoE model's tensors (its own names, fused experts) from the dense model's state dict."""
    g, E, k = granularity, _num_experts(config), config.num_experts_per_tok
    D, H = config.hidden_size, _expert_width(config)
    scale = down_scale(MoEConfig(d_model=D, d_hidden=H, num_experts=E, top_k=k), g, exact=exact)
    std = config.initializer_range
    out: dict[str, Tensor] = {}
    layers = set()
    for key, tensor in dense_state.items():
        head, found, projection = key.partition(".mlp.")
        if found:
            layers.add(head)
        else:
            out[key] = tensor
    for layer in sorted(layers):
        mlp = f"{layer}.mlp"
        gate_FD, up_FD, down_DF = (dense_state[f"{mlp}.{p}_proj.weight"] for p in ("gate", "up", "down"))
        weights = expert_weights(
            gate_FD.t(), down_DF.t(), up_FD.t(), num_experts=E, granularity=g, scale=scale
        )
        out[f"{mlp}.experts.gate_up_proj"] = torch.cat(
            [weights["w1"].transpose(1, 2), weights["w3"].transpose(1, 2)], dim=1
        ).contiguous()
        out[f"{mlp}.experts.down_proj"] = weights["w2"].transpose(1, 2).contiguous()
        dtype = gate_FD.dtype
        out[f"{mlp}.gate.weight"] = router_rows(_normal((E, D), std, seed, f"{mlp}.gate.weight"), g).to(dtype)
        if config.model_type == "qwen2_moe":
            shared, width = f"{mlp}.shared_expert", config.shared_expert_intermediate_size
            for p in ("gate", "up"):
                out[f"{shared}.{p}_proj.weight"] = _normal((width, D), std, seed, f"{shared}.{p}_proj").to(
                    dtype
                )
            out[f"{shared}.down_proj.weight"] = torch.zeros(D, width, dtype=dtype)
            out[f"{mlp}.shared_expert_gate.weight"] = torch.zeros(1, D, dtype=dtype)
    return out


def upcycle(
    dense: nn.Module, *, num_experts: int, top_k: int, granularity: int = 1, seed: int = 0, exact: bool = True
) -> nn.Module:
    """The MoE transformers model (Mixtral of a Llama, Qwen2-MoE of a Qwen2) whose logits equal
    `dense`'s, in eval mode (module doc). The router is seeded by `seed`: the same call gives the
    same model."""
    from transformers import AutoModelForCausalLM

    config = moe_config(dense.config, num_experts, top_k, granularity)
    state = moe_state_dict(dense.state_dict(), config, granularity, seed, exact=exact)
    dtype = next(dense.parameters()).dtype
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _materialize(model)
    wanted = set(model.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        wanted.discard("lm_head.weight")
    missing, unused = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or unused:
        raise ValueError(
            f"upcycling: {type(model).__name__} lacks {missing[:4]}, and has no place for {unused[:4]}"
        )
    with torch.no_grad():
        for name, param in model.state_dict(keep_vars=True).items():
            if name in state:
                param.copy_(state[name])
    model.tie_weights()
    return model.eval()


def save_upcycled(dense: nn.Module, path: str | Path, **kwargs) -> Path:
    """`upcycle(dense, **kwargs)` written to `path` as a Hugging Face directory (safetensors and
    config.json, with the dense model's generation config); returns `path`."""
    model = upcycle(dense, **kwargs)
    if getattr(dense, "generation_config", None) is not None:
        model.generation_config = dense.generation_config
    model.save_pretrained(path)
    return Path(path)


def _num_experts(config) -> int:
    return config.num_local_experts if config.model_type == "mixtral" else config.num_experts


def _expert_width(config) -> int:
    return config.intermediate_size if config.model_type == "mixtral" else config.moe_intermediate_size


def _normal(shape: tuple[int, ...], std: float, seed: int, name: str) -> Tensor:
    """N(0, std) from a CPU generator seeded by (seed, name), float32 (the router's first E / g rows are
    what router_rows keeps)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, name))
    return torch.empty(shape).normal_(0.0, std, generator=generator)
