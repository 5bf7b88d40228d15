"""The chunked, overlapped exchange on real gloo ranks: see tests/overlap_checks.py for the checks."""

from pathlib import Path

import pytest
import torch
from multirank import checks_run, launch

import expert_parallel as ep

CHECKS = Path(__file__).with_name("overlap_checks.py")


@pytest.mark.parametrize("world_size", [2, 4])
def test_any_chunk_count_is_bitwise_equal(world_size):
    results = launch(CHECKS, world_size, timeout=240)
    checks_run(results)


def test_chunks_need_per_assignment_dispatch():
    with pytest.raises(ValueError, match="exchange_chunks=2 needs dispatch='per_assignment'"):
        ep.MoEConfig(d_model=8, d_hidden=8, num_experts=4, exchange_chunks=2, dispatch="once_per_rank")
    with pytest.raises(ValueError, match="exchange_chunks"):
        ep.MoEConfig(d_model=8, d_hidden=8, num_experts=4, exchange_chunks=0)


def test_one_process_ignores_chunks():
    """Without a group nothing is exchanged: the chunk count changes nothing."""
    x = torch.randn(10, 8)
    outs = []
    for chunks in (1, 4):
        torch.manual_seed(0)
        layer = ep.MoELayer(ep.MoEConfig(d_model=8, d_hidden=8, num_experts=4, exchange_chunks=chunks))
        outs.append(layer(x))
    assert torch.equal(outs[0], outs[1])
