"""Tiny random transformers MoE blocks (Mixtral, Qwen2-MoE, DeepSeek-V2/V3) and their gradients in the
layer's layout, for tests/test_hf.py (one process and 2 gloo ranks). Built locally: no download.
"""

from __future__ import annotations

import torch
from torch import nn

TOL = 1e-5
KINDS = ("mixtral", "qwen2_moe", "deepseek_v3")
DISPATCHES = ("per_assignment", "once_per_rank")  # ExecutionConfig.dispatch


def build_block(kind: str, seed: int = 0) -> nn.Module:
    """A tiny transformers MoE block with random weights (d_model 32, 8 experts, top-2), fp32, eval mode."""
    torch.manual_seed(seed)
    common = dict(
        hidden_size=32,
        vocab_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts_per_tok=2,
    )
    if kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = MixtralConfig(intermediate_size=24, num_local_experts=8, **common)
        block_class = MixtralSparseMoeBlock
    elif kind == "qwen2_moe":
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        # norm_topk_prob defaults to False in Qwen2-MoE: the top-k probabilities are not renormalised.
        config = Qwen2MoeConfig(
            moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=8, **common
        )
        block_class = Qwen2MoeSparseMoeBlock
    elif kind in ("deepseek_v3", "deepseek_v2"):
        from transformers import DeepseekV2Config, DeepseekV3Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

        extra = dict(kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8)
        if kind == "deepseek_v3":
            # 4 groups of 2 experts, tokens pick 2 groups; routed_scaling_factor 2.5 (the default).
            config = DeepseekV3Config(
                moe_intermediate_size=24, n_routed_experts=8, n_group=4, topk_group=2, n_shared_experts=2,
                q_lora_rank=16, **extra, **common,
            )  # fmt: skip
            block_class = DeepseekV3MoE
        else:  # one group per token, ranked by its best score (MoEConfig: sum of its two best): refused
            config = DeepseekV2Config(
                moe_intermediate_size=24, n_routed_experts=8, n_group=4, topk_group=1, n_shared_experts=1,
                topk_method="group_limited_greedy", **extra, **common,
            )  # fmt: skip
            block_class = DeepseekV2Moe
    else:
        raise ValueError(kind)
    config._experts_implementation = "eager"  # the plain loop; quiets transformers' standalone-module warning
    block = block_class(config).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.3)  # transformers leaves fused experts uninitialised, routers zero
        bias = getattr(block.gate, "e_score_correction_bias", None)
        if bias is not None:
            bias.normal_(0.0, 0.1)  # large enough to change some choices
    return block


def block_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's hidden-state output (transformers 4.x blocks also return router logits)."""
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


def block_grads(block: nn.Module, first: int, count: int) -> dict[str, torch.Tensor]:
    """The block's gradients in the layer's layout, written out for the fused 5.x experts.

    gate_up_proj [E, 2I, D] -> w1 = gate rows, w3 = up rows, transposed to [D, I];
    down_proj [E, D, I] -> w2 [I, D]; MLP Linear weights [out, in] -> [in, out].
    """
    gate_up, down = block.experts.gate_up_proj.grad, block.experts.down_proj.grad
    hidden = gate_up.shape[1] // 2
    local = slice(first, first + count)
    grads = {
        "router.weight": block.gate.weight.grad,
        "experts.w1": gate_up[local, :hidden].transpose(1, 2),
        "experts.w3": gate_up[local, hidden:].transpose(1, 2),
        "experts.w2": down[local].transpose(1, 2),
    }
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    if shared is not None:
        grads["shared_experts.w1"] = shared.gate_proj.weight.grad.t()
        grads["shared_experts.w3"] = shared.up_proj.weight.grad.t()
        grads["shared_experts.w2"] = shared.down_proj.weight.grad.t()
    if getattr(block, "shared_expert_gate", None) is not None:
        grads["shared_experts.gate"] = block.shared_expert_gate.weight.grad[0]
    return grads
