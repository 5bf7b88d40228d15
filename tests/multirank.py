"""Start real ranks of a script on this machine (gloo over loopback) and collect every rank's exit code.

For tests that must be whole processes (a rank that dies, exit codes, torchrun). A multi-rank case
that is a function runs on the persistent ranks of tests/rankpool.py instead.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class RankResult:
    rank: int
    returncode: int | None  # None: killed at the timeout
    output: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    script: Path, world_size: int, args: list[str] = (), timeout: float = 180, env: dict | None = None
) -> list[RankResult]:
    """Run `script` as `world_size` ranks (the env:// variables torchrun would set); kill all at `timeout`."""
    port = free_port()
    procs, logs = [], []
    for rank in range(world_size):
        rank_env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            **(env or {}),
        )
        log = tempfile.TemporaryFile(mode="w+")
        procs.append(
            subprocess.Popen([sys.executable, str(script), *args], stdout=log, stderr=log, env=rank_env)
        )
        logs.append(log)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            break
    results = []
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            code = None
        else:
            code = proc.returncode
        log.seek(0)
        results.append(RankResult(rank, code, log.read()))
        log.close()
    return results


def run_module(world: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python *args` (e.g. "-m", "launch.generate", ...) in one process, or under torchrun as `world`
    ranks; asserts the exit code and returns the finished process (bytes output)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    cmd = [*(launcher if world > 1 else [sys.executable]), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=timeout, env=env)
    assert done.returncode == 0, (done.stdout[-2000:] + done.stderr[-3000:]).decode(errors="replace")
    return done
