"""The README's main job, run as a user would: torchrun on 2 gloo ranks, with overrides."""

import re
import subprocess
import sys

import pytest
from multirank import REPO

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # every test is a torchrun run


def torchrun(module: str, *args: str, nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run(
        [*cmd, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_demo_checks_equality_then_trains_and_exits_cleanly():
    run = torchrun("launch.demo", "--config", "configs/demo.toml", "demo.steps=6", "demo.log_every=3")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "4 per rank" in out
    diff = float(re.search(r"single-process layer on every rank \(max \|diff\| (\S+)\)", out).group(1))
    assert diff <= 1e-5
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert "done: 6 steps on 2 ranks" in out


def test_demo_rejects_unknown_keys_by_name():
    run = torchrun("launch.demo", "--config", "configs/demo.toml", "moe.top_kk=1", nproc=1)
    assert run.returncode != 0 and "top_kk" in run.stderr


def test_benchmark_smoke_run_reports_ratio_and_breakdown():
    run = torchrun("benchmarks.bench", "--quick", "--capacity", "none,1.0")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("ratio layer / floor") == 2
    for phase in ("routing", "permutation", "all-to-all", "experts", "combine"):
        assert phase in run.stdout


def test_soak_smoke_run_on_four_ranks():
    args = (
        "--steps",
        "30",
        "--warmup",
        "5",
        "--max-tokens",
        "256",
        "--log-every",
        "10",
        "--sample-every",
        "5",
    )
    run = torchrun("benchmarks.soak", *args, nproc=4)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "soak: 30 steps" in run.stdout and "no hang, no error" in run.stdout
