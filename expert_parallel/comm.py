"""Collectives on the layer's path: the autograd all-to-all, the count exchange, the start-up checks.

The only module on the layer's path that imports torch.distributed (setting
up and tearing down the process group is lifecycle.py's). Every
collective takes the group it runs on; tensors stay on the device they came
from, so gloo (CPU) and NCCL (CUDA) run the same code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank in group, group size); (0, 1) for no group."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class CollectiveError(RuntimeError):
    """A collective of the layer failed: a peer exited, crashed or stopped answering within the timeout."""


@contextmanager
def _naming_failures(what: str, group: dist.ProcessGroup) -> Iterator[None]:
    """Re-raise a failed collective as CollectiveError saying which collective and which peers."""
    try:
        yield
    except RuntimeError as err:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        peers = [dist.get_global_rank(group, r) for r in range(size) if r != rank]
        raise CollectiveError(
            f"{what} failed on global rank {dist.get_rank()} (rank {rank} of {size} in its group) "
            f"while exchanging with global ranks {peers}: one of them exited, crashed or stopped "
            f"answering within the process group's timeout. Cause: {err}"
        ) from err


@dataclass
class ExchangeClock:
    """Host seconds a layer spent in its collectives, forward and backward, since the last `reset`.

    With gloo the collectives block, so this is their wall time; with NCCL it
    is only the time to launch them.
    """

    seconds: float = 0.0

    @contextmanager
    def timing(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def reset(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its backward is the reverse exchange."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        output_splits: list[int],
        input_splits: list[int],
        group,
        what: str,
        clock: ExchangeClock,
    ) -> Tensor:
        ctx.splits = (output_splits, input_splits)
        ctx.group, ctx.what, ctx.clock = group, what, clock
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        with _naming_failures(f"MoE all-to-all ({what}, forward)", group), clock.timing():
            dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        output_splits, input_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(input_splits), *grad_out.shape[1:]))
        with _naming_failures(f"MoE all-to-all ({ctx.what}, backward)", ctx.group), ctx.clock.timing():
            dist.all_to_all_single(
                grad_in, grad_out.contiguous(), input_splits, output_splits, group=ctx.group
            )
        return grad_in, None, None, None, None, None


def all_to_all(
    x: Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group,
    what: str = "tokens",
    clock: ExchangeClock | None = None,
) -> Tensor:
    """Send x's rows split by `input_splits` to the ranks of `group`; receive `output_splits` rows."""
    return _AllToAll.apply(x, output_splits, input_splits, group, what, clock or ExchangeClock())


class _AllToAllMany(torch.autograd.Function):
    """Several all_to_all_single exchanges as one autograd node: forward in order, backward in order.

    NOTE: one node, so that every rank runs the backward's exchanges at the
    same point and in the same order, even a rank none of whose outputs but
    the first reaches the loss (its other gradients are zeros then).
    """

    @staticmethod
    def forward(ctx, splits: tuple, group, what: str, clock: ExchangeClock, *tensors: Tensor):
        ctx.splits, ctx.group, ctx.what, ctx.clock = splits, group, what, clock
        outs = []
        for x, (output_splits, input_splits) in zip(tensors, splits):
            out = x.new_empty((sum(output_splits), *x.shape[1:]))
            with _naming_failures(f"MoE all-to-all ({what}, forward)", group), clock.timing():
                dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
            outs.append(out)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs: Tensor):
        grads = []
        for grad_out, (output_splits, input_splits) in zip(grad_outs, ctx.splits):
            grad_in = grad_out.new_empty((sum(input_splits), *grad_out.shape[1:]))
            with _naming_failures(f"MoE all-to-all ({ctx.what}, backward)", ctx.group), ctx.clock.timing():
                dist.all_to_all_single(
                    grad_in, grad_out.contiguous(), input_splits, output_splits, group=ctx.group
                )
            grads.append(grad_in)
        return None, None, None, None, *grads


