"""Redundant experts under EP on real gloo ranks: see tests/placement_checks.py for the checks."""

import re
from pathlib import Path

import pytest
from multirank import assert_all_ranks_succeeded, launch

CHECKS = Path(__file__).with_name("placement_checks.py")


@pytest.mark.parametrize("world_size", [2, 4])
def test_replicas_equal_the_single_process_layer(world_size, tmp_path):
    results = launch(CHECKS, world_size, [str(tmp_path)], timeout=240)
    assert_all_ranks_succeeded(results)
    for result in results:
        passed = re.search(r"rank \d+: (\d+) of (\d+) checks passed", result.output)
        assert passed, result.output[-2000:]
        assert passed.group(1) == passed.group(2)
