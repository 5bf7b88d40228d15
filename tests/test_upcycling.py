"""Sparse upcycling (expert_parallel/upcycling.py): a dense model made into an MoE whose logits start
equal to the dense model's, in one process and with the experts sharded over 2 ranks; the rules
that make it exact, and the combinations that are refused."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch
import torch.distributed as dist
from multirank import REPO
from rankpool import on_ranks

import expert_parallel as ep
from expert_parallel import checkpoint, upcycling
from expert_parallel.build import build_model
from expert_parallel.config_file import load_toml
from expert_parallel.model import ModelConfig, Transformer
from expert_parallel.parallel import make_layout
from expert_parallel.placement import balance
from expert_parallel.training import RunConfig, Trainer
from launch import upcycle as launch_upcycle
from launch.generate import load_model

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
    """A dense model whose feed-forwards matter: every weight redrawn from N(0, 0.3), the norms from
    1 + N(0, 0.3) (a fresh init's feed-forwards add too little to the logits for a 1e-5 comparison
    to tell a wrong upcycle)."""
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


def test_the_dense_adamw_state_comes_along():
    """Copied tensors keep their moments and step; expert i gets its shard's, times its share of the
    gradient (1 / r copies for w1 and w3, 1 / E for w2, squared for exp_avg_sq); routers start fresh."""
    dense = trained_dense(dense_config("swiglu", 32))
    dense_optimizer = torch.optim.AdamW(dense.parameters())
    for _ in range(2):
        dense_optimizer.zero_grad()
        dense(tokens())[0].square().mean().backward()
        dense_optimizer.step()
    config = moe_config(dense.config, num_experts=8, top_k=4)  # g = 2, r = 4 copies
    moe = upcycled(dense, config)
    optimizer = torch.optim.AdamW(moe.parameters())
    upcycling.upcycle_optimizer_state(dense, dense_optimizer, moe, optimizer, 2)
    state_of = {name: optimizer.state[p] for name, p in moe.named_parameters()}
    dense_state = {name: dense_optimizer.state[p] for name, p in dense.named_parameters()}
    qkv = "blocks.1.attn.qkv.weight"
    assert torch.equal(state_of[qkv]["exp_avg_sq"], dense_state[qkv]["exp_avg_sq"])
    assert float(state_of[qkv]["step"]) == 2.0
    assert not state_of["blocks.0.ffn.router.weight"]
    w1, w2 = dense_state["blocks.0.ffn.w1.weight"], dense_state["blocks.0.ffn.w2.weight"]
    # expert 5: shard 1 (hidden units 16-31) of copy 2
    experts_w1, experts_w2 = state_of["blocks.0.ffn.experts.w1"], state_of["blocks.0.ffn.experts.w2"]
    torch.testing.assert_close(experts_w1["exp_avg"][5], w1["exp_avg"].t()[:, 16:] / 4)
    torch.testing.assert_close(experts_w1["exp_avg_sq"][5], w1["exp_avg_sq"].t()[:, 16:] / 16)
    torch.testing.assert_close(experts_w2["exp_avg"][5], w2["exp_avg"].t()[16:] / 8)
    torch.testing.assert_close(experts_w2["exp_avg_sq"][5], w2["exp_avg_sq"].t()[16:] / 64)
    assert float(experts_w2["step"]) == 2.0
    optimizer.step()  # AdamW takes the mixed state (fresh routers, carried rest)


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


def test_the_trainer_continues_from_an_upcycled_dense_checkpoint(tmp_path):
    """train.init_from: the MoE run starts at the dense checkpoint's step, and its first loss (that
    step's batch, before the update) is the dense run's on the same batch."""
    common = ["model.d_ff_dense=64", "train.steps=3", "train.eval_every=3", "train.log_every=3"]
    dense_tree = load_toml(
        REPO / "configs" / "test.toml",
        [f"train.out_dir={tmp_path / 'dense'}", "train.checkpoint_every=2", *common],
    )
    dense_tree.pop("moe")
    Trainer(RunConfig.from_tree(dense_tree), make_layout(1), torch.device("cpu")).run()
    dense_rows = [
        json.loads(line) for line in (tmp_path / "dense" / "metrics.jsonl").read_text().splitlines()
    ]
    init = f"train.init_from={tmp_path / 'dense' / 'checkpoints' / 'step_2'}"
    moe_overrides = [f"train.out_dir={tmp_path / 'moe'}", init, *common]
    dropping = RunConfig.from_tree(load_toml(REPO / "configs" / "test.toml", moe_overrides))
    with pytest.raises(ValueError, match="capacity_factor=1.0"):  # test.toml's MoE drops
        Trainer(dropping, make_layout(1), torch.device("cpu"))
    tree = load_toml(REPO / "configs" / "test.toml", [*moe_overrides, "moe.capacity_factor=none"])
    trainer = Trainer(RunConfig.from_tree(tree), make_layout(1), torch.device("cpu"))
    assert trainer.step == 2
    qkv = dict(trainer.model.named_parameters())["blocks.0.attn.qkv.weight"]
    assert float(trainer.optimizer.state[qkv]["step"]) == 2.0  # the dense run's AdamW state came along
    row = trainer.train_step()
    assert row["step"] == 3
    assert row["loss"] == pytest.approx(dense_rows[2]["loss"], rel=1e-6, abs=1e-6)


MOE_TOML = """
[model]
seq_len = 16
d_model = 16
n_layers = 2
n_heads = 2
d_ff_dense = 32
dense_activation = "swiglu"

