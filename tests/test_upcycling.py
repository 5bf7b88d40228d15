"""Sparse upcycling (expert_parallel/upcycling.py): a dense model made into an MoE whose logits start
equal to the dense model's, in one process and with the experts sharded over 2 ranks; the rules
that make it exact, and the combinations that are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.distributed as dist
from rankpool import on_ranks

import expert_parallel as ep
from expert_parallel import checkpoint, upcycling
from expert_parallel.build import build_model
from expert_parallel.model import ModelConfig, Transformer
from expert_parallel.parallel import make_layout

TOLERANCE = 1e-5


def dense_config(activation: str = "relu", d_ff: int = 32) -> ModelConfig:
    return ModelConfig(
        seq_len=16, d_model=16, n_layers=2, n_heads=2, d_ff_dense=d_ff, dense_activation=activation
    )


def moe_config(dense: ModelConfig, moe_every: int = 1, **moe) -> ModelConfig:
    fields = dict(
        d_model=dense.d_model, d_hidden=16, num_experts=4, top_k=2, activation=dense.dense_activation
    )
    return dataclasses.replace(dense, moe=ep.MoEConfig(**{**fields, **moe}), moe_every=moe_every)


def trained_dense(config: ModelConfig, seed: int = 0) -> Transformer:
    """A dense model whose feed-forwards matter: every weight redrawn from N(0, 0.3) (a fresh init's
    feed-forwards add too little to the logits for a 1e-5 comparison to tell a wrong upcycle)."""
    torch.manual_seed(seed)
    model = Transformer(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + (param == 1).float())
    return model.eval()


def tokens(batch: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 16), generator=torch.Generator().manual_seed(seed))


def upcycled(dense: Transformer, config: ModelConfig, seed: int = 1, **kwargs) -> Transformer:
    torch.manual_seed(seed)
    moe = Transformer(config)
    upcycling.upcycle(dense, moe, **kwargs)
    return moe.eval()


def test_expert_weights_worked_example():
    # Dense FFN D=2, F=4; g=2, E=4: experts 0 and 2 hold hidden units 0-1, experts 1 and 3 units 2-3,
    # and every w2 is scaled by c.
    w1_DF = torch.arange(8.0).view(2, 4)  # [[0, 1, 2, 3], [4, 5, 6, 7]]
    w2_FO = torch.arange(8.0).view(4, 2)  # [[0, 1], [2, 3], [4, 5], [6, 7]]
    got = upcycling.expert_weights(w1_DF, w2_FO, None, num_experts=4, granularity=2, scale=2.0)
    assert set(got) == {"w1", "w2"}
    assert torch.equal(got["w1"][0], torch.tensor([[0.0, 1.0], [4.0, 5.0]]))
    assert torch.equal(got["w1"][1], torch.tensor([[2.0, 3.0], [6.0, 7.0]]))
    assert torch.equal(got["w1"][2], got["w1"][0]) and torch.equal(got["w1"][3], got["w1"][1])
    assert torch.equal(got["w2"][1], torch.tensor([[8.0, 10.0], [12.0, 14.0]]))
    local = upcycling.expert_weights(
        w1_DF, w2_FO, w1_DF + 1, num_experts=4, granularity=2, scale=2.0, expert_ids=[3]
    )
    assert torch.equal(local["w1"][0], got["w1"][3]) and torch.equal(local["w3"][0], got["w1"][3] + 1)
    # The shards' hidden units are the dense ones: summed, they are the dense FFN for any activation.
    x = torch.randn(5, 2)
    for act in (torch.relu, torch.nn.functional.gelu, torch.nn.functional.silu):
        shards = sum(act(x @ got["w1"][i]) @ got["w2"][i] for i in range(2)) / 2.0
        torch.testing.assert_close(shards, act(x @ w1_DF) @ w2_FO)


def test_router_rows_form_virtual_groups():
    router = torch.arange(12.0).view(6, 2)
    assert torch.equal(upcycling.router_rows(router, 2), router[[0, 0, 1, 1, 2, 2]])
    assert torch.equal(upcycling.router_rows(router, 3), router[[0, 0, 0, 1, 1, 1]])
    assert torch.equal(upcycling.router_rows(router, 1), router)


def test_down_scale():
    base = ep.MoEConfig(d_model=8, d_hidden=8, num_experts=8, top_k=4)
    assert upcycling.down_scale(base, 2) == 2.0  # normalised top-k: weights 1/4 per expert, 2 copies
    assert upcycling.down_scale(dataclasses.replace(base, routed_scaling_factor=2.5), 4) == 4 / 2.5
    assert upcycling.down_scale(dataclasses.replace(base, top_k=8, normalize_weights=False), 2) == 2.0
    unnormalised = dataclasses.replace(base, normalize_weights=False)
    assert upcycling.down_scale(unnormalised, 2, exact=False) == 2 * 8 / 4  # Megatron's g * E / k


# name -> (dense activation, d_ff, moe_every, MoEConfig fields): every combination the module doc
# calls exact. tiny-like: tiny-dense -> tiny.toml's shape (g = 2, one copy per token).
EXACT = {
    "g1-top2": ("relu", 16, 1, {}),
    "tiny-like-g2-top2": ("relu", 32, 1, {}),
    "g2-top4-of-8-swiglu-biases": ("swiglu", 32, 1, dict(num_experts=8, top_k=4, bias=True)),
    "g4-top4-of-8-gelu": ("gelu", 64, 1, dict(num_experts=8, top_k=4)),
    "sigmoid-scaled-groups-bias": (
        "silu",
        32,
        1,
        dict(
            num_experts=8,
            top_k=4,
            score_func="sigmoid",
            routed_scaling_factor=2.5,
            num_groups=2,
            group_topk=1,
            selection_bias=True,
        ),
    ),
    "unnormalised-top-all": ("relu", 32, 1, dict(top_k=4, normalize_weights=False)),
    "shared-gated-every-2nd": (
        "swiglu",
        32,
        2,
        dict(num_shared_experts=1, shared_expert_gate=True, router_jitter=0.1),
    ),
    "scaled-input-relu": ("relu", 32, 1, dict(scale_expert_input=True)),
}


@pytest.mark.parametrize("case", EXACT)
def test_upcycled_logits_equal_the_dense_models(case):
    activation, d_ff, moe_every, fields = EXACT[case]
    dense = trained_dense(dense_config(activation, d_ff))
    config = moe_config(dense.config, moe_every, **fields)
    moe = upcycled(dense, config)
    x = tokens()
    with torch.no_grad():
        want, _ = dense(x)
        got, outputs = moe(x)
    assert want.abs().max() > 1.0  # logits of a size where 1e-5 means something
    assert (got - want).abs().max() < TOLERANCE
    g = d_ff // config.moe.d_hidden
    for moe_out in outputs:
        ids_TK = moe_out.stats.expert_ids
        # each token takes one of each shard per copy it takes, and the tokens spread over copies
        shards_TK = (ids_TK % g).sort(dim=1).values
        assert torch.equal(
            shards_TK, torch.arange(g).repeat(config.moe.top_k // g).sort().values.expand_as(ids_TK)
        )
        if config.moe.top_k < config.moe.num_experts:
            assert (ids_TK // g).unique().numel() > 1


def test_a_wrong_scale_is_seen():
    """The comparison above can fail: w2 without the factor g gives other logits."""
    dense = trained_dense(dense_config("relu", 32))
    moe = upcycled(dense, moe_config(dense.config))
    with torch.no_grad():
        for _, layer in moe.moe_layers():
            layer.experts.w2 /= 2
        want, got = dense(tokens())[0], moe(tokens())[0]
    assert (got - want).abs().max() > 1e-2


def test_megatrons_scale_is_exact_for_a_uniform_router_only():
    """exact=False with unnormalised top-2 of 4: c = g * E / k is right when the router is uniform."""
    dense = trained_dense(dense_config("relu", 32))
    config = moe_config(dense.config, normalize_weights=False)
    with pytest.raises(ValueError, match="normalize_weights=false"):
        upcycled(dense, config)
    moe = upcycled(dense, config, exact=False)
    x = tokens()
    with torch.no_grad():
        want = dense(x)[0]
        assert (moe(x)[0] - want).abs().max() > TOLERANCE  # a seeded router: not exact
        for _, layer in moe.moe_layers():
            layer.router.weight.zero_()
            if layer.router.bias is not None:
                layer.router.bias.zero_()
        assert (moe(x)[0] - want).abs().max() < TOLERANCE


INEXACT = {
    "top3-of-g2": (dict(top_k=3), "top_k=3 is not a multiple"),
    "unnormalised": (dict(normalize_weights=False), "normalize_weights=false"),
    "unnormalised-sigmoid-top-all": (
        dict(top_k=4, normalize_weights=False, score_func="sigmoid"),
        "normalize_weights=false",
    ),
    "normalize-min": (dict(normalize_min=0.5), "normalize_min"),
    "capacity": (dict(capacity_factor=1.0), "capacity_factor"),
    "groups-split-copies": (dict(num_experts=8, top_k=4, num_groups=8, group_topk=4), "num_groups=8"),
    "scaled-input-gelu": (dict(scale_expert_input=True, activation="gelu"), "scale_expert_input"),
}


@pytest.mark.parametrize("case", INEXACT)
def test_inexact_combinations_are_refused(case):
    fields, message = INEXACT[case]
    dense = trained_dense(dense_config(fields.get("activation", "relu"), 32))
    with pytest.raises(ValueError, match=message):
        upcycled(dense, moe_config(dense.config, **fields))


def test_models_that_do_not_match_are_refused():
    dense = trained_dense(dense_config("relu", 32))
    cases = [
        (dataclasses.replace(moe_config(dense.config), n_layers=3), "n_layers"),
        (moe_config(dense.config, activation="gelu"), "activation='gelu'"),
        (moe_config(dense.config, d_hidden=12), "d_hidden=12 must divide"),
        (moe_config(dense.config, num_experts=3, top_k=2), "granularity 2 must divide"),
        (dataclasses.replace(moe_config(dense.config, moe_every=2), d_ff_dense=64), "d_ff_dense"),
    ]
    for config, message in cases:
        with pytest.raises(ValueError, match=message):
            upcycled(dense, config)
    with pytest.raises(ValueError, match="must be dense"):
        upcycling.upcycle(upcycled(dense, moe_config(dense.config)), Transformer(moe_config(dense.config)))


def save_dense(model: Transformer, out_dir, step: int) -> None:
    """A dense run's out_dir as the trainer leaves it: config.json and checkpoints/step_<step>."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({"model": model.config.to_dict()}))
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint.save(out_dir / "checkpoints", step, model, optimizer)


