"""The expert-parallel contract on real gloo ranks: see tests/ep_checks.py for the checks themselves."""

from pathlib import Path

import pytest
from multirank import checks_run, launch

CHECKS = Path(__file__).with_name("ep_checks.py")


@pytest.mark.parametrize("world_size", [2, 4])
def test_expert_parallel_equals_single_process(world_size):
    results = launch(CHECKS, world_size, timeout=240)
    assert all(count > 100 for count in checks_run(results))
