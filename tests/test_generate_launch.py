"""launch.generate under torchrun: experts sharded over 2 and 4 ranks print what one process prints.

The checkpoint is trained for 2 steps of configs/test.toml at ep 2 (and a
capacity factor of 1.0, which generation does not apply). Its greedy text is
mostly one repeated byte, which would hide a wrong expert, so the layouts are
also compared on the routes of every position (--record-routes).
"""

from __future__ import annotations

import pytest
import torch
from multirank import run_module as run

from expert_parallel.tensorfile import load_file

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # every test starts the launcher as processes

PROMPTS = ["def ", "import os", "class Foo(object):"]  # 3 prompts of different lengths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("generate") / "run"
    run(
        2, "-m", "launch.train", "--config", "configs/test.toml", f"train.out_dir={out}",
        "train.steps=2", "train.checkpoint_every=2", "train.eval_every=2", "parallel.ep=2",
    )  # fmt: skip
    return out


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_text_is_the_same_in_one_process_and_on_2_and_4_ranks(trained, tmp_path, batch):
    args = ["-m", "launch.generate", "--checkpoint", str(trained), "--top-k", "1", "--tokens", "32"]
    if batch == 1:  # today's --prompt, which without torchrun must keep working as before
        args += ["--prompt", PROMPTS[0]]
    else:
        (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        args += ["--prompts-file", str(tmp_path / "prompts.txt")]
    alone = run(1, *args, "--record-routes", str(tmp_path / "alone.safetensors"))
    assert b"(step 2)" in alone.stderr
    texts = alone.stdout.split(b"\n" + b"-" * 40 + b"\n")
    assert len(texts) == batch and all(t.startswith(p.encode()) for t, p in zip(texts, PROMPTS))
    # NOTE: after 2 steps from GPT-2's init the greedy text is mostly one byte, so the routes of
    # every position (each MoE layer's choice of experts) are what shows the layouts agree.
    routes = load_file(tmp_path / "alone.safetensors")["routes"]
    assert routes[routes >= 0].unique().numel() > 2  # several experts chosen, not one
    # At batch 1 every rank but the first has no prompt; at 4 ranks and batch 3, one rank.
    for world in (2,) if batch == 1 else (2, 4):
        recorded = tmp_path / f"{world}.safetensors"
        assert run(world, *args, "--record-routes", str(recorded)).stdout == alone.stdout, f"{world} ranks"
        assert torch.equal(load_file(recorded)["routes"], routes), f"{world} ranks"
