"""Balancing with global statistics on real gloo ranks: see tests/balance_checks.py for the checks."""

from pathlib import Path

import pytest
from multirank import checks_run, launch

CHECKS = Path(__file__).with_name("balance_checks.py")


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_statistics_equal_the_single_process_ones(world_size):
    results = launch(CHECKS, world_size, timeout=240)
    assert checks_run(results) == [21] * world_size
