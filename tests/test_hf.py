"""Hugging Face MoE blocks as MoELayers: equal outputs and gradients, the way back, and refusals,
on one process and expert-parallel on 2 gloo ranks.

The blocks are tiny random ones built locally (tests/hf_blocks.py; the GPT-OSS and Llama 4
blocks, routers named `router`, here), no download.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")
pytestmark = pytest.mark.extras  # needs the hf extra: .ci/run's second step

from hf_blocks import DISPATCHES, KINDS, TOL, block_grads, block_output, build_block  # noqa: E402
from rankpool import on_ranks  # noqa: E402

from expert_parallel import ExecutionConfig  # noqa: E402
from expert_parallel.hf import copy_to_hf_block, from_hf_block  # noqa: E402


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape, f"{what}: {ours.shape} vs {theirs.shape}"
    diff = (ours - theirs).abs().max().item()
    assert torch.allclose(ours, theirs, rtol=TOL, atol=TOL), f"{what}: max |diff| {diff:.3g}"


@pytest.mark.parametrize("kind", KINDS)
def test_layer_equals_block(kind):
    block = build_block(kind)
    layer = from_hf_block(block)
    assert layer.config.capacity_factor is None and layer.num_local_experts == layer.config.num_experts
    x = torch.randn(2, 13, 32)
    upstream = torch.randn(2, 13, 32)
    x_block, x_layer = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want, got = block_output(block, x_block), layer(x_layer).out
    assert_close(got, want, f"{kind} output")
    (want * upstream).sum().backward()
    (got * upstream).sum().backward()
    assert_close(x_layer.grad, x_block.grad, f"{kind} input grad")
    theirs = block_grads(block, 0, layer.config.num_experts)
    assert set(dict(layer.named_parameters())) == set(theirs)
    for name, param in layer.named_parameters():
        assert_close(param.grad, theirs[name], f"{kind} {name} grad")


def test_configs_read_from_the_blocks():
    mixtral, qwen, deepseek = (from_hf_block(build_block(kind)).config for kind in KINDS)
    fields = ("score_func", "normalize_weights", "routed_scaling_factor", "selection_bias")
    fields += ("num_groups", "group_topk", "num_shared_experts", "shared_hidden", "shared_expert_gate")
    assert [getattr(mixtral, f) for f in fields] == ["softmax", True, 1.0, False, 1, None, 0, 0, False]
    assert [getattr(qwen, f) for f in fields] == ["softmax", False, 1.0, False, 1, None, 1, 40, True]
    assert [getattr(deepseek, f) for f in fields] == ["sigmoid", True, 2.5, True, 4, 2, 2, 48, False]
    for config in (mixtral, qwen, deepseek):
        assert (config.activation, config.bias, config.router_bias) == ("swiglu", False, False)
        assert (config.capacity_factor, config.aux_loss_coef) == (None, 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind):
    """Changed layer weights, written back, make the block compute what the layer computes."""
    block = build_block(kind)
    layer = from_hf_block(block)
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(0.05 * torch.randn_like(param))
        if layer.selection_bias is not None:
            layer.selection_bias.add_(0.05 * torch.randn_like(layer.selection_bias))
    target = build_block(kind, seed=7)
    copy_to_hf_block(layer, target)
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        assert_close(block_output(target, x), layer(x).out, f"{kind} written-back block")
    again = from_hf_block(target)
    for (name, ours), theirs in zip(again.state_dict().items(), layer.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_global_random_state_untouched():
    block = build_block("mixtral")
    state = torch.random.get_rng_state()
    from_hf_block(block)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_per_expert_module_list_layout():
    """transformers 4.x blocks: a ModuleList of per-expert MLPs (Mixtral's w1/w3/w2, or gate/up/down_proj)."""
    fused = build_block("mixtral")
    want = from_hf_block(fused)
    gate_up, down = fused.experts.gate_up_proj.data, fused.experts.down_proj.data
    hidden = gate_up.shape[1] // 2
    for names in (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")):
        mlps = nn.ModuleList()
        for g in range(gate_up.shape[0]):
            mlp = nn.Module()
            mlp.act_fn = nn.SiLU()
            for name, weight in zip(names, (gate_up[g, :hidden], gate_up[g, hidden:], down[g])):
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                linear.weight.data.copy_(weight)
                setattr(mlp, name, linear)
            mlps.append(mlp)
        block = build_block("mixtral")
        block.experts = mlps
        got = from_hf_block(block)
        for (name, ours), theirs in zip(got.state_dict().items(), want.state_dict().values()):
            assert torch.equal(ours, theirs), (names, name)
        copy_to_hf_block(got, block)  # and back, through the same views
        assert torch.equal(block.experts[3].get_parameter(names[2] + ".weight"), down[3])


def test_overrides_and_refusals():
    block = build_block("mixtral")
    assert from_hf_block(block, capacity_factor=1.25, aux_loss_coef=0.01).config.capacity_factor == 1.25
    # How the layer runs is an override too (ExecutionConfig), kept apart from what it computes.
    layer = from_hf_block(block, dispatch="once_per_rank", exchange_chunks=1, gemm="loop")
    assert (layer.execution.dispatch, layer.execution.gemm) == ("once_per_rank", "loop")
    assert layer.config == from_hf_block(block).config
    # An ExecutionConfig passes whole; fields named among the overrides replace its own.
    execution = ExecutionConfig(dispatch="once_per_rank", gemm="loop")
    assert from_hf_block(block, execution=execution).execution == execution
    assert from_hf_block(block, execution=execution, gemm="auto").execution.gemm == "auto"
    with pytest.raises(ValueError, match="ExecutionConfig.dispatch"):
        from_hf_block(block, dispatch="per_token")
    with pytest.raises(ValueError, match="no field"):
        from_hf_block(block, capacity=2)
    block.experts.has_bias = True
    with pytest.raises(ValueError, match="has_bias"):
        from_hf_block(block)
    block = build_block("mixtral")
    block.experts.act_fn = nn.GELU()
    with pytest.raises(ValueError, match="not SiLU"):
        from_hf_block(block)
    with pytest.raises(ValueError, match="not a supported MoE block"):
        from_hf_block(nn.Linear(4, 4))
    # DeepSeek-V2's group-limited router ranks a group by its best score, MoEConfig by the sum of
    # its two best: the probe of random tokens catches the different routing math.
    with pytest.raises(ValueError, match="disagree"):
        from_hf_block(build_block("deepseek_v2"))
    with pytest.raises(ValueError, match="normalize_weights: layer True, block False"):
        copy_to_hf_block(from_hf_block(build_block("mixtral")), build_block("qwen2_moe"))


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("kind", KINDS)
@on_ranks(2)
def test_expert_parallel_equals_the_block(kind, dispatch):
    """Every rank builds the same block and input; the layer from `from_hf_block` gives, on this rank's
    own slice of the tokens, the block's output and input gradient for them; each local expert's weight
    gradient equals the block's (the block sees every rank's tokens, as the expert's owner does); the
    replicated router and shared experts' gradients, summed over ranks, equal the block's; and
    `copy_to_hf_block(gather=True)` rebuilds the whole block on every rank."""
    group = dist.group.WORLD
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    block = build_block(kind, seed=1)
    layer = from_hf_block(block, group, dispatch=dispatch)
    assert layer.execution.dispatch == dispatch
    torch.manual_seed(2)
    x = torch.randn(3, 11, 32)
    upstream = torch.randn(3, 11, 32)
    # Unequal slices of the 33 tokens: rank r takes its share of a 1 : 2 : ... split.
    bounds = [33 * sum(range(1, r + 1)) // sum(range(1, size + 1)) for r in range(size + 1)]
    mine = slice(bounds[rank], bounds[rank + 1])

    x_block = x.clone().requires_grad_(True)
    want = block_output(block, x_block)
    (want * upstream).sum().backward()
    x_mine = x.reshape(-1, 32)[mine].clone().requires_grad_(True)
    got = layer(x_mine).out
    (got * upstream.reshape(-1, 32)[mine]).sum().backward()

    assert_close(got.detach(), want.detach().reshape(-1, 32)[mine], "output")
    assert_close(x_mine.grad, x_block.grad.reshape(-1, 32)[mine], "input grad")
    theirs = block_grads(block, layer.first_expert, layer.num_local_experts)
    assert set(dict(layer.named_parameters())) == set(theirs)
    for name, param in layer.named_parameters():
        grad = param.grad
        if not name.startswith("experts."):  # replicated: each rank has its tokens' share
            grad = grad.clone()
            dist.all_reduce(grad, group=group)
        assert_close(grad, theirs[name], f"{name} grad")

    # Back into a block of other weights: with gather, every rank's block is the original.
    other = build_block(kind, seed=3)
    copy_to_hf_block(layer, other, gather=True)
    for (name, ours), theirs in zip(other.state_dict().items(), block.state_dict().values()):
        assert_close(ours, theirs, f"round trip {name}")


def build_router_block(family: str, seed: int = 0) -> nn.Module:
    """A tiny GPT-OSS MLP or Llama 4 MoE block (router `block.router`, experts [E, D, 2I]), random weights."""
    from transformers import AutoConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    if family == "gpt_oss":  # interleaved gate/up with biases, clamped SwiGLU (a limit the values cross)
        config = AutoConfig.for_model("gpt_oss", swiglu_limit=0.8, num_attention_heads=4, **common)
        config._experts_implementation = "eager"
        block = GptOssMLP(config)
    else:  # Llama 4: sigmoid scores on the experts' input, a shared expert
        block = Llama4TextMoe(AutoConfig.for_model("llama4_text", num_attention_heads=4, **common))
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.3)
    return block.eval()


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text"])
def test_transposed_and_interleaved_experts_compute_the_block_and_write_back(family):
    block = build_router_block(family)
    layer = from_hf_block(block)
    config = layer.config
    if family == "gpt_oss":
        assert (config.activation, config.bias, config.router_bias) == ("clamped_swiglu", True, True)
    else:
        assert (config.scale_expert_input, config.score_func, config.num_shared_experts) == (
            True,
            "sigmoid",
            1,
        )
    x = torch.randn(2, 13, 32)
    x_block, x_layer = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want, got = block_output(block, x_block).reshape(2, 13, 32), layer(x_layer).out
    assert_close(got, want, f"{family} output")
    upstream = torch.randn(2, 13, 32)
    (want * upstream).sum().backward()
    (got * upstream).sum().backward()
    assert_close(x_layer.grad, x_block.grad, f"{family} input grad")
    assert_close(layer.router.weight.grad, block.router.weight.grad, f"{family} router grad")
    gate_up, down = block.experts.gate_up_proj.grad, block.experts.down_proj.grad  # [E, D, 2I], [E, I, D]
    gate, up = (gate_up[..., 0::2], gate_up[..., 1::2]) if family == "gpt_oss" else gate_up.chunk(2, dim=-1)
    for name, theirs in (("w1", gate), ("w3", up), ("w2", down)):
        assert_close(getattr(layer.experts, name).grad, theirs, f"{family} {name} grad")
    # Changed weights, written back through the same views, make another block compute the layer.
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(0.05 * torch.randn_like(param))
    target = build_router_block(family, seed=7)
    copy_to_hf_block(layer, target)
    with torch.no_grad():
        assert_close(block_output(target, x).reshape(2, 13, 32), layer(x).out, f"{family} written-back block")


def test_experts_whose_gating_differs_from_their_attributes_are_refused():
    """GPT-OSS's alpha and limit name the clamped SwiGLU; its own gating, run on probe values, must be it."""
    block = build_router_block("gpt_oss")
    experts = block.experts
    experts._apply_gate = lambda gate_up: (lambda g, u: g * torch.sigmoid(g * experts.alpha) * u)(
        gate_up[..., ::2], gate_up[..., 1::2]
    )  # no clamps, no +1
    with pytest.raises(ValueError, match=r"GptOssMLP\.experts: their gating .* is not clamped_swiglu"):
        from_hf_block(block)


def test_the_compatibility_modules_name_the_hf_packages_objects():
    import expert_parallel.hf as hf
    from expert_parallel import hf_generate, hf_lm

    assert hf_generate.generate is hf.generate
    assert (hf_lm.HFCausalLM, hf_lm.moe_outputs) == (hf.HFCausalLM, hf.moe_outputs)
