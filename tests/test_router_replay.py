"""Router record and replay: every forward reports its logical expert ids, `routes=` replays them.

The spec (docs/post-training.md):
- `RoutingStats.expert_ids` [T, K]: the logical ids chosen, before capacity.
- `MoELayer.forward(x, routes=R)`: the chosen ids are exactly R's; the weights are the
  router's own scores (softmax or sigmoid, normalised, scaled) of the live logits at R, so
  the router gets gradients; a row of -1 routes natively; capacity applies after the replay;
  bad R is a ValueError naming the layer (on every rank of a group, without a hang).
- Replaying a forward's own ids reproduces it bitwise; the EP layer with replay equals the
  one-process layer; under replicas the ids stay logical; activation checkpointing
  recomputes with the forward's (replayed) ids.
- `Transformer.forward(tokens, routes=R [B, S, L_moe, K])`, `generate(record_routes=True)`,
  and `launch.generate --record-routes FILE`, replayed at another ep size.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from asserts import assert_close, assert_equal
from multirank import run_module as launch
from rankpool import on_ranks
from torch.utils.checkpoint import checkpoint

import expert_parallel as ep
from expert_parallel import tensorfile
from expert_parallel.layer import stack_routes
from expert_parallel.model import ModelConfig, Transformer
from expert_parallel.placement import balance
from expert_parallel.router import route

BASE = ep.MoEConfig(d_model=16, d_hidden=24, num_experts=8, top_k=2, aux_loss_coef=0.01)
# The score functions and weight rules the replayed weights must follow.
CONFIGS = {
    "softmax": BASE,
    "sigmoid-bias-groups-min-scale": replace(
        BASE,
        score_func="sigmoid",
        selection_bias=True,
        num_groups=4,
        group_topk=2,
        normalize_min=0.5,
        routed_scaling_factor=2.5,
    ),
    "softmax-unnormalised-top3-capacity": replace(
        BASE, top_k=3, normalize_weights=False, capacity_factor=1.0, min_capacity=1
    ),
}


def make_layer(config: ep.MoEConfig, seed: int = 0, **kwargs) -> ep.MoELayer:
    torch.manual_seed(seed)
    layer = ep.MoELayer(config, name="moe", **kwargs)
    if layer.selection_bias is not None:  # a trained-looking bias, which changes choices
        layer.selection_bias.copy_(
            torch.randn(config.num_experts, generator=torch.Generator().manual_seed(5))
        )
    return layer


def step(layer: ep.MoELayer, x: torch.Tensor, routes: torch.Tensor | None = None):
    """Forward + backward of out.sum() * 1.5 + aux: (out, stats, input grad, {name: grad})."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out, aux, stats = layer(x, routes=routes)
    (out.square().sum() + aux).backward()
    return out.detach(), stats, x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def other_routes(native_TK: torch.Tensor, num_experts: int, seed: int = 3) -> torch.Tensor:
    """[T, K] distinct ids per row, each row's first differing from the native first choice."""
    T, K = native_TK.shape
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(num_experts, generator=gen)[:K] for _ in range(T)]
    routes = torch.stack(rows)
    clash = routes[:, 0] == native_TK[:, 0]
    routes[clash] = routes[clash].roll(1, dims=1)
    return routes


