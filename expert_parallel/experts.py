"""The local experts of one rank, as stacked weights run over rows grouped by expert.

Legend: R rows (grouped by local expert), D d_model, H d_hidden, O d_out,
e local experts; I, J the input and output widths of one grouped linear;
`rows_per_expert` is the host list of group sizes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import GATED_ACTIVATIONS, GEMMS, MoEConfig
from .materialize import holds, write_held

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swiglu": F.silu}

# torch >= 2.8 has torch._grouped_mm; later releases name it F.grouped_mm.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _groups(rows_per_expert: list[int], *tensors: Tensor | None):
    """(g, each tensor's rows of group g) for the groups with rows; None stays None."""
    splits = [t.split(rows_per_expert) if t is not None else None for t in tensors]
    for g, num_rows in enumerate(rows_per_expert):
        if num_rows:
            yield g, *(parts[g] if parts is not None else None for parts in splits)


def _check_groups(who: str, rows_per_expert: list[int], num_rows: int, num_experts: int) -> None:
    if sum(rows_per_expert) != num_rows or len(rows_per_expert) != num_experts:
        raise ValueError(
            f"{who}: {len(rows_per_expert)} groups of {sum(rows_per_expert)} rows "
            f"for {num_experts} experts and {num_rows} rows"
        )


def _linear_into(out_gJ: Tensor, x_gI: Tensor, w_IJ: Tensor, b_J: Tensor | None) -> None:
    if b_J is None:
        torch.mm(x_gI, w_IJ, out=out_gJ)
    else:
        torch.addmm(b_J, x_gI, w_IJ, out=out_gJ)


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
        for g, x_gI, y_gJ in _groups(rows_per_expert, x_RI, y_RJ):
            _linear_into(y_gJ, x_gI, w_eIJ[g], None if b_eJ is None else b_eJ[g])
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


_ACTIVATION_BACKWARD = {  # d act(a) / d a applied to a gradient: the kernels autograd itself runs
    "relu": lambda grad, a: torch.ops.aten.threshold_backward(grad, a, 0),
    "gelu": lambda grad, a: torch.ops.aten.gelu_backward(grad, a),
    "silu": lambda grad, a: torch.ops.aten.silu_backward(grad, a),
    "swiglu": lambda grad, a: torch.ops.aten.silu_backward(grad, a),
}


@dataclass(frozen=True)
class Activation:
    """The experts' nonlinearity on a = x @ w1 + b1 and, when gated, u = x @ w3 + b3.

    "relu", "gelu", "silu": h = act(a). Gated, h = act(a) * lift(u):
    "swiglu": act = silu, lift(u) = u;
    "clamped_swiglu" (GPT-OSS): act(a) = c * sigmoid(alpha * c) with c = min(a, limit),
    lift(u) = clamp(u, -limit, limit) + 1.
    The backward methods run the kernels autograd runs for the forward ones,
    so the fused MLP's gradients equal the unfused path's bit for bit.
    """

    name: str
    alpha: float | None = None
    limit: float | None = None

    @staticmethod
    def of(config: MoEConfig) -> Activation:
        return Activation(config.activation, config.swiglu_alpha, config.swiglu_limit)

    @property
    def gated(self) -> bool:
        return self.name in GATED_ACTIVATIONS

    @property
    def output_gives_gradient(self) -> bool:
        """Whether act's gradient can be read off act(a) as well as off a: relu's mask a > 0 is
        act(a) > 0, so the fused MLP keeps relu(a) in place of a and recomputes nothing."""
        return self.name == "relu"

    def __call__(self, a: Tensor, u: Tensor | None = None) -> Tensor:
        h = self.act(a)
        return h if u is None else h * self.lift(u)

    def act(self, a: Tensor) -> Tensor:
        if self.name != "clamped_swiglu":
            return _ACTIVATIONS[self.name](a)
        c = a.clamp(max=self.limit)
        return c * torch.sigmoid(c * self.alpha)

    def lift(self, u: Tensor) -> Tensor:
        return u if self.name != "clamped_swiglu" else u.clamp(-self.limit, self.limit) + 1

    def act_backward(self, grad: Tensor, a: Tensor) -> Tensor:
        """d act(a) / d a applied to `grad`."""
        if self.name != "clamped_swiglu":
            return _ACTIVATION_BACKWARD[self.name](grad, a)
        c = a.clamp(max=self.limit)
        s = torch.sigmoid(c * self.alpha)
        # The two paths into c (the product and the sigmoid's input) add up, in either order alike.
        dc = grad * s + torch.ops.aten.sigmoid_backward(grad * c, s) * self.alpha
        return torch.where(a <= self.limit, dc, 0)  # NOTE: zero where clamped, as clamp's own backward

    def lift_backward(self, grad: Tensor, u: Tensor) -> Tensor:
        """d lift(u) / d u applied to `grad`."""
        if self.name != "clamped_swiglu":
            return grad
        return torch.where((u >= -self.limit) & (u <= self.limit), grad, 0)


class _ExpertMLP(torch.autograd.Function):
    """out_g = activation(x_g @ w1[g] + b1[g] [, x_g @ w3[g] + b3[g]]) @ w2[g] + b2[g], one expert at a time.

    The same GEMMs as three _LoopLinear calls, but the hidden activations
    live one expert at a time: the forward keeps only the pre-activations
    a [R, H] (and u [R, H] when gated), and the backward rebuilds each
    expert's act(a) and runs its gradients through [rows of g, H] buffers.
    relu keeps h = relu(a) instead, written over a in place: its backward
    needs only h > 0, so nothing is recomputed (the same bits either way).
    NOTE: the unfused path holds act(a), and in the backward dh and da, for
    all local experts at once: 2-4 more [R, H] tensors at the peak.

    Weights in another dtype than x's (fp32 parameters under bf16 autocast)
    are cast one expert at a time, just before its GEMMs, into one stack of
    x's dtype that the backward reuses; each expert's weight gradient is
    cast back into its fp32 slice as soon as it is computed. The values are
    those of casting the whole stacks first (as the unfused path does); each
    cast touches what the next GEMM reads just before it reads it, and no
    gradient stack exists in both dtypes. (Measured on an AVX2 CPU, where
    bf16 GEMMs dominate: no change in step time; BENCHMARKS "At the floor".)
    """

    @staticmethod
    def forward(ctx, x_RD, rows_per_expert, activation, w1_eDH, b1_eH, w3_eDH, b3_eH, w2_eHO, b2_eO):
        num_rows, hidden = x_RD.shape[0], w1_eDH.shape[2]
        a_RH = x_RD.new_empty((num_rows, hidden))
        u_RH = x_RD.new_empty((num_rows, hidden)) if w3_eDH is not None else None
        y_RO = x_RD.new_empty((num_rows, w2_eHO.shape[2]))
        weights = _StacksIn(x_RD.dtype, w1_eDH, b1_eH, w3_eDH, b3_eH, w2_eHO, b2_eO)
        for g, x_gD, a_gH, y_gO, u_gH in _groups(rows_per_expert, x_RD, a_RH, y_RO, u_RH):
            w1, b1, w3, b3, w2, b2 = weights.expert(g)
            _linear_into(a_gH, x_gD, w1, b1)
            if u_gH is not None:
                _linear_into(u_gH, x_gD, w3, b3)
            h_gH = a_gH.relu_() if activation.output_gives_gradient else activation(a_gH, u_gH)
            _linear_into(y_gO, h_gH, w2, b2)
        w1_eDH, _, w3_eDH, _, w2_eHO, _ = weights.stacks
        ctx.save_for_backward(x_RD, a_RH, u_RH, w1_eDH, w3_eDH, w2_eHO)
        ctx.rows_per_expert, ctx.activation = rows_per_expert, activation
        ctx.has_bias, ctx.grad_dtype = b1_eH is not None, weights.given_dtype
        return y_RO

    @staticmethod
    def backward(ctx, dy_RO: Tensor):
        with torch.autocast(dy_RO.device.type, enabled=False):  # a backward run inside autocast
            return _ExpertMLP._backward(ctx, dy_RO)

    @staticmethod
    def _backward(ctx, dy_RO: Tensor):
        x_RD, a_RH, u_RH, w1_eDH, w3_eDH, w2_eHO = ctx.saved_tensors
        rows, activation = ctx.rows_per_expert, ctx.activation
        dy_RO = dy_RO.contiguous()  # NOTE: an upstream sum() hands in an expanded (stride-0) gradient
        want_x = ctx.needs_input_grad[0]
        want = dict(zip(("w1", "b1", "w3", "b3", "w2", "b2"), ctx.needs_input_grad[3:]))
        gated, bias = w3_eDH is not None, ctx.has_bias
        dx_RD = torch.empty_like(x_RD) if want_x else None
        # Weight gradients, in the parameters' dtype: each expert's slice written once (through
        # _Into when that dtype is not the GEMMs'); experts with no rows zeroed at the end.
        into = _Into(ctx.grad_dtype, x_RD)
        dw1 = into.stack(w1_eDH.shape) if want["w1"] else None
        dw2 = into.stack(w2_eHO.shape) if want["w2"] else None
        dw3 = into.stack(w3_eDH.shape) if gated and want["w3"] else None
        db1 = into.stack(w1_eDH.shape[::2]) if bias and want["b1"] else None
        db2 = into.stack(w2_eHO.shape[::2]) if bias and want["b2"] else None
        db3 = into.stack(w1_eDH.shape[::2]) if bias and gated and want["b3"] else None
        for g, x_gD, a_gH, dy_gO, u_gH, dx_gD in _groups(rows, x_RD, a_RH, dy_RO, u_RH, dx_RD):
            # NOTE: with output_gives_gradient, a_gH holds act(a) already, and act_backward reads it.
            act_gH = a_gH if activation.output_gives_gradient else activation.act(a_gH)
            lift_gH = activation.lift(u_gH) if gated else None
            h_gH = act_gH * lift_gH if gated else act_gH
            if dw2 is not None:
                into.mm(dw2[g], h_gH.t(), dy_gO)
            if db2 is not None:
                into.sum(db2[g], dy_gO)
            dh_gH = torch.mm(dy_gO, w2_eHO[g].t())
            du_gH = None
            if gated:
                du_gH = activation.lift_backward(dh_gH * act_gH, u_gH)
                dh_gH = dh_gH * lift_gH
            da_gH = activation.act_backward(dh_gH, a_gH)
            if dw1 is not None:
                into.mm(dw1[g], x_gD.t(), da_gH)
            if db1 is not None:
                into.sum(db1[g], da_gH)
            if dw3 is not None:
                into.mm(dw3[g], x_gD.t(), du_gH)
            if db3 is not None:
                into.sum(db3[g], du_gH)
            if dx_gD is not None:
                torch.mm(da_gH, w1_eDH[g].t(), out=dx_gD)
                if gated:
                    dx_gD.addmm_(du_gH, w3_eDH[g].t())
        empty = [g for g, n in enumerate(rows) if n == 0]
        for grad_stack in (dw1, db1, dw3, db3, dw2, db2):
            if grad_stack is not None and empty:
                grad_stack[empty] = 0
        return dx_RD, None, None, dw1, db1, dw3, db3, dw2, db2


class _StacksIn:
    """The experts' weight stacks in the GEMMs' dtype, cast one expert at a time as it is used.

    Stacks already in that dtype are used as they are (no copy); the others are
    cast, expert g's slices on `expert(g)`, into new stacks of that dtype (`stacks`:
    what the backward reads; an expert with no rows keeps uninitialised slices,
    which the backward never reads).
    """

    def __init__(self, dtype: torch.dtype, *stacks: Tensor | None):
        self.given_dtype = next(t.dtype for t in stacks if t is not None)
        self.given = stacks
        self.stacks = tuple(
            t if t is None or t.dtype == dtype else torch.empty(t.shape, dtype=dtype, device=t.device)
            for t in stacks
        )

    def expert(self, g: int) -> tuple[Tensor | None, ...]:
        """Expert g's (w1, b1, w3, b3, w2, b2) in the GEMMs' dtype."""
        out = []
        for given, stack in zip(self.given, self.stacks):
            if stack is not None and stack is not given:
                stack[g].copy_(given[g])
            out.append(None if stack is None else stack[g])
        return tuple(out)


class _Into:
    """Writes a gradient computed in the GEMMs' dtype into a slice of the parameters' dtype.

    In the same dtype the product or sum goes straight into the slice;
    otherwise through one scratch buffer per shape, then cast into the slice
    (the same values as computing the whole stack and casting it after).
    """

    def __init__(self, grad_dtype: torch.dtype, like: Tensor):
        self.grad_dtype, self.compute_dtype, self.device = grad_dtype, like.dtype, like.device
        self.scratch: dict[tuple, Tensor] = {}

    def stack(self, shape: torch.Size) -> Tensor:
        return torch.empty(shape, dtype=self.grad_dtype, device=self.device)

    def _out(self, into: Tensor) -> Tensor:
        if self.grad_dtype == self.compute_dtype:
            return into
        key = tuple(into.shape)
        if key not in self.scratch:
            self.scratch[key] = torch.empty(key, dtype=self.compute_dtype, device=self.device)
        return self.scratch[key]

    def mm(self, into: Tensor, a: Tensor, b: Tensor) -> None:
        out = self._out(into)
        torch.mm(a, b, out=out)
        if out is not into:
            into.copy_(out)

    def sum(self, into: Tensor, rows: Tensor) -> None:
        out = self._out(into)
        torch.sum(rows, dim=0, out=out)
        if out is not into:
            into.copy_(out)


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
    (addmm). Measured with `python -m benchmarks.bench_gemm` on one thread of an
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
    _check_groups("grouped_linear", rows_per_expert, x_RI.shape[0], w_eIJ.shape[0])
    if gemm not in GEMMS:
        raise ValueError(f"grouped_linear: gemm={gemm!r}, expected one of {GEMMS}")
    x_RI, w_eIJ, b_eJ = _in_autocast_dtype(x_RI, w_eIJ, b_eJ)
    function = _GroupedMMLinear if _use_grouped_mm(x_RI, w_eIJ, gemm) else _LoopLinear
    with torch.autocast(x_RI.device.type, enabled=False):
        return function.apply(x_RI, w_eIJ, b_eJ, rows_per_expert)


def _in_autocast_dtype(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under autocast, the tensors cast (differentiably) to the autocast dtype, as nn.Linear's would be."""
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None else None for t in tensors)


def _use_grouped_mm(x_RI: Tensor, w_eIJ: Tensor, gemm: str) -> bool:
    """gemm "grouped_mm": True (a ValueError where it cannot take the operands); "loop": False;
    "auto": where it fits and was measured faster."""
    if gemm == "loop":
        return False
    fits = grouped_mm_fits(x_RI, w_eIJ)
    if gemm == "grouped_mm" and not fits:
        raise ValueError(
            f"grouped_linear: grouped_mm cannot take x {tuple(x_RI.shape)} {x_RI.dtype} and "
            f"w {tuple(w_eIJ.shape)} {w_eIJ.dtype} (it needs a torch that has it, fp32/bf16/fp16, "
            f"contiguous operands, widths a multiple of {16 // x_RI.element_size()})"
        )
    return fits and (gemm == "grouped_mm" or _grouped_mm_is_faster(x_RI.device, x_RI.dtype))


class Experts(nn.Module):
    """e experts with stacked weights: w1 [e, D, H], b1 [e, H], w2 [e, H, O], b2 [e, O];
    a gated activation adds w3 [e, D, H] (and b3 [e, H] with biases), e.g. swiglu:
    out = (silu(x@w1) * (x@w3)) @ w2 (see Activation).

    `gemm` ("auto", "loop" or "grouped_mm") picks grouped_linear's kernel; a
    plain attribute, so that a benchmark or test can set it on a built layer.
    Where the loop is picked, the whole expert MLP runs one expert at a time
    (_ExpertMLP), so its hidden activations never exist for all experts at once.
    """

    def __init__(self, config: MoEConfig, num_local_experts: int, gemm: str = "auto"):
        super().__init__()
        if gemm not in GEMMS:
            raise ValueError(f"Experts: gemm={gemm!r}, expected one of {GEMMS}")
        e, d, h, o = num_local_experts, config.d_model, config.d_hidden, config.d_out
        self.num_local_experts = e
        self.activation = Activation.of(config)
        self.gemm = gemm
        self.w1 = nn.Parameter(torch.empty(e, d, h))
        self.w2 = nn.Parameter(torch.empty(e, h, o))
        self.w3 = nn.Parameter(torch.empty(e, d, h)) if self.activation.gated else None
        self.b1 = nn.Parameter(torch.empty(e, h)) if config.bias else None
        self.b2 = nn.Parameter(torch.empty(e, o)) if config.bias else None
        self.b3 = nn.Parameter(torch.empty(e, h)) if config.bias and self.w3 is not None else None
        self.register_module("lora", None)  # a low-rank adapter on the weights: lora.ExpertLoRA

    def weights(self) -> tuple[Tensor | None, ...]:
        """(w1, b1, w3, b3, w2, b2) as the experts apply them, None where absent (the order forward's
        `borrowed` takes): with a LoRA adapter, W + scaling * A @ B."""
        weights = (self.w1, self.b1, self.w3, self.b3, self.w2, self.b2)
        return weights if self.lora is None else self.lora.adapt(*weights)

    def forward(
        self, x_RD: Tensor, rows_per_expert: list[int] | None, borrowed: tuple | None = None
    ) -> Tensor:
        """y [R, O] for rows x [R, D] grouped by expert, `rows_per_expert` of them each (host ints);
        or, with rows_per_expert None, x [e, C, D]: each expert's C rows padded (`padded`).

        `borrowed`: another rank's experts lent for this call (balanced dispatch), as
        (w1, b1, w3, b3, w2, b2) of b stacked experts each (None where absent); then
        rows_per_expert has e + b entries, the local experts' rows first."""
        if rows_per_expert is None:
            return self.padded(x_RD)
        if borrowed is not None:
            e = self.num_local_experts
            local_rows = sum(rows_per_expert[:e])
            return torch.cat(
                [
                    self._run(x_RD[:local_rows], rows_per_expert[:e], self.weights()),
                    self._run(x_RD[local_rows:], rows_per_expert[e:], borrowed),
                ]
            )
        return self._run(x_RD, rows_per_expert, self.weights())

    def _run(self, x_RD: Tensor, rows_per_expert: list[int], weights: tuple) -> Tensor:
        _check_groups("Experts", rows_per_expert, x_RD.shape[0], weights[0].shape[0])
        (x_RD,) = _in_autocast_dtype(x_RD)
        if self.gemm == "grouped_mm" or (
            self.gemm == "auto" and _grouped_mm_is_faster(x_RD.device, x_RD.dtype)
        ):
            cast = _in_autocast_dtype(*weights)
            if _use_grouped_mm(x_RD, cast[0], self.gemm):
                return self.unfused(x_RD, rows_per_expert, cast)
        # NOTE: under autocast the weights go in uncast: _ExpertMLP casts each expert's as it runs it.
        if torch.is_autocast_enabled(x_RD.device.type) or weights[0].dtype == x_RD.dtype:
            with torch.autocast(x_RD.device.type, enabled=False):
                return _ExpertMLP.apply(x_RD, rows_per_expert, self.activation, *weights)
        raise TypeError(f"Experts: rows in {x_RD.dtype}, weights in {weights[0].dtype} (outside autocast)")

    def unfused(self, x_RD: Tensor, rows_per_expert: list[int], weights: list | None = None) -> Tensor:
        """The same function as one grouped_linear per weight: grouped_mm's path, and the loop's
        reference in tests. `weights`: (w1, b1, w3, b3, w2, b2), `self.weights()` by default."""
        w1, b1, w3, b3, w2, b2 = weights or self.weights()

        def linear(x_RI: Tensor, w_eIJ: Tensor, b_eJ: Tensor | None) -> Tensor:
            return grouped_linear(x_RI, w_eIJ, b_eJ, rows_per_expert, self.gemm)

        u_RH = linear(x_RD, w3, b3) if w3 is not None else None
        return linear(self.activation(linear(x_RD, w1, b1), u_RH), w2, b2)

    def padded(self, x_eCD: Tensor) -> Tensor:
        """[e, C, D] -> [e, C, O]: every expert over its C rows (padding included) as batched GEMMs.

        Static shapes, for torch.compile's capacity path; equal to the loop to rounding.
        """
        x_eCD, w1, b1, w3, b3, w2, b2 = _in_autocast_dtype(x_eCD, *self.weights())

        def linear(x_eCI: Tensor, w_eIJ: Tensor, b_eJ: Tensor | None) -> Tensor:
            if b_eJ is None:
                return torch.bmm(x_eCI, w_eIJ)
            return torch.baddbmm(b_eJ.unsqueeze(1), x_eCI, w_eIJ)

        u_eCH = linear(x_eCD, w3, b3) if w3 is not None else None
        return linear(self.activation(linear(x_eCD, w1, b1), u_eCH), w2, b2)

    @torch.no_grad()
    def reset_expert(self, local_id: int, generator: torch.Generator, init: NormalInit | None = None) -> None:
        """One expert's initial values: nn.Linear's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        or with `init` its normal distributions (NormalInit).

        Only what this rank holds of it is written (materialize.write_held);
        an expert it holds none of (sharded by FSDP over dim 0) draws nothing.
        """
        if not holds(self.w1, local_id):
            return
        fan_in = {"w1": self.w1.shape[1], "w3": self.w1.shape[1], "w2": self.w2.shape[1]}
        for name in ("w1", "b1", "w3", "b3", "w2", "b2"):
            param = getattr(self, name)
            if param is None:
                continue
            if init is None:
                uniform_(param, 1.0 / math.sqrt(fan_in["w" + name[1]]), generator, index=local_id)
            else:
                normal_(param, init.std_of(name), generator, index=local_id)

    def extra_repr(self) -> str:
        return f"{self.num_local_experts} experts, {self.activation.name}, gemm={self.gemm}"


@dataclass(frozen=True)
class NormalInit:
    """A feed-forward's init inside a residual stream, GPT-2's: the weights into the hidden layer
    (w1, w3) ~ N(0, std), the weights back into the stream (w2) ~ N(0, out_std), biases 0, and the
    router ~ N(0, router_std) (its bias 0).

    NOTE: why not nn.Linear's bound inside a model: with it, the tiny model's MoE layers add
    about seven times what its GPT-2-initialised dense blocks add to the residual stream, and
    the MoE then spends its first steps on a plateau (docs/configuration.md#initialisation).
    """

    std: float
    out_std: float
    router_std: float

    def std_of(self, name: str) -> float:
        """The standard deviation of a parameter named w1, w3, w2 (or a bias: 0)."""
        if name.startswith("b"):
            return 0.0
        return self.out_std if name == "w2" else self.std


def uniform_(tensor: Tensor, bound: float, generator: torch.Generator, index: int | None = None) -> None:
    """Fill `tensor` (or `tensor[index]`) from a CPU generator, so the values do not depend on the
    device or layout; of a sharded or meta tensor only what this rank holds (materialize.write_held)."""
    if tensor.is_meta:
        return
    shape = tensor.shape if index is None else tensor.shape[1:]
    values = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    write_held(tensor, values, index)


def normal_(tensor: Tensor, std: float, generator: torch.Generator, index: int | None = None) -> None:
    """As `uniform_`, from N(0, std) (std 0: zeros, with no draw)."""
    if tensor.is_meta:
        return
    shape = tensor.shape if index is None else tensor.shape[1:]
    values = torch.zeros(shape, dtype=torch.float32)
    if std > 0:
        values.normal_(0.0, std, generator=generator)
    write_held(tensor, values, index)
