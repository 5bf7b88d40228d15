"""One forward's plan: its capacity, dispatcher and input checks, from the layer's configs and its caller.

    plan = plan_call(config, dispatcher, inference, training=..., grad_enabled=...)

Everything a forward decides before it sees its tokens is decided here, once:
- capacity: three knobs, in this order: the inference caller's
  `Inference.capacity_factor` (given an Inference: None routes dropless),
  then MoEConfig.eval_capacity_factor outside training, then
  MoEConfig.capacity_factor. `plan.routing` is the MoEConfig that `route`
  applies (route's capacity rule, MoEConfig.capacity, then sees one factor);
- dispatcher: the layer's own (made from its ExecutionConfig), or the one
  `dispatchers.for_call` picks for this call (the fixed dispatch for a
  small, agreed decode step);
- checks: whether the NaN / Inf checks run (a host sync each; the dispatcher
  says whether it promises none).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

from .config import MoEConfig
from .dispatchers import for_call
from .eager import outside_graph


class Inference(NamedTuple):
    """What an inference caller (Transformer.decode) tells a forward about itself.

    capacity_factor: replaces MoEConfig.capacity_factor and eval_capacity_factor
        for this call; None (the default) routes dropless. Generation routes
        dropless: with a capacity, a later token can push an earlier one out of
        a full expert, so decoding with a KV cache could not equal the forward
        over the whole sequence.
    tokens_per_rank: a bound on the tokens of this call on every rank of the
        group, the same value on all of them (a decode step: the batch bound).
        With it, an eval forward without gradients may use the fixed dispatch
        (dispatchers.for_call); a rank over the bound raises ValueError.
    """

    capacity_factor: float | None = None
    tokens_per_rank: int | None = None


@dataclass(frozen=True)
class CallPlan:
    """How one forward runs.

    routing: the MoEConfig `route` applies, its capacity_factor this call's.
    dispatcher: the dispatcher of this call.
    check_finite: run the NaN / Inf checks of the input and router logits.
    """

    routing: MoEConfig
    dispatcher: object
    check_finite: bool

    def island(self, function, input_ok: bool):
        """`function` as it is, or (under torch.compile) to run eagerly between graphs: everything but
        capacity routing on one process, whose shapes are static, takes host sizes (eager.py)."""
        if input_ok and self.dispatcher.traceable and self.routing.capacity_factor is not None:
            return function
        return outside_graph(function)


def plan_call(
    config: MoEConfig, dispatcher, inference: Inference | None, *, training: bool, grad_enabled: bool
) -> CallPlan:
    """The plan of one forward of a layer computing `config` with `dispatcher`, for `inference`."""
    if inference is not None:
        factor = inference.capacity_factor
    elif not training and config.eval_capacity_factor is not None:
        factor = config.eval_capacity_factor
    else:
        factor = config.capacity_factor
    routing = config
    # NOTE: the same object where nothing changes: a replace validates the whole config (some 15 us).
    if factor != config.capacity_factor or (config.eval_capacity_factor is not None and not training):
        routing = replace(config, capacity_factor=factor, eval_capacity_factor=None)
    tokens_per_rank = None if inference is None else inference.tokens_per_rank
    dispatcher = for_call(dispatcher, tokens_per_rank, training=training, grad_enabled=grad_enabled)
    return CallPlan(routing, dispatcher, check_finite=not dispatcher.host_sync_free)
