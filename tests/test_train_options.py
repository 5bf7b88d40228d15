"""The trainer's execution options change how a step runs, never what it computes.

train.activation_checkpointing: bitwise the same losses, grad norms and
selection bias; train.compile: the same to 1e-5 (aot_eager: traced, no code
generation); train.keep_freed_memory: the allocator, nothing else. On 2 gloo
ranks (dp 1 x ep 2) with a global-batch aux loss and a selection bias, the
features that carry state across micro-batches.
"""

from __future__ import annotations

import json

import pytest
from test_train import train

GLOBAL_BATCH = [
    "parallel.ep=2",
    "train.steps=3",
    "train.eval_every=3",
    "moe.aux_loss_scope=global_batch",
    "moe.selection_bias=true",
    "moe.selection_bias_rate=0.01",
]


def _metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _run(tmp_path, name: str, *overrides: str) -> tuple[list[dict], str]:
    out = tmp_path / name
    run = train(out, 2, *GLOBAL_BATCH, *overrides)
    return _metrics(out), run.stdout


def _numbers(rows: list[dict]) -> list[tuple]:
    return [
        (r["loss"], r["aux_loss"], r["grad_norm"], r["dropped_fraction"], r.get("val_loss", 0.0))
        for r in rows
    ]


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> tuple[list[dict], str]:
    """The run with no option set, which both tests compare with (one launch fewer)."""
    return _run(tmp_path_factory.mktemp("options"), "plain")


@pytest.mark.dist
def test_activation_checkpointing_and_the_allocator_change_nothing(tmp_path, plain):
    plain, log = plain
    recomputed, _ = _run(tmp_path, "checkpointed", "train.activation_checkpointing=true")
    default_malloc, log_default = _run(tmp_path, "malloc", "train.keep_freed_memory=false")
    assert len(plain) == 3
    assert _numbers(recomputed) == _numbers(plain)  # bitwise: floats from JSON, compared exactly
    assert _numbers(default_malloc) == _numbers(plain)
    assert "allocator: glibc malloc keeps freed memory" in log
    assert "allocator: glibc malloc defaults" in log_default


@pytest.mark.dist
@pytest.mark.slow
def test_compile_matches_eager(tmp_path, plain):
    eager, _ = plain
    compiled, _ = _run(tmp_path, "compiled", "train.compile=true", "train.compile_backend=aot_eager")
    for got, want in zip(_numbers(compiled), _numbers(eager), strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
