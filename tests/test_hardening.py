"""Hardening under real ranks: property-based EP equality, and clean exits every time."""

import re
from pathlib import Path

from multirank import assert_all_ranks_succeeded, launch

HERE = Path(__file__).parent


def test_ep_equals_single_process_on_random_cases_over_two_ranks():
    results = launch(HERE / "ep_properties.py", 2, ["40"], timeout=300)
    assert_all_ranks_succeeded(results)
    for result in results:
        found = re.search(r"(\d+) examples, (\d+) checks passed", result.output)
        assert found and int(found.group(1)) == 40, result.output[-2000:]


def test_every_rank_exits_cleanly_twenty_times_in_a_row():
    clean = 0
    for _ in range(20):
        results = launch(HERE / "exit_clean.py", 2, timeout=60)
        if all(r.returncode == 0 and "ok (16, 8)" in r.output for r in results):
            clean += 1
        else:
            bad = [r for r in results if r.returncode != 0]
            print("unclean run:", [(r.rank, r.returncode, r.output[-500:]) for r in bad])
    assert clean == 20
