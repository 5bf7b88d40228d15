"""The byte-level transformer: config validation, shapes, causality, init, training, sampling."""

import math

import pytest
import torch

from expert_parallel import ExecutionConfig, MoEConfig, MoELayer
from expert_parallel.model import DenseFFN, ModelConfig, Transformer

D = 32
MOE = MoEConfig(d_model=D, d_hidden=16, num_experts=4, top_k=2)
BASE = dict(seq_len=16, d_model=D, n_layers=2, n_heads=4)


def build(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**BASE, "moe": MOE, **overrides}))


def random_tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def test_config_defaults_and_dict_round_trip():
    config = ModelConfig(**BASE, moe=MOE)
    assert (config.vocab_size, config.d_ff_dense, config.moe_every, config.tie_embeddings) == (
        256,
        4 * D,
        1,
        True,
    )
    values = config.to_dict()
    assert isinstance(values["moe"], dict)
    assert ModelConfig.from_dict(values) == config
    assert ModelConfig.from_dict({**BASE, "moe": None}).moe is None


@pytest.mark.parametrize(
    "field,value",
    [
        ("vocab_size", 0),
        ("seq_len", 0),
        ("d_model", 32.0),
        ("n_layers", 0),
        ("n_heads", 5),
        ("n_heads", True),
        ("moe_every", 0),
        ("moe_every", 3),
        ("d_ff_dense", 0),
        ("dense_activation", "tanh"),
        ("norm_eps", 0.0),
        ("norm_eps", float("nan")),
        ("tie_embeddings", 1),
        ("moe", {"d_model": D, "d_hidden": 16, "num_experts": 4}),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}"):
        ModelConfig(**{**BASE, "moe": MOE, field: value})


def test_config_requires_the_moe_widths_to_match_d_model():
    with pytest.raises(ValueError, match=r"ModelConfig\.moe\.d_model=16 must equal ModelConfig\.d_model=32"):
        ModelConfig(**BASE, moe=MoEConfig(d_model=16, d_hidden=16, num_experts=4))
    with pytest.raises(ValueError, match=r"ModelConfig\.moe\.d_out=8"):
        ModelConfig(**BASE, moe=MoEConfig(d_model=D, d_out=8, d_hidden=16, num_experts=4))


def test_from_dict_builds_the_nested_moe_and_names_unknown_keys():
    config = ModelConfig.from_dict({**BASE, "moe": {"d_model": D, "d_hidden": 16, "num_experts": 4}})
    assert config.moe == MoEConfig(d_model=D, d_hidden=16, num_experts=4)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['model\.colour'\]"):
        ModelConfig.from_dict({**BASE, "colour": "red"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['moe\.experts'\]"):
        ModelConfig.from_dict({**BASE, "moe": {"d_model": D, "d_hidden": 16, "experts": 4}})


@pytest.mark.parametrize("moe", [None, MOE])
def test_forward_shapes_and_input_checks(moe):
    model = build(moe=moe)
    logits, moe_outputs = model(random_tokens(3, 16))
    assert logits.shape == (3, 16, 256)
    assert len(moe_outputs) == (0 if moe is None else 2)
    assert all(o.out.shape == (3, 16, D) for o in moe_outputs)
    assert model(random_tokens(2, 5))[0].shape == (2, 5, 256)
    with pytest.raises(ValueError, match="seq_len=16"):
        model(random_tokens(1, 17))
    with pytest.raises(ValueError, match=r"\[B, S \+ 1\]"):
        model.loss(random_tokens(4))


def test_changing_a_token_changes_no_earlier_logit():
    # Dropless routing is per token, so the MoE blocks are causal too. (With a capacity, a later
    # token's first choice is served before an earlier token's second choice and can drop it.)
    model = build(n_layers=3, moe_every=2)
    tokens = random_tokens(2, 16)
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    before, after = model(tokens)[0], model(changed)[0]
    assert (after[:, :9] - before[:, :9]).abs().max() <= 1e-6
    assert (after[:, 9:] - before[:, 9:]).abs().amax(dim=-1).min() > 0


@pytest.mark.parametrize("moe", [None, MOE])
def test_loss_at_init_is_close_to_uniform_over_bytes(moe):
    lm_loss, aux_loss, _ = build(moe=moe).loss(random_tokens(4, 17))
    assert abs(lm_loss.item() - math.log(256)) < 0.5
    assert aux_loss.shape == ()


def test_aux_loss_is_the_sum_over_the_moe_layers():
    model = build(n_layers=4, moe_every=2)
    tokens = random_tokens(2, 17)
    _, aux_loss, outputs = model.loss(tokens)
    assert len(model.moe_layers()) == len(outputs) == 2 and aux_loss.item() > 0
    assert torch.equal(aux_loss, 0.0 + outputs[0].aux_loss + outputs[1].aux_loss)
    # Each MoEOutput is its layer's: the layer applied to that block's normed input gives it again.
    captured = {}
    for i in (1, 3):
        model.blocks[i].ffn_norm.register_forward_hook(lambda _m, _a, y, i=i: captured.setdefault(i, y))
    _, again, outputs = model.loss(tokens)
    assert torch.equal(again, aux_loss)
    for output, (name, layer) in zip(outputs, model.moe_layers()):
        alone = layer(captured[int(name.split(".")[1])])
        assert torch.equal(alone.out, output.out) and torch.equal(alone.aux_loss, output.aux_loss), name
    _, dense_aux, dense_outputs = build(moe=None).loss(random_tokens(2, 17))
    assert dense_aux.item() == 0.0 and dense_outputs == []


def test_moe_every_2_places_moe_in_blocks_1_3():
    model = build(n_layers=5, moe_every=2)
    assert [name for name, _ in model.moe_layers()] == ["blocks.1.ffn", "blocks.3.ffn"]
    kinds = [type(block.ffn) for block in model.blocks]
    assert kinds == [DenseFFN, MoELayer, DenseFFN, MoELayer, DenseFFN]
    assert all(isinstance(b.ffn, MoELayer) for b in build(n_layers=3).blocks)
    assert build(moe=None).moe_layers() == []


def matching_dense(config: ModelConfig) -> ModelConfig:
    """The all-dense config whose blocks use the active weights of `config`'s MoE blocks.

    A token uses top_k experts, each 2*D*H weights (3*D*H with swiglu) and no biases when
    moe.bias=False; a dense FFN of width F = top_k * H has 2*D*F (3*D*F) weights: the same.
    """
    return ModelConfig.from_dict(
        {**config.to_dict(), "moe": None, "d_ff_dense": config.moe.top_k * config.moe.d_hidden}
    )


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_dense_and_moe_models_with_matching_active_params(activation):
    moe = MoEConfig(d_model=D, d_hidden=16, num_experts=4, top_k=2, activation=activation, bias=False)
    moe_model = build(moe=moe, dense_activation=activation)
    dense_model = Transformer(matching_dense(moe_model.config))
    # 2 MoE layers, each with a router [E, D] + [E] that the dense model has no counterpart of.
    router = 4 * D + 4
    assert moe_model.num_params(active_only=True) == dense_model.num_params(active_only=True) + 2 * router
    assert (
        dense_model.num_params(active_only=True)
        == dense_model.num_params()
        == sum(p.numel() for p in dense_model.parameters())
    )
    # In total the MoE model holds E experts per layer: (E - top_k) more of 2*D*H (3*D*H) weights each.
    per_expert = (3 if activation == "swiglu" else 2) * D * 16
    assert moe_model.num_params() == moe_model.num_params(active_only=True) + 2 * (4 - 2) * per_expert
    assert moe_model.num_params() == sum(p.numel() for p in moe_model.parameters())


def test_tied_embeddings_share_one_weight_counted_once():
    tied, untied = build(), build(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.num_params() == tied.num_params() + 256 * D


def test_same_seed_builds_the_same_model():
    a, b, c = build(seed=3, moe_every=2), build(seed=3, moe_every=2), build(seed=4, moe_every=2)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(state_a["blocks.1.ffn.experts.w1"], state_c["blocks.1.ffn.experts.w1"])
    assert not torch.equal(state_a["blocks.0.ffn.w1.weight"], state_c["blocks.0.ffn.w1.weight"])


def test_a_few_steps_on_repeated_text_reduce_the_loss():
    model = build(n_layers=2, moe_every=1)
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 4))
    batch = torch.stack([text[i : i + 17] for i in range(0, 64, 8)])
    losses = []
    for _ in range(25):
        lm_loss, aux_loss, _ = model.loss(batch)
        losses.append(lm_loss.item())
        model.zero_grad()
        (lm_loss + aux_loss).backward()
        # NOTE: plain gradient descent: building a torch.optim optimizer imports torch._dynamo (seconds).
        with torch.no_grad():
            for param in model.parameters():
                param -= 0.3 * param.grad
    assert losses[-1] < losses[0] - 2.0, losses


def test_generate_has_the_right_length_and_is_reproducible():
    model = build()
    prompt = random_tokens(20)  # longer than seq_len: the window slides from the start
    out = model.generate(prompt, 7, generator=torch.Generator().manual_seed(5))
    assert out.shape == (27,) and out.dtype == torch.long
    assert torch.equal(out[:20], prompt) and int(out.min()) >= 0 and int(out.max()) < 256
    again = model.generate(prompt, 7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again)
    greedy = model.generate(prompt[:3], 4, temperature=0)
    assert torch.equal(greedy, model.generate(prompt[:3], 4, top_k=1))
    assert model.generate(prompt[:3], 0).shape == (3,)
    with pytest.raises(ValueError, match="non-empty prompt"):
        model.generate(prompt[:0], 1)


def test_choices_before_reach_each_moe_layer_in_order():
    """Global-batch aux loss over two micro-batches: the caller sums each layer's choices."""
    moe = MoEConfig(d_model=D, d_hidden=16, num_experts=4, top_k=2, aux_loss_scope="global_batch")
    model = build(n_layers=4, moe_every=2, moe=moe)
    _, _, first = model.loss(random_tokens(2, 17, seed=1))
    choices_before = [output.stats.choices_per_expert for output in first]
    captured = {}
    for i in (1, 3):
        model.blocks[i].ffn_norm.register_forward_hook(lambda _m, _a, y, i=i: captured.setdefault(i, y))
    _, aux_loss, second = model.loss(random_tokens(2, 17, seed=2), choices_before)
    assert torch.equal(aux_loss, 0.0 + second[0].aux_loss + second[1].aux_loss)
    for i, choices_E, output, (_, layer) in zip((1, 3), choices_before, second, model.moe_layers()):
        assert torch.equal(layer(captured[i], choices_E).aux_loss, output.aux_loss)
        assert not torch.equal(layer(captured[i]).aux_loss, output.aux_loss)  # the earlier counts matter


def test_execution_config_reaches_every_moe_layer():
    execution = ExecutionConfig(dispatch="once_per_rank", gemm="loop")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BASE, moe=MOE), execution=execution)
    assert [layer.execution for _, layer in model.moe_layers()] == [execution, execution]
    assert all(layer.execution == ExecutionConfig() for _, layer in build().moe_layers())


