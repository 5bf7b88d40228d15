"""Failing peers: a killed rank makes its peers fail loudly and quickly, under every launcher."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch.multiprocessing as mp
from multirank import REPO, free_port, launch
from peer_death import SURVIVOR_EXIT, mp_worker

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # whole rank processes, one of them killed

SCRIPT = Path(__file__).with_name("peer_death.py")
GROUP_TIMEOUT_S = 30


def kill_victim_when_ready(ready_dir: Path, deadline_s: float = 60) -> None:
    pid_file = ready_dir / "victim.pid"
    end = time.monotonic() + deadline_s
    while not pid_file.exists():
        assert time.monotonic() < end, "the victim rank never got ready"
        time.sleep(0.1)
    time.sleep(1.0)  # let the survivors enter the collective
    psutil.Process(int(pid_file.read_text())).kill()


def test_killed_rank_under_a_plain_launch(tmp_path):
    import threading

    killer = threading.Thread(target=kill_victim_when_ready, args=(tmp_path,))
    killer.start()
    started = time.monotonic()
    results = launch(SCRIPT, 3, [str(tmp_path), str(GROUP_TIMEOUT_S)], timeout=120)
    killer.join()
    assert time.monotonic() - started < GROUP_TIMEOUT_S + 30
    victim, survivors = results[-1], results[:-1]
    assert victim.returncode == -9
    for survivor in survivors:
        assert survivor.returncode == SURVIVOR_EXIT, survivor.output[-3000:]
        assert "MoE count exchange failed on global rank" in survivor.output
        assert "global ranks [" in survivor.output
        # gloo notices the closed connection: well within the group's 30 s timeout.
        seconds = float(re.search(r"raised after ([\d.]+) s", survivor.output).group(1))
        assert seconds < 10


def test_killed_rank_under_torch_multiprocessing(tmp_path):
    context = mp.get_context("spawn")
    port, world = free_port(), 2
    procs = [
        context.Process(target=mp_worker, args=(rank, world, port, str(tmp_path), GROUP_TIMEOUT_S))
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    kill_victim_when_ready(tmp_path)
    procs[0].join(timeout=GROUP_TIMEOUT_S + 30)
    procs[1].join(timeout=10)
    alive = [p for p in procs if p.is_alive()]
    for proc in alive:
        proc.kill()
    assert not alive, "a rank hung after its peer died"
    assert procs[0].exitcode == SURVIVOR_EXIT and procs[1].exitcode == -9


def test_killed_rank_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.Popen(
        [*cmd, str(SCRIPT), str(tmp_path), str(GROUP_TIMEOUT_S)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    kill_victim_when_ready(tmp_path)
    out, _ = proc.communicate(timeout=GROUP_TIMEOUT_S + 60)
    # torchrun notices the dead worker, stops the others and reports the failure.
    assert proc.returncode != 0
    assert "peer_death.py FAILED" in out or "ChildFailedError" in out, out[-3000:]
