"""Redundant experts under EP on real gloo ranks: see tests/placement_checks.py for the checks."""

from pathlib import Path

import pytest
from multirank import checks_run, launch

CHECKS = Path(__file__).with_name("placement_checks.py")


@pytest.mark.parametrize("world_size", [2, 4])
def test_replicas_equal_the_single_process_layer(world_size, tmp_path):
    results = launch(CHECKS, world_size, [str(tmp_path)], timeout=240)
    checks_run(results)


def test_trainer_with_replicas_resumes_without_them(tmp_path):
    """ep=2 with 2 redundant experts re-planned every 2 steps, saved at step 3; resumed with no replicas,
    steps 4 and 5 give the losses of the replicated run."""
    from test_train import losses, train

    train(
        tmp_path,
        2,
        "parallel.ep=2",
        "parallel.redundant_experts=2",
        "parallel.replan_every=2",
        "train.checkpoint_every=3",
    )
    replicated = losses(tmp_path)
    assert (tmp_path / "checkpoints" / "step_3").is_dir()
    run = train(tmp_path, 2, "parallel.ep=2")
    assert "resumed from" in run.stdout
    assert losses(tmp_path) == pytest.approx(replicated, rel=1e-5)
