import os
import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rankpool import RankPools  # noqa: E402

# Every rank the tests start uses gloo on CPU, GPUs or not; test_cuda.py asks for NCCL itself.
os.environ.setdefault("EXPERT_PARALLEL_BACKEND", "gloo")


@pytest.fixture(scope="session", autouse=True)
def no_leaked_processes_or_ports():
    """After the whole suite: no rank process still alive, no port still listening."""
    me = psutil.Process()
    listening_before = {c.laddr for c in me.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    yield
    deadline = time.monotonic() + 15
    while len(me.children(recursive=True)) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    leaked = []
    for child in me.children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
            # multiprocessing's own resource tracker lives until pytest exits, by design.
            if "multiprocessing.resource_tracker" in cmdline:
                continue
            leaked.append(f"pid {child.pid}: {cmdline[:200]}")
            child.kill()
        except psutil.NoSuchProcess:
            pass
    listening = {c.laddr for c in me.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    assert not leaked, f"processes left running after the tests: {leaked}"
    assert listening <= listening_before, f"ports left listening: {listening - listening_before}"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread in this process, as the rank processes have (OMP_NUM_THREADS=1).

    NOTE: the tests' tensors are tiny; on a busy 2-core machine two threads per op
    made them about 10x slower (a 512-token forward: 30 ms against 3 ms).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def rank_pools():
    """Persistent gloo rank processes, one pool per world size, for the tests made by rankpool.on_ranks."""
    pools = RankPools()
    yield pools
    pools.close()
