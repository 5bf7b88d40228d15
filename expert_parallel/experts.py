"""The local experts of one rank, as stacked weights run over rows grouped by expert.

Legend: R rows (grouped by local expert), D d_model, H d_hidden, O d_out,
e local experts; `rows_per_expert` is the host list of group sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swiglu": F.silu}


class _GroupedLinear(torch.autograd.Function):
    """y_g = x_g @ w[g] + b[g] for each contiguous group g of rows.

    One GEMM per non-empty group, written into one output; the backward writes
    each expert's weight gradient straight into its slice, with no
    full-size zero tensor per expert as indexing w[g] under autograd would make.
    """

    @staticmethod
    def forward(ctx, x_RI: Tensor, w_eIJ: Tensor, b_eJ: Tensor | None, rows_per_expert: list[int]) -> Tensor:
        ctx.save_for_backward(x_RI, w_eIJ)
        ctx.rows_per_expert = rows_per_expert
        ctx.has_bias = b_eJ is not None
        y_RJ = x_RI.new_empty((x_RI.shape[0], w_eIJ.shape[2]))
        groups = zip(x_RI.split(rows_per_expert), y_RJ.split(rows_per_expert))
        for g, (x_gI, y_gJ) in enumerate(groups):
            if x_gI.shape[0] == 0:
                continue
            if b_eJ is None:
                torch.mm(x_gI, w_eIJ[g], out=y_gJ)
            else:
                torch.addmm(b_eJ[g], x_gI, w_eIJ[g], out=y_gJ)
        return y_RJ

    @staticmethod
    def backward(ctx, dy_RJ: Tensor):
        x_RI, w_eIJ = ctx.saved_tensors
        rows = ctx.rows_per_expert
        # NOTE: contiguous, since an upstream sum() hands in an expanded (stride-0) gradient.
        dy_RJ = dy_RJ.contiguous()
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        dx_RI = torch.empty_like(x_RI) if want_x else None
        dw_eIJ = torch.empty_like(w_eIJ) if want_w else None
        db_eJ = dy_RJ.new_empty((w_eIJ.shape[0], w_eIJ.shape[2])) if want_b and ctx.has_bias else None
        dx_groups = dx_RI.split(rows) if want_x else [None] * len(rows)
        for g, (x_gI, dy_gJ, dx_gI) in enumerate(zip(x_RI.split(rows), dy_RJ.split(rows), dx_groups)):
            if x_gI.shape[0] == 0:  # an expert with no rows: its gradient is zero
                for grad in (dw_eIJ, db_eJ):
                    if grad is not None:
                        grad[g].zero_()
                continue
            if dx_gI is not None:
                torch.mm(dy_gJ, w_eIJ[g].t(), out=dx_gI)
            if dw_eIJ is not None:
                torch.mm(x_gI.t(), dy_gJ, out=dw_eIJ[g])
            if db_eJ is not None:
                torch.sum(dy_gJ, dim=0, out=db_eJ[g])
        return dx_RI, dw_eIJ, db_eJ, None


def grouped_linear(x_RI: Tensor, w_eIJ: Tensor, b_eJ: Tensor | None, rows_per_expert: list[int]) -> Tensor:
    if sum(rows_per_expert) != x_RI.shape[0] or len(rows_per_expert) != w_eIJ.shape[0]:
        raise ValueError(
            f"grouped_linear: {len(rows_per_expert)} groups of {sum(rows_per_expert)} rows "
            f"for {w_eIJ.shape[0]} experts and {x_RI.shape[0]} rows"
        )
    return _GroupedLinear.apply(x_RI, w_eIJ, b_eJ, rows_per_expert)


class Experts(nn.Module):
    """e experts with stacked weights: w1 [e, D, H], b1 [e, H], w2 [e, H, O], b2 [e, O];
    swiglu adds w3 [e, D, H] (and b3 [e, H] with biases): out = (silu(x@w1) * (x@w3)) @ w2.
    """

    def __init__(self, config: MoEConfig, num_local_experts: int):
        super().__init__()
        e, d, h, o = num_local_experts, config.d_model, config.d_hidden, config.d_out
        self.num_local_experts = e
        self.activation = config.activation
        self.w1 = nn.Parameter(torch.empty(e, d, h))
        self.w2 = nn.Parameter(torch.empty(e, h, o))
        self.w3 = nn.Parameter(torch.empty(e, d, h)) if config.activation == "swiglu" else None
        self.b1 = nn.Parameter(torch.empty(e, h)) if config.bias else None
        self.b2 = nn.Parameter(torch.empty(e, o)) if config.bias else None
        self.b3 = nn.Parameter(torch.empty(e, h)) if config.bias and self.w3 is not None else None

    def forward(self, x_RD: Tensor, rows_per_expert: list[int]) -> Tensor:
        h_RH = _ACTIVATIONS[self.activation](grouped_linear(x_RD, self.w1, self.b1, rows_per_expert))
        if self.w3 is not None:
            h_RH = h_RH * grouped_linear(x_RD, self.w3, self.b3, rows_per_expert)
        return grouped_linear(h_RH, self.w2, self.b2, rows_per_expert)

    @torch.no_grad()
    def reset_expert(self, local_id: int, generator: torch.Generator) -> None:
        """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for one expert."""
        fan_in = {"w1": self.w1.shape[1], "w3": self.w1.shape[1], "w2": self.w2.shape[1]}
        for name in ("w1", "b1", "w3", "b3", "w2", "b2"):
            param = getattr(self, name)
            if param is not None:
                bound = 1.0 / math.sqrt(fan_in["w" + name[1]])
                uniform_(param[local_id], bound, generator)


def uniform_(tensor: Tensor, bound: float, generator: torch.Generator) -> None:
    """Fill from a CPU generator, so the values do not depend on the device or layout."""
    values = torch.empty(tensor.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    tensor.copy_(values)
