"""The expert-parallel contract on real gloo ranks: see tests/ep_checks.py for the checks themselves."""

import re
from pathlib import Path

import pytest
from multirank import assert_all_ranks_succeeded, launch

CHECKS = Path(__file__).with_name("ep_checks.py")


@pytest.mark.parametrize("world_size,run", [(2, 1), (2, 2), (4, 1)])
def test_expert_parallel_equals_single_process(world_size, run):
    results = launch(CHECKS, world_size, timeout=240)
    assert_all_ranks_succeeded(results)
    for result in results:
        passed = re.search(r"rank \d+: (\d+) of (\d+) checks passed", result.output)
        assert passed, result.output[-2000:]
        assert passed.group(1) == passed.group(2) and int(passed.group(2)) > 100
