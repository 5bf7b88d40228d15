"""Models larger than one process: the meta-device build, FSDP2 beside expert parallelism, their checkpoints.

- build_model on the meta device holds exactly its slice of the one-process build, bitwise.
- parallel.fsdp = true trains what the unsharded run trains: losses and grad
  norms (clipped, over both meshes) to 1e-5, at dp 2 x ep 2 and at ep 2,
  with capacity, dropless and the global-batch aux loss; every parameter moves.
- An optimizer that does not hold the model's parameters raises.
- Checkpoints saved under FSDP resume bit for bit, and load without FSDP at ep 4 and in one process.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from multirank import REPO
from rankpool import on_ranks
from test_train import train
from torch.distributed.tensor import DTensor

from expert_parallel import checkpoint
from expert_parallel.build import build_model
from expert_parallel.config import MoEConfig
from expert_parallel.config_file import load_toml
from expert_parallel.layer import MoELayer
from expert_parallel.model import ModelConfig, Transformer
from expert_parallel.parallel import Layout, check_optimizer_tracks, make_layout
from expert_parallel.training import RunConfig, Trainer, global_grad_norm

ONE_PROCESS = Layout(1, 1, 0, 0, None, None, None)
CASES = {
    "capacity": [],  # configs/test.toml: capacity factor 1.0
    "dropless": ["moe.capacity_factor=none"],
    "global_batch": ["moe.capacity_factor=none", "moe.aux_loss_scope=global_batch"],
}
SMALL = ModelConfig(
    seq_len=16,
    d_model=16,
    n_layers=2,
    n_heads=2,
    moe=MoEConfig(d_model=16, d_hidden=8, num_experts=4, top_k=2, activation="swiglu", bias=True),
)


def run_config(out_dir, *overrides: str, execution: dict | None = None) -> RunConfig:
    tree = load_toml(REPO / "configs" / "test.toml", [f"train.out_dir={out_dir}", *overrides])
    return RunConfig.from_tree({**tree, "execution": execution or {}})


def full_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a whole tensor (a DTensor gathered), by name."""
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


def steps(config: RunConfig, layout: Layout, count: int) -> list[tuple[float, float]]:
    trainer = Trainer(config, layout, torch.device("cpu"))
    return [(row["loss"], row["grad_norm"]) for row in (trainer.train_step() for _ in range(count))]


def assert_close(got: list[tuple], want: list[tuple], rel: float = 1e-5) -> None:
    for step, (g, w) in enumerate(zip(got, want, strict=True), 1):
        for what, a, b in zip(("loss", "grad norm"), g, w):
            assert abs(a - b) <= rel * abs(b), f"step {step}: {what} {a!r} != {b!r}"


def test_the_meta_build_equals_the_one_process_build():
    torch.manual_seed(3)
    whole = Transformer(SMALL)
    torch.manual_seed(3)
    built = build_model(SMALL, ONE_PROCESS)
    assert full_values(built).keys() == full_values(whole).keys()
    for name, value in full_values(built).items():
        assert torch.equal(value, full_values(whole)[name]), name
    assert built.lm_head.weight is built.tok_emb.weight  # the tie survives to_empty


