"""The two designs this project started from (shared/seeds), written out as small reference modules.

SimpleMoE: linear gate with bias, top-k over the logits, softmax over the k
chosen logits, experts Linear(d, h) -> ReLU -> Linear(h, d), output =
sum of weight * expert(x), one boolean-mask pass per expert.
ExpertRouterMoE: softmax over all experts, top-1, `dispatch` hands each
expert its tokens, `combine` writes each expert's output back unweighted;
the output width may differ from the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _expert(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class SimpleMoE(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_hidden: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.experts = nn.ModuleList(_expert(d_model, d_hidden, d_model) for _ in range(num_experts))
        self.gate = nn.Linear(d_model, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top_logits, top_ids = torch.topk(self.gate(x), self.top_k, dim=-1)
        top_weights = F.softmax(top_logits, dim=-1)
        out = torch.zeros_like(x)
        for expert_id, expert in enumerate(self.experts):
            chosen = top_ids == expert_id  # [T, k]
            rows = chosen.any(dim=-1)
            if rows.any():
                weight = (top_weights * chosen).sum(dim=-1)[rows]
                out[rows] += expert(x[rows]) * weight.unsqueeze(-1)
        return out


class ExpertRouterMoE(nn.Module):
    def __init__(self, d_model: int, d_out: int, num_experts: int, d_hidden: int):
        super().__init__()
        self.d_out = d_out
        self.experts = nn.ModuleList(_expert(d_model, d_hidden, d_out) for _ in range(num_experts))
        self.gate = nn.Linear(d_model, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen_T = F.softmax(self.gate(x), dim=1).argmax(dim=1)
        out = x.new_zeros(x.shape[0], self.d_out)
        for expert_id, expert in enumerate(self.experts):
            rows = chosen_T == expert_id
            if rows.any():
                out[rows] = expert(x[rows])
        return out


@torch.no_grad()
def load_reference(layer, reference: nn.Module) -> None:
    """Copy a reference module's gate and (the layer's share of) experts into an MoELayer."""
    layer.router.weight.copy_(reference.gate.weight)
    layer.router.bias.copy_(reference.gate.bias)
    for local_id in range(layer.num_local_experts):
        first, _, second = reference.experts[layer.first_expert + local_id]
        layer.experts.w1[local_id].copy_(first.weight.t())
        layer.experts.b1[local_id].copy_(first.bias)
        layer.experts.w2[local_id].copy_(second.weight.t())
        layer.experts.b2[local_id].copy_(second.bias)
