"""The chunked, overlapped exchange on real gloo ranks: see tests/overlap_checks.py for the checks."""

import re
from pathlib import Path

import pytest
from multirank import assert_all_ranks_succeeded, launch

import expert_parallel as ep

CHECKS = Path(__file__).with_name("overlap_checks.py")


@pytest.mark.parametrize("world_size", [2, 4])
def test_any_chunk_count_is_bitwise_equal(world_size):
    results = launch(CHECKS, world_size, timeout=240)
    assert_all_ranks_succeeded(results)
    for result in results:
        passed = re.search(r"rank \d+: (\d+) of (\d+) checks passed", result.output)
        assert passed, result.output[-2000:]
        assert passed.group(1) == passed.group(2)


def test_chunks_need_per_assignment_dispatch():
    with pytest.raises(ValueError, match="exchange_chunks=2 needs dispatch='per_assignment'"):
        ep.MoEConfig(d_model=8, d_hidden=8, num_experts=4, exchange_chunks=2, dispatch="once_per_rank")
    with pytest.raises(ValueError, match="exchange_chunks"):
        ep.MoEConfig(d_model=8, d_hidden=8, num_experts=4, exchange_chunks=0)


def test_one_process_ignores_chunks():
    """Without a group nothing is exchanged: the chunk count changes nothing."""
    x = __import__("torch").randn(10, 8)
    outs = []
    for chunks in (1, 4):
        __import__("torch").manual_seed(0)
        layer = ep.MoELayer(ep.MoEConfig(d_model=8, d_hidden=8, num_experts=4, exchange_chunks=chunks))
        outs.append(layer(x))
    assert __import__("torch").equal(outs[0], outs[1])