@on_ranks(2, 4)
def test_the_meta_build_holds_exactly_its_slice_of_the_full_build():
    world = dist.get_world_size()
    torch.manual_seed(3)
    whole = full_values(Transformer(SMALL))
    for ep, fsdp in [(world, False), (2, False), (2, True), (world, True)]:
        torch.manual_seed(3)
        model = build_model(SMALL, make_layout(ep), fsdp=fsdp)
        for name, value in full_values(model).items():
            assert torch.equal(value, whole[name][local_ids(model, name)]), (ep, fsdp, name)
        if not fsdp:  # nothing but its own experts was allocated
            experts = [p for _, layer in model.moe_layers() for p in layer.experts.parameters()]
            assert all(p.shape[0] == SMALL.moe.num_experts // ep for p in experts)


@on_ranks(4)
def test_experts_shard_over_dp_by_expert_or_within_each_expert(tmp_path):
    # dp 2 x ep 2 with 4 experts: 2 local experts, dp 2 divides them, each rank holds one whole.
    by_expert = build_model(SMALL, make_layout(2), fsdp=True)
    w1 = by_expert.blocks[0].ffn.experts.w1
    assert w1.to_local().shape == (1, 16, 8) and w1.placements[0].dim == 0
    # dp 4 x ep 1 with 2 experts: dp does not divide them, each rank holds a quarter of d_model of both.
    moe = MoEConfig(d_model=16, d_hidden=8, num_experts=2, top_k=1)
    within = build_model(
        ModelConfig(seq_len=16, d_model=16, n_layers=1, n_heads=2, moe=moe), make_layout(1), fsdp=True
    )
    w1 = within.blocks[0].ffn.experts.w1
    assert w1.to_local().shape == (2, 4, 8) and w1.placements[0].dim == 1
    # Either way a checkpoint holds one whole tensor per global expert, which loads anywhere.
    for kind, model in {"by_expert": by_expert, "within": within}.items():
        path = checkpoint.save(tmp_path / kind, 1, model, torch.optim.AdamW(model.parameters()))
        saved = full_values(model)
        torch.manual_seed(9)
        again = build_model(model.config, make_layout(model.blocks[0].ffn.group_size), fsdp=True)
        torch.manual_seed(9)
        one_process = build_model(model.config, ONE_PROCESS)
        checkpoint.load(path, again)
        checkpoint.load(path, one_process)
        for name, value in full_values(again).items():
            assert torch.equal(value, saved[name]), name
        for name, value in full_values(one_process).items():  # all experts; this ep rank's were saved
            assert torch.equal(value[local_ids(model, name)], saved[name]), name


@on_ranks(4)
def test_fsdp_trains_what_dp2_x_ep2_trains_and_what_one_process_trains(tmp_path):
    for case, overrides in CASES.items():
        fsdp, plain = [
            steps(run_config(tmp_path / case / kind, "parallel.ep=2", *extra, *overrides), make_layout(2), 5)
            for kind, extra in (("fsdp", ["parallel.fsdp=true"]), ("plain", []))
        ]
        assert_close(fsdp, plain)
        # The clipped norm over both meshes is the one-process norm. Not with the global-batch aux
        # loss: its running sum over a step's micro-batches sees them in another order in one process.
        if dist.get_rank() == 0 and case != "global_batch":
            one = steps(run_config(tmp_path / case / "one", *overrides), ONE_PROCESS, 5)
            assert_close(fsdp, one)


@on_ranks(2)
def test_fsdp_trains_what_ep2_trains(tmp_path):
    for case, overrides in CASES.items():
        fsdp, plain = [
            steps(run_config(tmp_path / case / kind, "parallel.ep=2", *extra, *overrides), make_layout(2), 5)
            for kind, extra in (("fsdp", ["parallel.fsdp=true"]), ("plain", []))
        ]
        assert_close(fsdp, plain)


@on_ranks(4)
def test_fsdp_with_chunked_exchanges_and_once_per_rank_dispatch(tmp_path):
    # The experts' FSDP unit runs once per chunk of the exchange; once per rank moves other buffers.
    for name, execution in {"chunks": {"exchange_chunks": 2}, "once": {"dispatch": "once_per_rank"}}.items():
        fsdp, plain = [
            steps(
                run_config(tmp_path / name / kind, "parallel.ep=2", *extra, execution=execution),
                make_layout(2),
                3,
            )
            for kind, extra in (("fsdp", ["parallel.fsdp=true"]), ("plain", []))
        ]
        assert_close(fsdp, plain)


@on_ranks(2)
def test_fsdp_with_activation_checkpointing_and_in_bf16(tmp_path):
    fsdp = ("parallel.ep=2", "parallel.fsdp=true")
    plain = steps(run_config(tmp_path / "plain", *fsdp), make_layout(2), 3)
    recomputed = steps(
        run_config(tmp_path / "ac", *fsdp, "train.activation_checkpointing=true"), make_layout(2), 3
    )
    assert_close(recomputed, plain)
    # bf16 compute, fp32 reductions and master weights: close to fp32, not equal.
    for name, overrides in {"bf16_fsdp": fsdp, "bf16_autocast": ("parallel.ep=2",)}.items():
        bf16 = steps(run_config(tmp_path / name, *overrides, "train.dtype=bf16"), make_layout(2), 3)
        assert_close([(loss, 1.0) for loss, _ in bf16], [(loss, 1.0) for loss, _ in plain], rel=2e-2)
        assert bf16 != plain


@on_ranks(4)
def test_every_parameter_experts_included_moves_in_an_fsdp_step(tmp_path):
    trainer = Trainer(
        run_config(tmp_path, "parallel.ep=2", "parallel.fsdp=true"), make_layout(2), torch.device("cpu")
    )
    before = {n: p.to_local().clone() for n, p in trainer.model.named_parameters()}
    assert any(".experts." in n for n in before)
    trainer.train_step()
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param.to_local(), before[name]), f"{name} did not change"


@on_ranks(4)
def test_the_grad_norm_under_fsdp_is_the_one_process_norm():
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (4, 17))
    torch.manual_seed(1)
    model = build_model(SMALL, make_layout(2), fsdp=True)
    lm, aux, _ = model.loss(tokens[dist.get_rank()].unsqueeze(0))
    (lm + aux).backward()
    sharded = global_grad_norm(model, make_layout(2), fsdp=True)
    torch.manual_seed(1)
    whole = Transformer(SMALL)
    for row in tokens:  # each rank's loss is summed, as the gradients are
        lm, aux, _ = whole.loss(row.unsqueeze(0))
        (lm + aux).backward()
    want = torch.sqrt(sum(p.grad.double().square().sum() for p in whole.parameters()))
    assert abs(float(sharded) - float(want)) <= 1e-5 * float(want)


