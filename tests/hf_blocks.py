"""Hugging Face blocks run expert-parallel; tests/test_hf.py runs this on 2 gloo ranks.

Also the home of the tiny random blocks that test_hf.py uses on one process.
For each of Mixtral, Qwen2-MoE and DeepSeek-V3, and each dispatch mode: every rank builds the same
block and the same input, then checks that the layer from `from_hf_block`
gives, on this rank's own slice of the tokens, the block's output for those
tokens; that the input gradient matches on those tokens; that each local
expert's weight gradient equals the block's (the block sees every rank's
tokens, as the expert owner does); that the replicated router and shared
experts' gradients, summed over ranks, equal the block's; and that
`copy_to_hf_block(gather=True)` rebuilds the whole block on every rank.
Failures are collected, and the ranks agree on the verdict at the end.
"""

from __future__ import annotations

import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

TOL = 1e-5
KINDS = ("mixtral", "qwen2_moe", "deepseek_v3")
DISPATCHES = ("per_assignment", "once_per_rank")  # MoEConfig.dispatch


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


def check_block(kind: str, dispatch: str, group, failures: list[str], measured: dict[str, float]) -> None:
    from expert_parallel.hf import copy_to_hf_block, from_hf_block

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    block = build_block(kind, seed=1)
    layer = from_hf_block(block, group, dispatch=dispatch)
    torch.manual_seed(2)
    x = torch.randn(3, 11, 32)
    upstream = torch.randn(3, 11, 32)
    # Unequal slices of the 33 tokens: rank r takes its share of a 1 : 2 : ... split.
    bounds = [33 * sum(range(1, r + 1)) // sum(range(1, size + 1)) for r in range(size + 1)]
    mine = slice(bounds[rank], bounds[rank + 1])

    x_block = x.clone().requires_grad_(True)
    want = block_output(block, x_block)
    (want * upstream).sum().backward()
    x_mine = x.reshape(-1, 32)[mine].clone().requires_grad_(True)
    got = layer(x_mine)
    (got * upstream.reshape(-1, 32)[mine]).sum().backward()

    def close(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
        """allclose(rtol=atol=TOL); records max |diff|, relative to max |theirs| where that exceeds 1."""
        diff = (ours - theirs).abs().max().item() if ours.shape == theirs.shape and ours.numel() else 0.0
        measured[f"{kind} {dispatch} {name}"] = diff / max(1.0, theirs.abs().max().item())  # relative above 1
        if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=TOL, atol=TOL):
            shapes = f"shapes {tuple(ours.shape)} {tuple(theirs.shape)}"
            failures.append(f"{kind} {dispatch}: {name} max |diff| {diff:.3g} ({shapes})")

    close("output", got.detach(), want.detach().reshape(-1, 32)[mine])
    close("input grad", x_mine.grad, x_block.grad.reshape(-1, 32)[mine])
    theirs = block_grads(block, layer.first_expert, layer.num_local_experts)
    for name, param in layer.named_parameters():
        grad = param.grad
        if not name.startswith("experts."):  # replicated: each rank has its tokens' share
            grad = grad.clone()
            dist.all_reduce(grad, group=group)
        close(f"{name} grad", grad, theirs[name])

    # Back into a block of other weights: with gather, every rank's block is the original.
    other = build_block(kind, seed=3)
    copy_to_hf_block(layer, other, gather=True)
    for (name, ours), theirs in zip(other.state_dict().items(), block.state_dict().values()):
        close(f"round trip {name}", ours, theirs)


def main() -> int:
    import expert_parallel as ep

    with ep.distributed(timeout=timedelta(seconds=60)):
        group = dist.group.WORLD
        rank = dist.get_rank()
        failures: list[str] = []
        measured: dict[str, float] = {}
        for kind in KINDS:
            for dispatch in DISPATCHES:
                try:
                    check_block(kind, dispatch, group, failures, measured)
                except Exception:
                    failures.append(f"{kind} {dispatch}: {traceback.format_exc()}")
        failed = torch.tensor(len(failures))
        dist.all_reduce(failed)
        for failure in failures:
            print(f"rank {rank} FAILED {failure}", flush=True)
        for kind in KINDS:
            ours = {k: v for k, v in measured.items() if k.startswith(kind + " ")}
            output = max((v for k, v in ours.items() if k.endswith(" output")), default=float("nan"))
            grads = max((v for k, v in ours.items() if "grad" in k), default=float("nan"))
            print(f"rank {rank}: {kind}: output max |diff| {output:.2g}, grads {grads:.2g}", flush=True)
        print(f"rank {rank}: {len(measured)} comparisons, {len(failures)} failures", flush=True)
        return 1 if int(failed) else 0


if __name__ == "__main__":
    sys.exit(main())
