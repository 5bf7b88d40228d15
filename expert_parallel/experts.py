"""The local experts of one rank, as stacked weights run over rows grouped by expert.

Legend: R rows (grouped by local expert), D d_model, H d_hidden, O d_out,
e local experts; I, J the input and output widths of one grouped linear;
`rows_per_expert` is the host list of group sizes.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swiglu": F.silu}

# torch >= 2.8 has torch._grouped_mm; later releases name it F.grouped_mm.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
GEMMS = ("auto", "loop", "grouped_mm")


class _LoopLinear(torch.autograd.Function):
    """y_g = x_g @ w[g] + b[g] for each contiguous group g of rows: one GEMM per non-empty group.

    The forward fuses the bias into the GEMM (addmm) and writes into one
    output; the backward writes each expert's weight gradient straight into
    its slice, with no full-size zero tensor per expert as indexing w[g]
    under autograd would make.
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
        with torch.autocast(dy_RJ.device.type, enabled=False):  # a backward run inside autocast
            return _LoopLinear._backward(ctx, dy_RJ)

    @staticmethod
    def _backward(ctx, dy_RJ: Tensor):
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


class _GroupedMMLinear(torch.autograd.Function):
    """The same y_g = x_g @ w[g] + b[g], through torch's grouped GEMM: one call per product.

    grouped_mm takes the group ends as int32 offsets on the device and no
    bias; the bias is added per group, and its gradient is a segment sum.
    """

    @staticmethod
    def forward(ctx, x_RI: Tensor, w_eIJ: Tensor, b_eJ: Tensor | None, rows_per_expert: list[int]) -> Tensor:
        ends_e = torch.tensor(list(itertools.accumulate(rows_per_expert)), dtype=torch.int32)
        ends_e = ends_e.to(x_RI.device, non_blocking=True)
        ctx.save_for_backward(x_RI, w_eIJ, ends_e)
        ctx.rows_per_expert = rows_per_expert
        ctx.has_bias = b_eJ is not None
        y_RJ = _GROUPED_MM(x_RI, w_eIJ, offs=ends_e)
        if b_eJ is not None:
            for b_J, y_gJ in zip(b_eJ, y_RJ.split(rows_per_expert)):
                y_gJ += b_J
        return y_RJ

    @staticmethod
    def backward(ctx, dy_RJ: Tensor):
        with torch.autocast(dy_RJ.device.type, enabled=False):  # a backward run inside autocast
            return _GroupedMMLinear._backward(ctx, dy_RJ)

    @staticmethod
    def _backward(ctx, dy_RJ: Tensor):
        x_RI, w_eIJ, ends_e = ctx.saved_tensors
        rows = ctx.rows_per_expert
        # NOTE: copied to row-major strides, since an upstream sum() hands in an
        # expanded (stride-0) gradient and grouped_mm rejects a zero stride; with
        # no rows, .contiguous() would keep the zero strides.
        if dy_RJ.stride() != (dy_RJ.shape[1], 1):
            dy_RJ = dy_RJ.new_empty(dy_RJ.shape).copy_(dy_RJ)
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        dx_RI = _GROUPED_MM(dy_RJ, w_eIJ.transpose(1, 2), offs=ends_e) if want_x else None
        dw_eIJ = db_eJ = None
        if want_w:
            dw_eIJ = _GROUPED_MM(x_RI.t(), dy_RJ, offs=ends_e)
            empty = [g for g, n in enumerate(rows) if n == 0]
            if empty:  # NOTE: zeroed here, not trusting every backend to write empty groups
                dw_eIJ[empty] = 0
        if want_b and ctx.has_bias:
            db_eJ = torch.stack([dy_gJ.sum(dim=0) for dy_gJ in dy_RJ.split(rows)])
        return dx_RI, dw_eIJ, db_eJ, None


def grouped_mm_fits(x_RI: Tensor, w_eIJ: Tensor) -> bool:
    """Whether torch's grouped_mm takes these operands, forward and backward.

    It needs fp32, bf16 or fp16; row strides that are multiples of 16 bytes
    (so I and J times the element size), contiguous operands and, on CUDA,
    16-byte aligned data; offsets as int32 (made by _GroupedMMLinear).
    """
    if _GROUPED_MM is None or x_RI.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if w_eIJ.dtype != x_RI.dtype or not (x_RI.is_contiguous() and w_eIJ.is_contiguous()):
        return False
    align = 16 // x_RI.element_size()
    return (
        x_RI.shape[1] % align == 0
        and w_eIJ.shape[2] % align == 0
        and x_RI.data_ptr() % 16 == 0
        and w_eIJ.data_ptr() % 16 == 0
    )


def _grouped_mm_is_faster(device: torch.device, dtype: torch.dtype) -> bool:
    """Where grouped_mm beats the loop: the choice of gemm="auto", per device and dtype.

    NOTE: on CPU, torch's grouped_mm is its fallback, a loop of mm over the
    groups, i.e. the same kernels as ours, while ours also fuses the bias
    (addmm). Measured with `python -m launch.bench_gemm` on one thread of an
    AMD EPYC (AVX2), torch 2.14.1, forward + backward of the experts, median
    grouped_mm / loop over 7 paired rounds: fp32, R 8192 over 4 experts, D 512,
    H 2048: 0.99 (1605 vs 1620 ms; a dense GEMM of the same rows 1572 ms);
    with one expert empty 1.02; bf16, R 1024, D 128, H 512: 0.97 (212 vs
    216 ms). Equal within the host's noise (per-round ratios 0.78-1.20), so
    the CPU keeps the loop.
    On CUDA, bf16 runs a fused grouped kernel (SM >= 80), one launch for all
    experts instead of one per expert; other dtypes take the fallback loop.
    Not measured here (no GPU on this machine): chosen from torch's docs.
    """
    return device.type == "cuda" and dtype == torch.bfloat16


