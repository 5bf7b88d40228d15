"""The trainer end to end: layouts compute the same losses; metrics and summary are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from multirank import REPO

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # every test runs the trainer as processes

LAYOUTS = [(1, 1), (2, 1), (2, 2), (4, 2)]  # (world, ep): 1 process, dp=2, ep=2, dp=2 x ep=2


def train(tmp_path, world: int, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    args = ["-m", "launch.train", "--config", "configs/test.toml", f"train.out_dir={tmp_path}", *overrides]
    if world == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world}",
            *args,
        ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def losses(out_dir) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows]


def test_every_layout_computes_the_same_losses(tmp_path):
    results = {}
    for world, ep in LAYOUTS:
        out = tmp_path / f"w{world}-ep{ep}"
        train(out, world, f"parallel.ep={ep}")
        results[(world, ep)] = losses(out)
    reference = results[(1, 1)]
    assert len(reference) == 5 and reference[-1] < reference[0]
    for layout, got in results.items():
        assert got == pytest.approx(reference, rel=1e-3), f"layout {layout}: {got} vs {reference}"


def test_metrics_and_summary_are_written(tmp_path):
    run = train(tmp_path, 2, "parallel.ep=2", "train.steps=3", "train.eval_every=3")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    for key in (
        "loss",
        "aux_loss",
        "tokens_per_s",
        "dropped_fraction",
        "expert_load_max_over_mean",
        "rank_rows_max_over_mean_before",
        "rank_rows_max_over_mean_after",
        "peak_rss_mib",
    ):
        assert all(key in row for row in rows), key
    assert "val_loss" in rows[-1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["val_loss"] > 0 and summary["tokens_per_s"] > 0
    assert run.stdout.count("step ") >= 3 and "ETA" in run.stdout  # rank 0 only prints
    assert all(row["rank_rows_max_over_mean_after"] == row["rank_rows_max_over_mean_before"] for row in rows)
    assert run.stdout.count("done: 3 steps") == 1
    shares = rows[-1]["expert_share"]  # per layer, per expert: shares of the kept assignments
    assert len(shares) >= 1 and all(abs(sum(layer) - 1) < 1e-6 for layer in shares)
    png = tmp_path / "expert_load.png"  # no optional dependency needed (tests/test_expert_load.py)
    assert f"wrote {png}" in run.stdout and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_keys_and_ill_typed_values_are_named(tmp_path):
    from expert_parallel.config_file import command_line
    from expert_parallel.training import RunConfig
    from launch import train as launch_train

    config = ["--config", "configs/test.toml"]
    for override, words in (
        ("train.stepz=3", "train.stepz"),
        ("train.steps=abc", "train.steps"),
        ("parallel.ep=1.5", "parallel.ep"),
        ("moe.top_kk=1", "top_kk"),
    ):
        with pytest.raises(ValueError, match=words.replace(".", r"\.")):
            RunConfig.from_tree(command_line(launch_train.__doc__, [*config, override]))
    # And through the command line: a non-zero exit that names the key (one launch, not four).
    cmd = [sys.executable, "-m", "launch.train", *config, "train.stepz=3"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "train.stepz" in run.stderr, run.stderr[-1500:]


def test_resume_continues_exactly_and_reshards_across_ep_sizes(tmp_path):
    common = ("train.steps=6", "train.checkpoint_every=3", "train.eval_every=100")
    train(tmp_path / "whole", 2, "parallel.ep=2", *common)
    whole = losses(tmp_path / "whole")

    # Stopped after step 3, started again with the same out_dir: it resumes from step_3.
    train(tmp_path / "again", 2, "parallel.ep=2", "train.steps=3", "train.checkpoint_every=3")
    run = train(tmp_path / "again", 2, "parallel.ep=2", *common)
    assert "resumed from" in run.stdout and "(step 3)" in run.stdout
    assert losses(tmp_path / "again") == whole  # same layout: bit for bit

    # Saved with ep=2 (two expert shards), resumed in one process holding all experts.
    train(tmp_path / "reshard", 2, "parallel.ep=2", "train.steps=3", "train.checkpoint_every=3")
    train(tmp_path / "reshard", 1, "parallel.ep=1", *common)
    assert losses(tmp_path / "reshard") == pytest.approx(whole, rel=1e-4)
    names = sorted(p.name for p in (tmp_path / "reshard" / "checkpoints").iterdir())
    assert names == ["step_3", "step_6"]  # no .partial left behind