def test_load_dense_from_a_checkpoint_in_one_process(tmp_path):
    dense = trained_dense(dense_config("swiglu", 32))
    save_dense(dense, tmp_path / "dense", step=7)
    config = moe_config(dense.config, num_experts=8, top_k=4)
    torch.manual_seed(3)
    moe = build_model(config, make_layout(1))
    rng = torch.get_rng_state()
    step, g = upcycling.load_dense(tmp_path / "dense", moe)
    assert (step, g) == (7, 2) and torch.equal(torch.get_rng_state(), rng)
    with torch.no_grad():
        assert (moe.eval()(tokens())[0] - dense(tokens())[0]).abs().max() < TOLERANCE
    with pytest.raises(ValueError, match="no checkpoint"):
        upcycling.load_dense(tmp_path, moe)


@on_ranks(2)
def test_upcycled_experts_sharded_over_2_ranks_equal_the_dense_model(tmp_path):
    """ep = 2: each rank builds only its 4 of the 8 experts from the dense checkpoint; the logits
    of every rank's own tokens equal the dense model's."""
    rank = dist.get_rank()
    dense = trained_dense(dense_config("swiglu", 32))
    save_dense(dense, tmp_path / "dense", step=3)  # every rank writes the same replicated tensors
    config = moe_config(dense.config, num_experts=8, top_k=4)
    torch.manual_seed(3)
    moe = build_model(config, make_layout(2))
    assert [layer.local_expert_ids for _, layer in moe.moe_layers()][0] == list(range(4 * rank, 4 * rank + 4))
    assert upcycling.load_dense(tmp_path / "dense", moe) == (3, 2)
    x = tokens(batch=2 + rank, seed=rank)
    with torch.no_grad():
        got, outputs = moe.eval()(x)
        want, _ = dense(x)
    assert (got - want).abs().max() < TOLERANCE
    sent = sum(int(o.stats.rows_sent_to_other_ranks) for o in outputs)
    assert sent > 0  # tokens met experts on the other rank