def grouped_linear(
    x_RI: Tensor, w_eIJ: Tensor, b_eJ: Tensor | None, rows_per_expert: list[int], gemm: str = "auto"
) -> Tensor:
    """y [R, J]: rows_per_expert[g] consecutive rows of x times w[g] (+ b[g]), forward and backward.

    gemm: "loop" (one mm per group), "grouped_mm" (torch's grouped GEMM; a
    ValueError where it cannot take the operands), or "auto": grouped_mm
    where it fits and was measured faster, else the loop.
    Under autocast, x, w and b are cast to the autocast dtype (w and b
    differentiably, so their gradients arrive in the parameters' dtype) and
    the GEMMs run in it, as nn.Linear's would.
    """
    if sum(rows_per_expert) != x_RI.shape[0] or len(rows_per_expert) != w_eIJ.shape[0]:
        raise ValueError(
            f"grouped_linear: {len(rows_per_expert)} groups of {sum(rows_per_expert)} rows "
            f"for {w_eIJ.shape[0]} experts and {x_RI.shape[0]} rows"
        )
    if gemm not in GEMMS:
        raise ValueError(f"grouped_linear: gemm={gemm!r}, expected one of {GEMMS}")
    device_type = x_RI.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x_RI, w_eIJ = x_RI.to(dtype), w_eIJ.to(dtype)
        b_eJ = b_eJ.to(dtype) if b_eJ is not None else None
    function = _LoopLinear
    if gemm != "loop":
        fits = grouped_mm_fits(x_RI, w_eIJ)
        if gemm == "grouped_mm" and not fits:
            raise ValueError(
                f"grouped_linear: grouped_mm cannot take x {tuple(x_RI.shape)} {x_RI.dtype} and "
                f"w {tuple(w_eIJ.shape)} {w_eIJ.dtype} (it needs a torch that has it, fp32/bf16/fp16, "
                f"contiguous operands, widths a multiple of {16 // x_RI.element_size()})"
            )
        if fits and (gemm == "grouped_mm" or _grouped_mm_is_faster(x_RI.device, x_RI.dtype)):
            function = _GroupedMMLinear
    with torch.autocast(device_type, enabled=False):
        return function.apply(x_RI, w_eIJ, b_eJ, rows_per_expert)


class Experts(nn.Module):
    """e experts with stacked weights: w1 [e, D, H], b1 [e, H], w2 [e, H, O], b2 [e, O];
    swiglu adds w3 [e, D, H] (and b3 [e, H] with biases): out = (silu(x@w1) * (x@w3)) @ w2.

    `gemm` ("auto", "loop" or "grouped_mm") picks grouped_linear's kernel; a
    plain attribute, so that a benchmark or test can set it on a built layer.
    """

    def __init__(self, config: MoEConfig, num_local_experts: int, gemm: str = "auto"):
        super().__init__()
        if gemm not in GEMMS:
            raise ValueError(f"Experts: gemm={gemm!r}, expected one of {GEMMS}")
        e, d, h, o = num_local_experts, config.d_model, config.d_hidden, config.d_out
        self.num_local_experts = e
        self.activation = config.activation
        self.gemm = gemm
        self.w1 = nn.Parameter(torch.empty(e, d, h))
        self.w2 = nn.Parameter(torch.empty(e, h, o))
        self.w3 = nn.Parameter(torch.empty(e, d, h)) if config.activation == "swiglu" else None
        self.b1 = nn.Parameter(torch.empty(e, h)) if config.bias else None
        self.b2 = nn.Parameter(torch.empty(e, o)) if config.bias else None
        self.b3 = nn.Parameter(torch.empty(e, h)) if config.bias and self.w3 is not None else None

    def forward(self, x_RD: Tensor, rows_per_expert: list[int]) -> Tensor:
        def linear(x_RI: Tensor, w_eIJ: Tensor, b_eJ: Tensor | None) -> Tensor:
            return grouped_linear(x_RI, w_eIJ, b_eJ, rows_per_expert, self.gemm)

        h_RH = _ACTIVATIONS[self.activation](linear(x_RD, self.w1, self.b1))
        if self.w3 is not None:
            h_RH = h_RH * linear(x_RD, self.w3, self.b3)
        return linear(h_RH, self.w2, self.b2)

    @torch.no_grad()
    def reset_expert(self, local_id: int, generator: torch.Generator) -> None:
        """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for one expert."""
        fan_in = {"w1": self.w1.shape[1], "w3": self.w1.shape[1], "w2": self.w2.shape[1]}
        for name in ("w1", "b1", "w3", "b3", "w2", "b2"):
            param = getattr(self, name)
            if param is not None:
                bound = 1.0 / math.sqrt(fan_in["w" + name[1]])
                uniform_(param[local_id], bound, generator)

    def extra_repr(self) -> str:
        return f"{self.num_local_experts} experts, {self.activation}, gemm={self.gemm}"


def uniform_(tensor: Tensor, bound: float, generator: torch.Generator) -> None:
    """Fill from a CPU generator, so the values do not depend on the device or layout."""
    values = torch.empty(tensor.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    tensor.copy_(values)