def test_an_optimizer_built_before_the_experts_were_sharded_raises():
    torch.manual_seed(0)
    model = Transformer(SMALL)
    optimizer = torch.optim.AdamW(model.parameters())
    check_optimizer_tracks(model, optimizer)  # the right one passes
    model.blocks[0].ffn = MoELayer(SMALL.moe)  # as a swap by shard_experts or FSDP would do
    try:
        check_optimizer_tracks(model, optimizer)
    except ValueError as err:
        assert "8 missing (blocks.0.ffn.experts.b1" in str(err)  # the new layer's 8 parameters
        assert "8 it holds are no longer in the model" in str(err) and "build the optimizer after" in str(err)
    else:
        raise AssertionError("a stale optimizer was accepted")


@on_ranks(4)
def test_an_fsdp_checkpoint_resumes_exactly_and_loads_without_fsdp_at_ep4_and_in_one_process_and_back(
    tmp_path,
):
    fsdp = ("parallel.ep=2", "parallel.fsdp=true", "train.checkpoint_every=3", "train.eval_every=100")
    whole = Trainer(
        run_config(tmp_path / "whole", *fsdp, "train.steps=5"), make_layout(2), torch.device("cpu")
    )
    whole_rows = [whole.train_step() for _ in range(5)]

    first = Trainer(
        run_config(tmp_path / "again", *fsdp, "train.steps=3"), make_layout(2), torch.device("cpu")
    )
    first.run()
    again = Trainer(
        run_config(tmp_path / "again", *fsdp, "train.steps=5"), make_layout(2), torch.device("cpu")
    )
    assert again.step == 3
    rows = [again.train_step() for _ in range(2)]
    assert [(r["loss"], r["grad_norm"]) for r in rows] == [
        (r["loss"], r["grad_norm"]) for r in whole_rows[3:]
    ]
    saved = full_values(first.model)

    path = tmp_path / "again" / "checkpoints" / "step_3"
    torch.manual_seed(7)  # other initial values, so that a key the load missed shows
    one_process = build_model(first.config.model, ONE_PROCESS)  # every expert, on every rank
    assert checkpoint.load(path, one_process) == 3
    whole = full_values(one_process)
    for name, value in saved.items():  # what FSDP saved: the dense part, this ep rank's experts
        assert torch.equal(whole[name][local_ids(first.model, name)], value), name
    torch.manual_seed(7)
    ep4 = build_model(first.config.model, make_layout(4))
    assert checkpoint.load(path, ep4) == 3
    for name, value in full_values(ep4).items():
        assert torch.equal(value, whole[name][local_ids(ep4, name)]), name

    # And back: saved without FSDP at ep 4, loaded with FSDP at dp 2 x ep 2.
    plain = checkpoint.save(tmp_path / "plain", 3, ep4, torch.optim.AdamW(ep4.parameters()))
    torch.manual_seed(7)
    sharded = build_model(first.config.model, make_layout(2), fsdp=True)
    assert checkpoint.load(plain, sharded) == 3
    for name, value in full_values(sharded).items():
        assert torch.equal(value, whole[name][local_ids(sharded, name)]), name


def local_ids(model: torch.nn.Module, name: str) -> list[int] | slice:
    """The global experts a stacked expert tensor `name` holds (all rows of any other tensor)."""
    if ".experts." not in name:
        return slice(None)
    return model.get_submodule(name.split(".experts.")[0]).local_expert_ids


# configs/test.toml with experts of 256 MiB in fp32 (2 layers of 64 experts x 2 x 256 x 1024)
EXPERT_HEAVY = ("model.d_model=256", "model.n_heads=4", "moe.d_hidden=1024", "moe.num_experts=64")


@pytest.mark.dist
@pytest.mark.slow
def test_building_at_ep4_allocates_only_this_ranks_parameters(tmp_path):
    # NOTE: without FSDP only (once also with it, at dp 1): what an FSDP build holds is tested on
    # ranks above (the meta build's slices), and each launch of this expert-heavy model costs
    # about 30 s.
    one_step = ("train.steps=1", "train.global_batch=4", "train.micro_batch=1", "train.eval_batches=1")
    train(tmp_path, 4, "parallel.ep=4", *EXPERT_HEAVY, *one_step)
    summary = json.loads((tmp_path / "summary.json").read_text())
    per_rank = summary["memory_per_rank"]
    for rank in range(4):
        param_mib = per_rank["param_bytes_local"][rank] / 2**20
        grew_mib = per_rank["build_peak_rss_mib"][rank] - per_rank["rss_before_build_mib"][rank]
        assert 64 < param_mib < 68, param_mib  # a quarter of the experts (64 MiB), the dense part
        assert grew_mib <= 1.3 * param_mib + 64, (rank, grew_mib, param_mib)
    assert summary["worst_build_peak_rss_mib"]["value"] == max(per_rank["build_peak_rss_mib"])
