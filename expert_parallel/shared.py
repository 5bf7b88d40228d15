"""Shared experts: the always-on experts every token passes through, replicated on every rank.

Legend: T tokens, D d_model, H shared hidden width (num_shared_experts * d_shared_hidden), O d_out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import MoEConfig
from .experts import Activation, NormalInit, normal_, uniform_


class SharedExperts(nn.Module):
    """One dense feed-forward of width H = num_shared_experts * d_shared_hidden.

    NOTE: n experts of width h on every token sum to one feed-forward of width
    n * h (the down projection adds their outputs), so they run as one GEMM.
    Weights as the routed experts', unstacked: w1 [D, H], w3 [D, H] (gated),
    w2 [H, O], biases b1, b3 [H], b2 [O] when config.bias.
    With config.shared_expert_gate, `gate` [D] scales the output by sigmoid(x @ gate)
    (Qwen2-MoE).
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        d, h, o = config.d_model, config.shared_hidden, config.d_out
        self.activation = Activation.of(config)
        self.w1 = nn.Parameter(torch.empty(d, h))
        self.w2 = nn.Parameter(torch.empty(h, o))
        self.w3 = nn.Parameter(torch.empty(d, h)) if self.activation.gated else None
        self.b1 = nn.Parameter(torch.empty(h)) if config.bias else None
        self.b2 = nn.Parameter(torch.empty(o)) if config.bias else None
        self.b3 = nn.Parameter(torch.empty(h)) if config.bias and self.w3 is not None else None
        self.gate = nn.Parameter(torch.empty(d)) if config.shared_expert_gate else None

    def forward(self, x_TD: Tensor) -> Tensor:
        u_TH = _linear(x_TD, self.w3, self.b3) if self.w3 is not None else None
        y_TO = _linear(self.activation(_linear(x_TD, self.w1, self.b1), u_TH), self.w2, self.b2)
        if self.gate is not None:
            y_TO = torch.sigmoid(x_TD @ self.gate.to(x_TD.dtype)).unsqueeze(-1) * y_TO
        return y_TO

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator, init: NormalInit | None = None) -> None:
        """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from `generator`; with
        `init`, the routed experts' normal distributions (the gate as w1)."""
        from_input = 1.0 / math.sqrt(self.w1.shape[0])
        from_hidden = 1.0 / math.sqrt(self.w2.shape[0])
        for name in ("w1", "b1", "w3", "b3", "w2", "b2", "gate"):
            param = getattr(self, name)
            if param is None:
                continue
            if init is None:
                uniform_(param, from_hidden if name in ("w2", "b2") else from_input, generator)
            else:
                normal_(param, init.std_of("w1" if name == "gate" else name), generator)


def _linear(x: Tensor, w_IJ: Tensor, b_J: Tensor | None) -> Tensor:
    # matmul rather than F.linear: the weights are stored [in, out] like the routed experts'.
    w_IJ = w_IJ.to(x.dtype)
    return x @ w_IJ if b_J is None else torch.addmm(b_J.to(x.dtype), x, w_IJ)