[moe]
d_hidden = 16
num_experts = 8
top_k = 4
activation = "swiglu"

[train]
steps = 10
global_batch = 2
micro_batch = 1
out_dir = "unused"
"""


def test_launch_upcycle_writes_a_checkpoint_that_generate_reads(tmp_path):
    dense = trained_dense(dense_config("swiglu", 32))
    save_dense(dense, tmp_path / "dense", step=4)
    (tmp_path / "moe.toml").write_text(MOE_TOML)
    args = ["--dense", str(tmp_path / "dense"), "--config", str(tmp_path / "moe.toml"), "--out"]
    assert launch_upcycle.main([*args, str(tmp_path / "moe"), "train.seed=3"]) == 0
    model, step = load_model(
        tmp_path / "moe" / "checkpoints" / "step_4", tmp_path / "moe", torch.device("cpu")
    )
    assert step == 4 and model.config.moe.num_experts == 8
    with torch.no_grad():
        assert (model(tokens())[0] - dense(tokens())[0]).abs().max() < TOLERANCE
    saved = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert saved["train"]["out_dir"] == str(tmp_path / "moe") and saved["train"]["seed"] == 3


@pytest.mark.parametrize("build", ["sharded", "fsdp", "replicas"])
@on_ranks(2)
def test_upcycled_experts_sharded_over_2_ranks_equal_the_dense_model(tmp_path, build):
    """ep = 2: each rank builds only its 4 of the 8 experts from the dense checkpoint (with FSDP over
    the dense tensors; or 5 experts a rank, a replica of the busiest); the logits of every rank's own
    tokens equal the dense model's."""
    rank = dist.get_rank()
    dense = trained_dense(dense_config("swiglu", 32))
    save_dense(dense, tmp_path / "dense", step=3)  # every rank writes the same replicated tensors
    config = moe_config(dense.config, num_experts=8, top_k=4)
    torch.manual_seed(3)
    moe = build_model(config, make_layout(2), fsdp=build == "fsdp")
    expected = list(range(4 * rank, 4 * rank + 4))
    if build == "replicas":
        for _, layer in moe.moe_layers():
            layer.apply_placement(balance(torch.arange(8.0, 0.0, -1.0), 2, 2))
        expected = moe.blocks[0].ffn.local_expert_ids
        assert len(expected) == 5
    assert [layer.local_expert_ids for _, layer in moe.moe_layers()][0] == expected
    assert upcycling.load_dense(tmp_path / "dense", moe) == (3, 2)
    x = tokens(batch=2 + rank, seed=rank)
    with torch.no_grad():
        got, outputs = moe.eval()(x)
        want, _ = dense(x)
    assert (got - want).abs().max() < TOLERANCE
    sent = sum(int(o.stats.rows_sent_to_other_ranks) for o in outputs)
    assert sent > 0  # tokens met experts on the other rank