def expert_outputs(layer: ep.MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """[E, T, O]: every expert applied to every token (rows_per_expert puts all T at expert e)."""
    E, T = layer.config.num_experts, x_TD.shape[0]
    return torch.stack([layer.experts(x_TD, [T if i == e else 0 for i in range(E)]) for e in range(E)])


# -- one process ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_replaying_a_forwards_own_ids_reproduces_it_bitwise(name):
    config = CONFIGS[name]
    layer = make_layer(config)
    x = torch.randn(40, config.d_model, generator=torch.Generator().manual_seed(1))
    out, stats, dx, grads = step(layer, x)
    assert stats.expert_ids.shape == (40, config.top_k) and stats.expert_ids.dtype == torch.long
    again, stats_again, dx_again, grads_again = step(layer, x, routes=stats.expert_ids.to(torch.int16))
    assert_equal("ids", stats_again.expert_ids, stats.expert_ids)
    assert_equal("output", again, out)
    assert_equal("input grad", dx_again, dx)
    for pname in grads:
        assert_equal(f"grad {pname}", grads_again[pname], grads[pname])
    assert_equal("tokens per expert", stats_again.tokens_per_expert, stats.tokens_per_expert)
    assert_equal("dropped", stats_again.num_dropped, stats.num_dropped)


@pytest.mark.parametrize("name", CONFIGS)
def test_replayed_weights_are_the_routers_scores_of_the_live_logits_at_the_routes(name):
    config = replace(CONFIGS[name], capacity_factor=None)  # no drops: every weight shows
    E = config.num_experts
    logits_TE = torch.randn(30, E, generator=torch.Generator().manual_seed(2)) * 2
    bias_E = torch.randn(E) if config.selection_bias else None
    native = route(logits_TE, config, selection_bias_E=bias_E)
    routes_TK = other_routes(native.expert_ids, E)
    routing = route(logits_TE, config, selection_bias_E=bias_E, routes_TK=routes_TK)
    assert_equal("ids", routing.expert_ids, routes_TK)
    # Written out: the score function at R (the selection bias only selects), then the weight rules.
    if config.score_func == "softmax":
        scores_TK = logits_TE.softmax(-1).gather(1, routes_TK)
    else:
        scores_TK = logits_TE.sigmoid().gather(1, routes_TK)
    weights_TK = scores_TK
    if config.normalize_weights:
        weights_TK = scores_TK / scores_TK.sum(-1, keepdim=True).clamp(min=config.normalize_min)
    assert_close("weights", routing.weights, weights_TK * config.routed_scaling_factor, 1e-6)


def test_the_replayed_layer_is_the_written_out_mixture_and_the_router_learns_from_it():
    config = replace(BASE, score_func="sigmoid", routed_scaling_factor=2.0)
    layer = make_layer(config)
    x = torch.randn(24, config.d_model, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        routes_TK = other_routes(layer(x).stats.expert_ids, config.num_experts)
    out, stats, _, grads = step(layer, x, routes=routes_TK)
    assert_equal("ids", stats.expert_ids, routes_TK)
    # out_t = sum_k w_tk * expert_{R_tk}(x_t), w the normalised sigmoid scores of the live logits.
    layer.zero_grad(set_to_none=True)
    scores_TK = layer.router(x).sigmoid().gather(1, routes_TK)
    weights_TK = scores_TK / scores_TK.sum(-1, keepdim=True) * config.routed_scaling_factor
    y_ETO = expert_outputs(layer, x)
    picked_TKO = y_ETO[routes_TK, torch.arange(24).unsqueeze(1)]
    want = (weights_TK.unsqueeze(-1) * picked_TKO).sum(1)
    want.square().sum().backward()
    assert_close("output", out, want.detach(), 1e-5)
    assert grads["router.weight"].abs().sum() > 0, "the router got no gradient"
    # The aux loss also reaches the router; without it the gradients are the formula's.
    layer_no_aux = make_layer(replace(config, aux_loss_coef=0.0))
    _, _, _, grads_no_aux = step(layer_no_aux, x, routes=routes_TK)
    assert_close("router grad", grads_no_aux["router.weight"], layer.router.weight.grad, 1e-4)


def test_rows_of_minus_one_route_natively():
    layer = make_layer(BASE)
    x = torch.randn(20, BASE.d_model, generator=torch.Generator().manual_seed(6))
    native_out, native, _, _ = step(layer, x)
    routes_TK = other_routes(native.expert_ids, BASE.num_experts)
    routes_TK[::2] = -1  # even rows natively, odd rows replayed
    out, stats, _, _ = step(layer, x, routes=routes_TK)
    assert_equal("native rows' ids", stats.expert_ids[::2], native.expert_ids[::2])
    assert_equal("replayed rows' ids", stats.expert_ids[1::2], routes_TK[1::2])
    assert_close("native rows' output", out[::2], native_out[::2], 1e-6)
    assert not torch.allclose(out[1::2], native_out[1::2])


BAD_ROUTES = {
    "shape": (lambda r: r[:-1], "routes must be an integer tensor \\[T=12, top_k=2\\]"),
    "float": (lambda r: r.float(), "integer tensor"),
    "too large": (lambda r: r.index_fill(0, torch.tensor([3]), 8), "in \\[0, 8\\) or -1"),
    "below -1": (lambda r: r.index_fill(0, torch.tensor([3]), -2), "in \\[0, 8\\) or -1"),
    "repeated": (lambda r: torch.cat([r[:, :1], r[:, :1]], 1), "repeat within rows"),
    "mixed -1": (lambda r: torch.cat([r[:, :1], torch.full_like(r[:, :1], -1)], 1), "mix them"),
}


@pytest.mark.parametrize("case", BAD_ROUTES)
def test_bad_routes_are_a_value_error_naming_the_layer(case):
    change, message = BAD_ROUTES[case]
    layer = make_layer(BASE)
    x = torch.randn(12, BASE.d_model)
    routes = change(torch.arange(2).repeat(12, 1))
    with pytest.raises(ValueError, match=f"MoELayer 'moe' on rank 0 of 1: .*{message}"):
        layer(x, routes=routes)


def test_capacity_applies_after_the_replay_and_counts_the_drops():
    config = replace(BASE, capacity_factor=1.0, min_capacity=1)  # C = ceil(16 * 2 / 8) = 4
    layer = make_layer(config)
    x = torch.randn(16, config.d_model)
    routes_TK = torch.tensor([[0, 1]] * 12 + [[2, 3]] * 4)  # experts 0 and 1 asked 12 times each
    _, stats, _, _ = step(layer, x, routes=routes_TK)
    assert stats.capacity == 4
    assert_equal("ids before capacity", stats.expert_ids, routes_TK)
    assert_equal("choices", stats.choices_per_expert, torch.tensor([12, 12, 4, 4, 0, 0, 0, 0]))
    assert_equal("kept", stats.tokens_per_expert, torch.tensor([4, 4, 4, 4, 0, 0, 0, 0]))
    assert int(stats.num_dropped) == 16  # 8 of expert 0's and 8 of expert 1's


def test_activation_checkpointing_recomputes_with_the_forwards_replayed_ids():
    config = replace(BASE, capacity_factor=1.0, min_capacity=1, router_jitter=0.1)
    layer = make_layer(config).train()
    x = torch.randn(20, config.d_model, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        routes_TK = other_routes(layer(x).stats.expert_ids, config.num_experts)
    torch.manual_seed(11)
    out, stats, dx, grads = step(layer, x, routes=routes_TK)

    layer.zero_grad(set_to_none=True)
    xc = x.clone().requires_grad_(True)
    given = {"routes": routes_TK}  # read when the function runs: in the forward and in its recompute
    torch.manual_seed(11)
    out_c = checkpoint(lambda x_: layer(x_, routes=given["routes"]).out, xc, use_reentrant=False)
    given["routes"] = other_routes(routes_TK, config.num_experts, seed=9)  # the recompute must not use it
    out_c.square().sum().backward()
    # The aux loss was left out of the checkpointed backward: compare against a run without it.
    layer_ref = copy.deepcopy(layer)
    layer_ref.config = replace(config, aux_loss_coef=0.0)
    torch.manual_seed(11)
    _, _, dx_ref, grads_ref = step(layer_ref, x, routes=routes_TK)
    assert_equal("output", out_c.detach(), out)
    assert_equal("input grad", xc.grad, dx_ref)
    for pname, param in layer.named_parameters():
        assert_equal(f"grad {pname}", param.grad, grads_ref[pname])


# -- the byte-level model ---------------------------------------------------------------------

TINY = ModelConfig(
    seq_len=32,
    d_model=16,
    n_layers=3,
    n_heads=2,
    moe_every=1,
    moe=ep.MoEConfig(d_model=16, d_hidden=16, num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1),
)


def tiny_model(seed: int = 0, config: ModelConfig = TINY) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config)


def test_transformer_replays_every_moe_layer_and_checks_the_routes_shape():
    model = tiny_model().train()
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    _, outputs = model(tokens[:, :-1])
    recorded = stack_routes(outputs, 2)
    assert recorded.shape == (2, 8, 3, 2)
    routes = torch.stack(
        [other_routes(r, 4, seed=i) for i, r in enumerate(recorded.view(16, 3, 2).unbind(1))], 1
    )
    routes = routes.view(2, 8, 3, 2)
    grads = {}
    for ac in (False, True):
        model.activation_checkpointing = ac
        model.zero_grad(set_to_none=True)
        lm_loss, aux_loss, outputs = model.loss(tokens, routes=routes)
        (lm_loss + aux_loss).backward()
        assert_equal(f"replayed ids (AC {ac})", stack_routes(outputs, 2), routes)
        grads[ac] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in grads[False].items():
        assert_equal(f"AC grad {name}", grads[True][name], grad)
    with pytest.raises(ValueError, match="Transformer.forward: routes must be \\[B, S, L_moe=3, K\\]"):
        model(tokens[:, :-1], routes=routes[:, :, :2])


def test_generate_records_routes_that_a_forward_replays():
    model = tiny_model(config=replace(TINY, moe=replace(TINY.moe, capacity_factor=None))).eval()
    prompts = [torch.tensor(list(b"def f(x):")), torch.tensor(list(b"import"))]
    rows, routes = model.generate(prompts, 12, temperature=0.0, record_routes=True)
    for row, prompt, routes_SLK in zip(rows, prompts, routes):
        assert routes_SLK.shape == (row.numel(), 3, 2) and bool((routes_SLK >= 0).all())
        logits, outputs = model(row[None], routes=routes_SLK[None])
        assert_equal("replayed ids", stack_routes(outputs, 1)[0], routes_SLK)
        native_logits, native = model(row[None])
        assert_equal("the generation's ids are the forward's", stack_routes(native, 1)[0], routes_SLK)
        assert_close("logits", logits, native_logits, 1e-5)
        # Greedy: each generated token is the argmax of the replayed logits before it.
        assert_equal("tokens", logits[0, prompt.numel() - 1 : -1].argmax(-1), row[prompt.numel() :])
    plain = model.generate(prompts, 12, temperature=0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, rows))


def test_the_routes_file_is_safetensors(tmp_path):
    tensors = {
        "routes": torch.randint(-1, 8, (2, 5, 3, 2), dtype=torch.int16),
        "tokens": torch.arange(10, dtype=torch.int32).view(2, 5),
    }
    tensorfile.save_file(tensors, tmp_path / "r.safetensors", {"moe_layers": "a,b,c"})
    back = tensorfile.load_file(tmp_path / "r.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert tensorfile.load_metadata(tmp_path / "r.safetensors") == {"moe_layers": "a,b,c"}
    safetensors = pytest.importorskip("safetensors.torch", reason="safetensors not installed")
    theirs = safetensors.load_file(tmp_path / "r.safetensors")
    assert all(torch.equal(theirs[k], tensors[k]) and theirs[k].dtype == tensors[k].dtype for k in tensors)
    safetensors.save_file(tensors, tmp_path / "theirs.safetensors")
    assert all(
        torch.equal(tensorfile.load_file(tmp_path / "theirs.safetensors")[k], tensors[k]) for k in tensors
    )


def test_a_file_is_replaced_whole_and_a_failed_write_leaves_the_old_one(tmp_path, monkeypatch):
    """save_file writes beside the target and renames it into place: a reader sees the old file
    or the new one, and a write that fails midway leaves the old file and no partial one."""
    path = tmp_path / "r.safetensors"
    tensorfile.save_file({"a": torch.zeros(3)}, path)
    tensorfile.save_file({"a": torch.ones(4)}, path)
    assert torch.equal(tensorfile.load_file(path)["a"], torch.ones(4))
    real_open = open

    def open_then_fail(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            handle.write(b"half")
            handle.close()
            raise OSError("disk full")
        return handle

    monkeypatch.setattr("builtins.open", open_then_fail)
    with pytest.raises(OSError, match="disk full"):
        tensorfile.save_file({"a": torch.full((5,), 2.0)}, path)
    monkeypatch.undo()
    assert torch.equal(tensorfile.load_file(path)["a"], torch.ones(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"]


# -- on 2 ranks -------------------------------------------------------------------------------

ZIPF_E = 1.0 / torch.arange(1, 9, dtype=torch.float32)
EP_CASES = {
    "per-assignment-capacity": (replace(BASE, capacity_factor=1.0, min_capacity=1), "per_assignment", False),
    "once-per-rank-sigmoid": (replace(BASE, score_func="sigmoid"), "once_per_rank", False),
    "replicas": (BASE, "per_assignment", True),
}


@pytest.mark.parametrize("case", EP_CASES)
@on_ranks(2)
def test_the_ep_layer_replays_as_the_one_process_layer(case):
    config, dispatch, replicas = EP_CASES[case]
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = make_layer(config, seed=1)
    placement = balance(ZIPF_E, world, world) if replicas else None
    execution = ep.ExecutionConfig(dispatch=dispatch)
    layer = make_layer(config, seed=1, group=dist.group.WORLD, execution=execution, placement=placement)
    x = torch.randn(18 + 5 * rank, config.d_model, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        routes_TK = other_routes(reference(x).stats.expert_ids, config.num_experts, seed=rank)
    routes_TK[::3] = -1
    for given in (None, routes_TK):
        out_ref, stats_ref, dx_ref, grads_ref = step(reference, x, given)
        out, stats, dx, grads = step(layer, x, given)
        layer.sync_replica_grads()
        summed = {n: g.clone() for n, g in grads_ref.items() if n.startswith("experts.")}
        for grad in summed.values():
            dist.all_reduce(grad)
        what = "native" if given is None else "replayed"
        assert_equal(f"{what}: logical ids", stats.expert_ids, stats_ref.expert_ids)
        assert_close(f"{what}: output", out, out_ref, 1e-5)
        assert_close(f"{what}: input grad", dx, dx_ref, 1e-5)
        assert_close(f"{what}: router grad", grads["router.weight"], grads_ref["router.weight"], 1e-5)
        for name, grad in summed.items():
            assert_close(
                f"{what}: {name}", layer.get_parameter(name).grad, grad[layer.local_expert_ids], 1e-4
            )
        assert_equal(f"{what}: kept", stats.tokens_per_expert, stats_ref.tokens_per_expert)
    replayed = routes_TK[:, 0] >= 0
    assert_equal("the replayed rows", stats.expert_ids[replayed], routes_TK[replayed])


@on_ranks(2)
def test_bad_routes_on_one_rank_fail_every_rank_without_a_hang():
    rank = dist.get_rank()
    layer = make_layer(BASE, seed=2, group=dist.group.WORLD)
    x = torch.randn(10, BASE.d_model)
    good = torch.arange(2).repeat(10, 1)
    bad = good.clone().index_fill_(0, torch.tensor([4]), 8) if rank == 1 else good
    with pytest.raises(ValueError) as raised:
        layer(x, routes=bad)
    if rank == 1:
        assert "MoELayer 'moe' on rank 1 of 2: routes must be logical expert ids in [0, 8)" in str(
            raised.value
        )
    else:
        assert "MoELayer 'moe' on rank 0 of 2" in str(raised.value) and "rank(s) [1]" in str(raised.value)
    assert_equal("the next forward runs on both", layer(x, routes=good).stats.expert_ids, good)


# -- launch.generate --record-routes, replayed at another ep size -----------------------------

PROMPTS = ["def ", "import os", "class Foo(object):"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A run directory with a checkpoint of a tiny model after one step, and its recordings at ep 1
    (ep1.safetensors) and ep 2 (ep2.safetensors) of 3 prompts, greedy."""
    run = tmp_path_factory.mktemp("replay")
    # Dropless, as generation routes: a capacity in the replay's forward could drop what decoding kept.
    moe = replace(TINY.moe, d_model=32, d_out=32, capacity_factor=None)
    config = replace(TINY, d_model=32, n_layers=2, moe=moe)
    model = tiny_model(config=config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lm_loss, aux_loss, _ = model.loss(
        torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))
    )
    (lm_loss + aux_loss).backward()
    optimizer.step()
    from expert_parallel import checkpoint as checkpoints

    checkpoints.save(run / "checkpoints", 1, model, optimizer)
    (run / "config.json").write_text(json.dumps({"model": config.to_dict()}))
    (run / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    args = ["-m", "launch.generate", "--checkpoint", str(run), "--prompts-file", str(run / "prompts.txt")]
    args += ["--top-k", "1", "--tokens", "12"]
    for world in (1, 2):
        launch(world, *args, "--record-routes", str(run / f"ep{world}.safetensors"))
    return run


def load_checkpoint(run: Path) -> Transformer:
    from launch.generate import find_checkpoint, load_model

    step_dir, out_dir = find_checkpoint(run)
    return load_model(step_dir, out_dir, torch.device("cpu"))[0]


def replay_rows(model: Transformer, recording: dict) -> list[tuple[torch.Tensor, list]]:
    """Each row's (logits, outputs) of a forward over its real tokens with its recorded routes."""
    results = []
    for tokens_S, routes_SLK in zip(recording["tokens"], recording["routes"]):
        real = tokens_S >= 0
        results.append(model(tokens_S[real].long()[None], routes=routes_SLK[real][None]))
    return results


@pytest.mark.dist
@pytest.mark.slow
def test_launch_generate_records_the_same_routes_at_ep1_and_ep2(recorded):
    ep1 = tensorfile.load_file(recorded / "ep1.safetensors")
    ep2 = tensorfile.load_file(recorded / "ep2.safetensors")
    longest = max(map(len, PROMPTS)) + 12
    assert ep1["routes"].dtype == torch.int16 and ep1["routes"].shape == (3, longest, 2, 2)
    assert ep1["tokens"].shape == (3, longest)
    assert_equal("tokens", ep2["tokens"], ep1["tokens"])
    assert_equal("routes", ep2["routes"], ep1["routes"])
    padding = ep1["tokens"] < 0
    assert bool((ep1["routes"][padding] == -1).all()) and bool((ep1["routes"][~padding] >= 0).all())
    assert tensorfile.load_metadata(recorded / "ep1.safetensors")["moe_layers"] == "blocks.0.ffn,blocks.1.ffn"


@pytest.mark.dist
@pytest.mark.slow
def test_the_ep2_recording_replays_at_ep1(recorded):
    model = load_checkpoint(recorded)
    recording = tensorfile.load_file(recorded / "ep2.safetensors")
    for (logits, outputs), tokens_S, routes_SLK, prompt in zip(
        replay_rows(model, recording), recording["tokens"], recording["routes"], PROMPTS
    ):
        real = tokens_S >= 0
        assert_equal("ids", stack_routes(outputs, 1)[0], routes_SLK[real].long())
        generated = tokens_S[real][len(prompt) :].long()
        assert_equal("greedy tokens", logits[0, len(prompt) - 1 : -1].argmax(-1), generated)


@pytest.mark.slow
@on_ranks(2)
def test_the_ep1_recording_replays_at_ep2(recorded):
    sharded = load_checkpoint(recorded)  # under the pool's group: the experts sharded over 2 ranks
    assert sharded.moe_layers()[0][1].group is not None
    recording = tensorfile.load_file(recorded / "ep1.safetensors")
    with torch.no_grad():
        got = replay_rows(sharded, recording)
    for (logits, outputs), tokens_S, routes_SLK, prompt in zip(
        got, recording["tokens"], recording["routes"], PROMPTS
    ):
        real = tokens_S >= 0
        assert_equal("ids", stack_routes(outputs, 1)[0], routes_SLK[real].long())
        generated = tokens_S[real][len(prompt) :].long()
        assert_equal("greedy tokens", logits[0, len(prompt) - 1 : -1].argmax(-1), generated)


# -- Hugging Face models (the hf extra) -------------------------------------------------------


@pytest.mark.extras
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_hf_models_record_and_replay(tmp_path, family):
    pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")
    from test_hf_pretrained import save_tiny

    from expert_parallel.hf import HFCausalLM, from_pretrained
    from expert_parallel.hf import generate as hf_generate

    save_tiny(tmp_path, family)
    hf_model = from_pretrained(tmp_path).eval()
    lm = HFCausalLM(hf_model)
    tokens = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, outputs = lm(tokens)
        recorded = stack_routes(outputs, 2)
        assert recorded.shape == (2, 7, 2, 2)
        again, outputs_again = lm(tokens, routes=recorded)
        assert_equal("own ids replayed: logits", again, logits)
        routes = torch.stack(
            [other_routes(r, 8, seed=i) for i, r in enumerate(recorded.view(14, 2, 2).unbind(1))], 1
        )
        _, replayed = lm(tokens, routes=routes.view(2, 7, 2, 2))
        assert_equal("other ids replayed", stack_routes(replayed, 2), routes.view(2, 7, 2, 2))
    lm_loss, _, _ = lm.loss(tokens, routes=routes.view(2, 7, 2, 2))  # [B, S + 1]: the last unused
    lm_loss.backward()
    assert lm.moe_layers()[0][1].router.weight.grad.abs().sum() > 0

    prompts = [torch.tensor([5, 9, 11]), torch.tensor([7])]
    new, routes = hf_generate(hf_model, prompts, record_routes=True, max_new_tokens=5, do_sample=False)
    for prompt, new_N, routes_SLK in zip(prompts, new, routes):
        row = torch.cat([prompt, new_N])
        assert routes_SLK.shape == (row.numel(), 2, 2)
        assert bool((routes_SLK[-1] == -1).all()) and bool((routes_SLK[:-1] >= 0).all())
        with torch.no_grad():
            logits, outputs = lm(row[None], routes=routes_SLK[None])
            _, native = lm(row[None])
        assert_equal("replayed ids", stack_routes(outputs, 1)[0, :-1], routes_SLK[:-1])
        assert_equal("the generation's ids", stack_routes(native, 1)[0, :-1], routes_SLK[:-1])
        assert_equal("greedy tokens", logits[0, prompt.numel() - 1 : -1].argmax(-1), new_N)


@pytest.mark.extras
@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="the hf extra: pip install -e '.[hf]'"
)  # NOTE: here, not on the ranks: a skip raised there would fail the test
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@on_ranks(2)
def test_hf_replay_with_the_experts_over_2_ranks_equals_one_process(tmp_path, family):
    """The same replayed routes give the one-process model's ids, logits and router gradient when
    the experts are sharded over 2 ranks (each rank its own tokens)."""
    from test_hf_pretrained import save_tiny

    from expert_parallel.hf import HFCausalLM, from_pretrained

    rank = dist.get_rank()
    if rank == 0:
        save_tiny(tmp_path, family)
    dist.barrier()
    one, two = HFCausalLM(from_pretrained(tmp_path)), HFCausalLM(from_pretrained(tmp_path, dist.group.WORLD))
    tokens = torch.randint(0, 128, (2, 6 + rank), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        native = stack_routes(one(tokens)[1], 2)
    routes = torch.stack(
        [other_routes(r, 8, seed=i + 10 * rank) for i, r in enumerate(native.flatten(0, 1).unbind(1))], 1
    ).view(native.shape)
    results = []
    for lm in (one, two):
        logits, outputs = lm(tokens, routes=routes)
        (logits.square().mean()).backward()
        results.append((logits.detach(), stack_routes(outputs, 2), lm.moe_layers()[0][1].router.weight.grad))
    (logits_one, ids_one, grad_one), (logits_two, ids_two, grad_two) = results
    assert_equal("replayed ids, one process", ids_one, routes)
    assert_equal("replayed ids, 2 ranks", ids_two, routes)
    assert_close("logits", logits_two, logits_one, 1e-5)
    assert_close("router gradient", grad_two, grad_one, 1e-5)