def test_the_moe_layers_start_as_small_in_the_residual_stream_as_the_dense_blocks():
    # tiny.toml and tiny-dense.toml: with nn.Linear's bound the MoE layers added about 0.17 RMS per
    # element where a dense block adds 0.025 (docs/configuration.md#initialisation).
    moe = MoEConfig(d_model=128, d_hidden=256, num_experts=4, top_k=2, activation="relu", bias=False)
    shape = dict(seq_len=128, d_model=128, n_layers=4, n_heads=4, d_ff_dense=512, dense_activation="relu")
    tokens_BS = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(1))

    def added_rms(model: Transformer) -> list[float]:
        x_BSD = model.tok_emb(tokens_BS) + model.pos_emb(torch.arange(128))
        added = []
        for block in model.blocks:
            x_BSD = x_BSD + block.attn(block.attn_norm(x_BSD))[0]
            y = block.ffn(block.ffn_norm(x_BSD))
            y_BSD = y.out if isinstance(block.ffn, MoELayer) else y
            added.append(y_BSD.square().mean().sqrt().item())
            x_BSD = x_BSD + y_BSD
        return added

    with torch.no_grad():
        torch.manual_seed(0)
        dense = added_rms(Transformer(ModelConfig(**shape)))
        torch.manual_seed(0)
        sparse = added_rms(Transformer(ModelConfig(**shape, moe=moe)))
    for moe_rms, dense_rms in zip(sparse, dense):
        assert dense_rms / 4 < moe_rms <= dense_rms, (sparse, dense)
