"""The helper that runs one function on N gloo ranks (tests/rankpool.py): passes, failures, hangs, exits."""

from __future__ import annotations

import os
import time

import psutil
import pytest
import torch
import torch.distributed as dist
from rankpool import RankPools, on_ranks


@on_ranks(2, 3)
def test_a_case_runs_on_every_rank_in_the_default_group():
    rank, size = dist.get_rank(), dist.get_world_size()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == (str(rank), str(size))
    total = torch.tensor([rank])
    dist.all_reduce(total)
    assert int(total) == size * (size - 1) // 2
    assert torch.initial_seed() == 0  # every case starts from the same generator state
    torch.manual_seed(rank + 1)  # and leaves no trace in the next one


@pytest.mark.parametrize("k", [1, 2])
@on_ranks(2)
def test_arguments_and_fixtures_reach_every_rank(k, tmp_path):
    Path = type(tmp_path)
    (tmp_path / f"rank{dist.get_rank()}-{k}").touch()
    dist.barrier()
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == [f"rank0-{k}", f"rank1-{k}"]


def fails_on_rank_1():
    print(f"rank {dist.get_rank()} was here", flush=True)
    answer = 1
    if dist.get_rank() == 1:
        assert answer == 2
    dist.barrier()  # rank 0 waits here for a peer that has given up


def sleeps_on_rank_0():
    if dist.get_rank() == 0:
        time.sleep(600)


def dies_on_rank_1():
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def passes():
    dist.barrier()


@pytest.mark.dist
def test_a_failing_rank_reports_its_assertion_and_output_and_the_pool_restarts(rank_pools):
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        rank_pools.run(2, __name__, "fails_on_rank_1", {}, timeout=120)
    report = str(failure.value)
    assert report.startswith("fails_on_rank_1 on 2 ranks: rank(s) [1] failed; rank(s) [0] did not answer")
    assert "assert 1 == 2" in report and "rank 1 was here" in report, report
    # What a silent rank printed shows where it waits.
    assert "--- rank 0: no answer ---\n--- rank 0 printed ---\nrank 0 was here" in report, report
    assert time.monotonic() - started < 60
    rank_pools.run(2, __name__, "passes", {}, timeout=120)  # a fresh pool


@pytest.mark.dist
def test_a_hanging_case_fails_at_its_timeout_naming_the_ranks_that_did_not_answer(rank_pools):
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"rank\(s\) \[0\] did not answer within the timeout"):
        rank_pools.run(2, __name__, "sleeps_on_rank_0", {}, timeout=3)
    assert time.monotonic() - started < 30
    rank_pools.run(2, __name__, "passes", {}, timeout=120)


@pytest.mark.dist
def test_a_rank_that_dies_is_named(rank_pools):
    with pytest.raises(
        pytest.fail.Exception, match=r"(?s)failed.*\n--- rank 1: died ---\nthe rank process exited"
    ):
        rank_pools.run(2, __name__, "dies_on_rank_1", {}, timeout=120)
    rank_pools.run(2, __name__, "passes", {}, timeout=120)


@pytest.mark.dist
def test_closing_the_pools_leaves_no_process_behind():
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    pools = RankPools()
    pools.run(2, __name__, "passes", {}, timeout=120)
    pools.run(3, __name__, "passes", {}, timeout=120)
    started = {p.pid for p in me.children(recursive=True)} - before
    assert len(started) == 1 + 2 + 3  # the zygote and its ranks
    zygote = pools.zygote.proc
    pools.close()
    assert zygote.returncode == 0
    assert not [p for p in psutil.pids() if p in started]
