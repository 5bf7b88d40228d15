"""What an activation-checkpointing recompute of a training forward reuses: that forward's decision.

A recompute (torch.utils.checkpoint, in the backward) must choose the same
experts, drop the same assignments and split the all-to-alls as its forward
did: near-ties could flip otherwise, and ranks would disagree on the
exchange. So each training forward draws a key, and keeps its `Decision`
under that key for as long as its autograd graph lives; the recompute draws
the same key and finds it. See docs/pipeline.md#activation-checkpointing.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class Decision:
    """What a training forward decided: its experts [T, K], kept assignments [T, K], count exchange
    (dispatchers.GroupCounts, None without a group) and global-batch choices [E] (None: other scopes)."""

    expert_ids_TK: Tensor
    keep_TK: Tensor
    counts: object
    batch_choices_E: Tensor | None


class Decisions:
    """Training forwards' decisions by key, each alive while its forward's autograd graph is.

    forward:   key = decisions.key(training); decision = decisions.recall(key)
               ... (a recompute reuses `decision`) ...
               out = decisions.remember(key, Decision(...), out)
    """

    def __init__(self, where: str):
        self.where = where
        self._by_key: weakref.WeakValueDictionary[int, Decision] = weakref.WeakValueDictionary()
        self._warned = False

    def __len__(self) -> int:
        return len(self._by_key)

    def key(self, training: bool) -> int | None:
        """A key that a training forward shares with its activation-checkpointing recompute only.

        NOTE: drawn from torch's default CPU generator, whose state
        torch.utils.checkpoint restores before it recomputes (preserve_rng_state,
        the default), so the recompute draws the same key, while every other
        forward draws a new one. Drawn in every training forward (grad mode or
        not), so a recompute consumes the generator as its forward did. This
        moves the default generator's stream by one draw per training forward.
        Not under torch.compile, which recomputes inside its own graph.
        """
        if not training or torch.compiler.is_compiling():
            return None
        return int(torch.randint(0, 2**62, ()))

    def recall(self, key: int | None) -> Decision | None:
        """The decision of the forward this call recomputes; None when it is not a recompute."""
        if key is None or not _in_backward():
            return None
        decision = self._by_key.get(key)
        if decision is None and not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.where}: a forward inside backward found no decision to reuse, so it routes "
                f"again (near-ties may flip, counts are exchanged again). Checkpoint with "
                f"torch.utils.checkpoint(..., use_reentrant=False) and preserve_rng_state=True",
                stacklevel=3,
            )
        return decision

    def remember(self, key: int, decision: Decision, out_TO: Tensor) -> Tensor:
        """`out_TO` unchanged, its autograd graph now holding `decision`, found by `key` until it goes."""
        self._by_key[key] = decision
        return _Remember.apply(out_TO, decision)


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread (an activation-checkpointing
    recompute runs forwards there)."""
    return torch._C._current_graph_task_id() != -1


class _Remember(torch.autograd.Function):
    """Identity that keeps a training forward's decision alive as long as its autograd graph."""

    @staticmethod
    def forward(ctx, out_TO: Tensor, decision: Decision) -> Tensor:
        ctx.decision = decision
        return out_TO.view_as(out_TO)

    @staticmethod
    def backward(ctx, grad_TO: Tensor):
        return grad_TO, None
