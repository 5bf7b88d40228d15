"""Process-group plumbing: the autograd all-to-all, count exchange, start-up checks, set-up and teardown.

The only module on the layer's path that imports torch.distributed. Every
collective takes the group it runs on; tensors stay on the device they came
from, so gloo (CPU) and NCCL (CUDA) run the same code.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

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


def init_distributed(backend: str | None = None, timeout: timedelta = timedelta(minutes=5)) -> torch.device:
    """Initialise the default process group from torchrun's environment; return this rank's device.

    backend None: the EXPERT_PARALLEL_BACKEND environment variable if set, else
    NCCL with one GPU per local rank where CUDA is available, gloo otherwise.
    """
    backend = backend or os.environ.get("EXPERT_PARALLEL_BACKEND") or None
    use_cuda = torch.cuda.is_available() if backend is None else backend == "nccl"
    backend = backend or ("nccl" if use_cuda else "gloo")
    device = torch.device("cpu")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): start at most "
                f"one rank per GPU, or use gloo (EXPERT_PARALLEL_BACKEND=gloo)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout, **_restart_safe_store(timeout))
    return device


def _restart_safe_store(timeout: timedelta) -> dict:
    """Under torchrun, the store of this restart attempt, so that keys from earlier attempts are unseen.

    NOTE: with the c10d rendezvous torchrun's agent hosts one TCPStore for all
    restart attempts, and env:// init connects to it without a per-attempt
    prefix (torch 2.14). After a restart, a rank could then read the gloo
    address its dead predecessor published ("connectFullMesh ... Connection
    refused") or count an old attempt's arrivals in a barrier and hang. Measured:
    2 of 4 kill-and-restart runs failed that way without this prefix.
    Outside torchrun this returns {} and init_process_group does its usual thing.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        return {}
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not agent_hosts_store and rank == 0,
        timeout=timeout,
        multi_tenant=not agent_hosts_store,
    )
    store = dist.PrefixStore(f"expert_parallel/attempt_{attempt}", store)
    return {"store": store, "rank": rank, "world_size": world_size}


def shutdown(barrier: bool = True) -> None:
    """Tear down the default process group so that the process exits cleanly.

    NOTE: a gloo process that exits while autograd graphs still reference the
    group can abort (SIGABRT, "terminate called without an active exception").
    Collect those graphs, wait for every rank, then destroy the group. On an
    error path pass barrier=False: a rank that failed alone must not wait in a
    barrier while its peers wait in the layer's next collective; destroying
    its group at once makes theirs fail at once.
    """
    gc.collect()
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if barrier:
            dist.barrier()
    except RuntimeError as err:
        # A peer is gone; whatever made it go has been reported. Still tear down.
        print(
            f"expert_parallel.shutdown: barrier failed ({err}); destroying the group anyway", file=sys.stderr
        )
    finally:
        dist.destroy_process_group()


@contextmanager
def distributed(
    backend: str | None = None, timeout: timedelta = timedelta(minutes=5)
) -> Iterator[torch.device]:
    """`with distributed() as device:` init_distributed, then shutdown.

    With a barrier after success, without one after an error (see shutdown).
    """
    device = init_distributed(backend, timeout)
    try:
        yield device
    except BaseException:
        shutdown(barrier=False)
        raise
    shutdown()