def all_to_all_many(
    exchanges: list[tuple[Tensor, list[int], list[int]]],
    group,
    what: str = "tokens",
    clock: ExchangeClock | None = None,
) -> tuple[Tensor, ...]:
    """`all_to_all` of each (x, output_splits, input_splits), one after the other, as one autograd node:
    its backward runs the reverse exchanges in the same order on every rank."""
    splits = tuple((list(out), list(inp)) for _, out, inp in exchanges)
    tensors = [x for x, _, _ in exchanges]
    return _AllToAllMany.apply(splits, group, what, clock or ExchangeClock(), *tensors)


class Exchange:
    """An all-to-all in flight, between `start_all_to_all` and `finish_all_to_all`, in both directions.

    Forward: start launches the exchange (async) and finish waits for it.
    Backward runs the two the other way round: finish's backward launches
    the reverse exchange of the incoming gradient and start's backward waits
    for it, so that autograd nodes run in between (another chunk's expert
    backward) overlap with it. Holds the work handle only while it is in flight.
    """

    def __init__(self, output_splits: list[int], input_splits: list[int], group, what: str, clock):
        self.output_splits, self.input_splits = output_splits, input_splits
        self.group, self.what, self.clock = group, what, clock
        self.work = None
        self.grad_in: Tensor | None = None  # the backward's reverse exchange's output

    def launch(self, out: Tensor, x: Tensor, output_splits: list[int], input_splits: list[int], way: str):
        with _naming_failures(f"MoE all-to-all ({self.what}, {way})", self.group), self.clock.timing():
            self.work = dist.all_to_all_single(
                out, x.contiguous(), output_splits, input_splits, group=self.group, async_op=True
            )

    def wait(self, way: str) -> None:
        with _naming_failures(f"MoE all-to-all ({self.what}, {way})", self.group), self.clock.timing():
            work, self.work = self.work, None
            work.wait()


class _StartAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, exchange: Exchange) -> Tensor:
        ctx.exchange = exchange
        out = x.new_empty((sum(exchange.output_splits), *x.shape[1:]))
        exchange.launch(out, x, exchange.output_splits, exchange.input_splits, "forward")
        return out

    @staticmethod
    def backward(ctx, _grad_buffer: Tensor):
        exchange = ctx.exchange
        exchange.wait("backward")
        grad_in, exchange.grad_in = exchange.grad_in, None
        return grad_in, None


class _FinishAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: Tensor, exchange: Exchange) -> Tensor:
        ctx.exchange = exchange
        exchange.wait("forward")
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        exchange = ctx.exchange
        grad_in = grad_out.new_empty((sum(exchange.input_splits), *grad_out.shape[1:]))
        exchange.launch(grad_in, grad_out, exchange.input_splits, exchange.output_splits, "backward")
        # NOTE: start's backward returns grad_in once filled; the buffer's own gradient
        # is only the edge that runs it (nothing else reads the buffer).
        exchange.grad_in = grad_in
        return grad_out, None


def start_all_to_all(
    x: Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group,
    what: str = "tokens",
    clock: ExchangeClock | None = None,
) -> tuple[Tensor, Exchange]:
    """Launch `all_to_all` without waiting: (the output buffer, the exchange to finish).

    Read the buffer only through `finish_all_to_all(buffer, exchange)`. Every
    rank of the group must start (and finish) its exchanges in the same order.
    """
    exchange = Exchange(output_splits, input_splits, group, what, clock or ExchangeClock())
    return _StartAllToAll.apply(x, exchange), exchange


def finish_all_to_all(buffer: Tensor, exchange: Exchange) -> Tensor:
    """Wait for an exchange from `start_all_to_all`; its received rows (differentiable)."""
    return _FinishAllToAll.apply(buffer, exchange)


