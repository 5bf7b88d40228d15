import os
import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
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