# The Hugging Face path: tiny random dense models built here (nothing is downloaded).
without_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="the hf extra: pip install -e '.[hf]'"
)


def hf_dense(kind: str, seed: int = 0, **fields):
    """A dense Llama or Qwen2 of a few thousand weights, drawn at std 0.3 so that its MLPs matter."""
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    shape = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    return model_class(config_class(**{**shape, **fields})).eval()


def hf_tokens(batch: int = 2, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 64, (batch, 12), generator=torch.Generator().manual_seed(seed))


# name -> (dense family, its config fields, E, top_k, g)
HF_CASES = {
    "llama-mixtral-g2-top2-of-4": ("llama", {}, 4, 2, 2),
    "llama-tied-mixtral-g1": ("llama", dict(tie_word_embeddings=True), 4, 2, 1),
    "qwen2-qwen2moe-g2-top4-of-8": ("qwen2", {}, 8, 4, 2),
}


@pytest.mark.extras
@without_transformers
@pytest.mark.parametrize("case", HF_CASES)
def test_hf_upcycled_logits_equal_the_dense_models_and_reload(case, tmp_path):
    import transformers

    from expert_parallel import hf
    from expert_parallel.hf import upcycling as hf_upcycling

    kind, fields, experts, top_k, g = HF_CASES[case]
    dense = hf_dense(kind, **fields)
    x = hf_tokens()
    kwargs = dict(num_experts=experts, top_k=top_k, granularity=g, seed=1)
    with torch.no_grad():
        want = dense(x).logits
        moe = hf_upcycling.upcycle(dense, **kwargs)
        assert want.abs().max() > 1.0
        assert (moe(x).logits - want).abs().max() < TOLERANCE
    dense.save_pretrained(tmp_path / "dense")  # written by the command line, as a user would
    flags = ["--num-experts", str(experts), "--top-k", str(top_k), "--granularity", str(g), "--seed", "1"]
    assert launch_upcycle.main(["--hf", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), *flags]) == 0
    path = tmp_path / "moe"
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    assert type(reloaded).__name__ == {"llama": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM"}[kind]
    ours = hf.from_pretrained(path)
    with torch.no_grad():
        assert (reloaded.eval()(x).logits - want).abs().max() < TOLERANCE
        assert (ours(x).logits - want).abs().max() < TOLERANCE


@pytest.mark.extras
@without_transformers
def test_hf_combinations_that_are_not_exact_are_refused():
    from expert_parallel.hf import upcycling as hf_upcycling

    with pytest.raises(ValueError, match="top_k=3 is not a multiple"):
        hf_upcycling.upcycle(hf_dense("llama"), num_experts=4, top_k=3, granularity=2)
    with pytest.raises(ValueError, match="attention_bias"):
        hf_upcycling.upcycle(hf_dense("llama", attention_bias=True), num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="granularity 3 must divide intermediate_size=64"):
        hf_upcycling.upcycle(hf_dense("qwen2"), num_experts=6, top_k=3, granularity=3)


@on_ranks(2)
@pytest.mark.extras
@without_transformers
def test_hf_upcycled_checkpoint_loads_sharded_over_2_ranks(tmp_path):
    """Rank 0 writes the Mixtral of a Llama; hf.from_pretrained over 2 ranks (2 of 4 experts each)
    computes the dense model's logits on every rank's own tokens."""
    from expert_parallel import hf
    from expert_parallel.hf import upcycling as hf_upcycling

    rank = dist.get_rank()
    dense = hf_dense("llama")
    path = tmp_path / "moe"
    if rank == 0:
        hf_upcycling.save_upcycled(dense, path, num_experts=4, top_k=2, granularity=2, seed=1)
    dist.barrier()
    model = hf.from_pretrained(path, dist.group.WORLD)
    x = hf_tokens(batch=1 + rank, seed=rank)
    with torch.no_grad():
        assert (model(x).logits - dense(x).logits).abs().max() < TOLERANCE
    assert [m.layer.local_expert_ids for m in model.modules() if isinstance(m, hf.HFMoEBlock)][0] == [
        2 * rank,
        2 * rank + 1,
    ]