def gather_counts(
    rows_per_expert_E: Tensor, status: list[int], group: dist.ProcessGroup, clock: ExchangeClock | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """Every rank's rows per global expert, and every rank's status: [P][E] and [P][len(status)] host ints.

    NOTE: counts go first, in a fixed-size collective, because the token
    all-to-all needs every rank's split sizes and ranks may hold any number
    of tokens, including none. An all-gather rather than an all-to-all of
    counts: every rank then sees the whole load matrix and every rank's
    status, so the checks that follow (bad input anywhere, an expert over its
    cap) fail on every rank at once and no rank is left waiting. Host sync.
    """
    size = dist.get_world_size(group)
    status_S = torch.tensor(status, dtype=torch.long, device=rows_per_expert_E.device)
    mine = torch.cat([rows_per_expert_E.long(), status_S])
    gathered = [torch.empty_like(mine) for _ in range(size)]
    with _naming_failures("MoE count exchange", group), (clock or ExchangeClock()).timing():
        dist.all_gather(gathered, mine, group=group)
    rows = torch.stack(gathered).tolist()
    return [row[: -len(status)] for row in rows], [row[-len(status) :] for row in rows]


def sum_counts(
    counts_E: Tensor, group: dist.ProcessGroup | None, what: str = "MoE load statistics"
) -> Tensor:
    """counts_E summed over the ranks of `group` (a new tensor; a copy for no group).

    Integer counts, so every rank gets bit-identical sums whatever the
    reduction order: the selection bias updated from them stays equal on all ranks.
    """
    total_E = counts_E.clone()
    if group is not None and dist.get_world_size(group) > 1:
        with _naming_failures(what, group):
            dist.all_reduce(total_E, group=group)
    return total_E


def sum_tensors(tensors: list[Tensor], group: dist.ProcessGroup | None, what: str) -> None:
    """Sum each tensor over the ranks of `group`, in place, in one all-reduce of a flat copy."""
    if group is None or dist.get_world_size(group) == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    with _naming_failures(what, group):
        dist.all_reduce(flat, group=group)
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def all_gather_rows(x: Tensor, group: dist.ProcessGroup | None, what: str) -> Tensor:
    """[P * n, ...]: every rank's x [n, ...] (the same n on every rank), in rank order; x for no group."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    with _naming_failures(what, group):
        dist.all_gather(gathered, x.contiguous(), group=group)
    return torch.cat(gathered)


def agree_on_init(config_dict: dict, seed: int, group: dist.ProcessGroup | None) -> int:
    """Check that every rank of `group` built the same config; return group rank 0's seed.

    Run once at construction: ranks with different configs would otherwise
    hang or exchange garbage in the first all-to-all.
    """
    if group is None or dist.get_world_size(group) == 1:
        return seed
    with _naming_failures("MoELayer config check at construction", group):
        gathered = _all_gather_json({"config": config_dict, "seed": seed}, group)
    first = gathered[0]["config"]
    for rank, other in enumerate(entry["config"] for entry in gathered):
        differing = [k for k in first if first[k] != other.get(k)]
        if differing:
            details = ", ".join(
                f"{k}: rank 0 has {first[k]!r}, rank {rank} has {other.get(k)!r}" for k in differing
            )
            raise ValueError(f"MoELayer configs differ across the ranks of the group ({details})")
    return gathered[0]["seed"]


def _all_gather_json(value: object, group: dist.ProcessGroup) -> list:
    """all_gather of a JSON-able value, as bytes in tensors.

    NOTE: not all_gather_object, which needs numpy and unpickles what peers send.
    """
    # NOTE: an explicit CPU device, since a model may be built under torch.device("meta").
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    payload = torch.tensor(list(json.dumps(value, sort_keys=True).encode()), dtype=torch.uint8, device=device)
    size = dist.get_world_size(group)
    lengths = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([payload.numel()], device=device), group=group)
    longest = max(int(n) for n in lengths)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    buffers = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(buffers, padded, group=group)
    return [json.loads(bytes(b[: int(n)].tolist())) for b, n in zip(buffers, lengths)]
