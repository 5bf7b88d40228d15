"""Parts of a forward that run eagerly between torch.compile graphs.

A group's exchanges and dropless experts take host split sizes that change
every step: traced, each new set of sizes would be a new graph. The layer
runs them as an eager island instead (one graph break), entered from
`MoELayer.forward` itself, since a break inside a nested call counts once
more per frame.
"""

from __future__ import annotations

import functools

import torch


@torch._disable_dynamo  # NOTE: imports dynamo on first call only; torch.compiler.disable would at import
def _run_outside_graph(function, *args):
    """function(*args), eagerly between graphs under torch.compile (one graph break)."""
    return function(*args)


def outside_graph(function):
    """`function`, to run eagerly under torch.compile and as it is otherwise."""
    if torch.compiler.is_compiling():
        return functools.partial(_run_outside_graph, function)
    return function
