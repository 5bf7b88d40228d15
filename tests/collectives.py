"""Count the torch.distributed collectives a piece of code calls, by name (tests only)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

COLLECTIVES = (
    "all_to_all_single",
    "all_to_all",
    "all_gather",
    "all_gather_into_tensor",
    "all_reduce",
    "broadcast",
    "reduce_scatter_tensor",
    "barrier",
)


@contextmanager
def counting_collectives(counts: Counter | None = None) -> Iterator[Counter]:
    """Within the block, each call of a torch.distributed collective adds 1 to `counts[name]`
    (a new Counter if None, yielded). The library calls them as `dist.<name>`, so the
    wrappers see every call; the originals are back on exit."""
    counts = Counter() if counts is None else counts
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counted(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return call

    for name in COLLECTIVES:
        setattr(dist, name, counted(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
