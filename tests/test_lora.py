"""expert_parallel.lora: adapters on a frozen MoE model, exact under EP, in PEFT's format.

The spec (docs/post-training.md#lora-on-the-experts):
- `add_lora(model, LoraConfig(r, alpha, targets))` freezes the model and adds
  rank-r adapters: each routed expert's weights become W + (alpha / r) * A @ B
  (w1 and w3 share A, as a fused gate_up_proj's halves do), and every linear
  layer of attention gets one too. B starts at zero, so the model starts equal to its base.
- Each rank holds its own experts' adapters, drawn per logical expert, so the
  EP model starts with, and computes, what the one-process model does.
- `save_adapter` gathers them in global expert order: our Transformer under its
  own names, a transformers model in PEFT's format, which
  `peft.PeftModel.from_pretrained` loads into the transformers model with the
  same logits. `load_adapter` reads either back at any layout, and `merge_lora`
  folds the adapters into the base weights.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.distributed as dist
from asserts import assert_close, assert_equal
from rankpool import on_ranks

import expert_parallel as ep
from expert_parallel import lora
from expert_parallel.model import ModelConfig, Transformer
from expert_parallel.parallel import shard_experts
from expert_parallel.placement import balance
from expert_parallel.tensorfile import load_file

MOE = ep.MoEConfig(d_model=16, d_hidden=12, num_experts=4, top_k=2, activation="swiglu")
CONFIG = lora.LoraConfig(r=3, alpha=6.0, targets=("experts", "attention"))


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=40, seq_len=12, d_model=16, n_layers=2, n_heads=2, moe=MOE))


def randomise(model, seed: int = 7, scale: float = 0.2) -> None:
    """Trained-looking adapters: every adapter tensor (B included) random."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def tokens(seed: int = 0, batch: int = 3):
    return torch.randint(0, 40, (batch, 12), generator=torch.Generator().manual_seed(seed))


# -- one process ------------------------------------------------------------------------------


def test_an_added_adapter_starts_the_model_equal_to_its_base():
    base = tiny_model()
    adapted = copy.deepcopy(base)
    names = lora.add_lora(adapted, CONFIG)
    assert names == [
        "blocks.0.ffn.experts", "blocks.1.ffn.experts",
        "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj",
    ]  # fmt: skip
    assert_equal("logits", adapted(tokens())[0], base(tokens())[0])


def test_only_the_adapters_train():
    model = tiny_model()
    lora.add_lora(model, CONFIG)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(lora_name for lora_name in trainable if ".lora" in lora_name)
    assert len(trainable) == 2 * 4 + 4 * 2  # in_a, in_b, out_a, out_b per MoE layer; A, B per linear
    model(tokens())[0].square().mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    b_grads = [p.grad for n, p in model.named_parameters() if n.endswith(("in_b", "out_b", "lora_B.weight"))]
    assert all(g is not None and g.abs().sum() > 0 for g in b_grads)  # B learns first: A's grad is B = 0's


@pytest.mark.parametrize("gemm", ["loop", "grouped_mm"])
def test_the_adapted_experts_compute_w_plus_scaling_a_b(gemm):
    torch.manual_seed(0)
    layer = ep.MoELayer(MOE, execution=ep.ExecutionConfig(gemm=gemm))
    lora.add_lora(layer, lora.LoraConfig(r=2, alpha=3.0))
    randomise(layer)
    experts, adapter = layer.experts, layer.experts.lora
    written_out = copy.deepcopy(experts)
    written_out.lora = None
    s, h = 3.0 / 2, MOE.d_hidden
    with torch.no_grad():
        written_out.w1 += s * adapter.in_a @ adapter.in_b[..., :h]
        written_out.w3 += s * adapter.in_a @ adapter.in_b[..., h:]
        written_out.w2 += s * adapter.out_a @ adapter.out_b
    x_RD = torch.randn(10, MOE.d_model)
    rows = [3, 0, 5, 2]
    assert_close("grouped rows", experts(x_RD, rows), written_out(x_RD, rows), 1e-6)
    x_eCD = torch.randn(4, 3, MOE.d_model)
    assert_close("padded", experts(x_eCD, None), written_out(x_eCD, None), 1e-6)


def test_merge_folds_the_adapters_into_the_base_names_and_all():
    model = tiny_model()
    keys = list(model.state_dict())
    lora.add_lora(model, CONFIG)
    randomise(model)
    adapted = model(tokens())[0]
    lora.merge_lora(model)
    assert lora.adapters(model) == {} and list(model.state_dict()) == keys
    assert_close("merged logits", model(tokens())[0], adapted, 1e-5)


def test_saved_and_loaded_back_in_our_format(tmp_path):
    model = tiny_model()
    lora.add_lora(model, CONFIG)
    randomise(model)
    lora.save_adapter(model, tmp_path, CONFIG)
    record = json.loads((tmp_path / "adapter_config.json").read_text())
    assert record["format"] == "expert_parallel" and record["r"] == 3 and record["lora_alpha"] == 6.0
    fresh = tiny_model()
    assert lora.load_adapter(fresh, tmp_path) == lora.LoraConfig(r=3, alpha=6.0, targets=CONFIG.targets)
    assert_equal("logits", fresh(tokens())[0], model(tokens())[0])


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(r=0), "lora.r"),
        (dict(targets=("experts", "mlp")), "lora.targets"),
        (dict(targets=()), "lora.targets"),
        (dict(targets=("experts", "experts")), "lora.targets"),
    ],
)
def test_a_bad_config_names_its_field(config, message):
    with pytest.raises(ValueError, match=message):
        lora.LoraConfig(**config)


def test_what_cannot_be_adapted_is_refused():
    model = tiny_model()
    lora.add_lora(model, CONFIG)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.add_lora(model, CONFIG)
    torch.manual_seed(0)
    replicas = ep.MoELayer(MOE, placement=balance(torch.ones(4), 1, 2))
    with pytest.raises(ValueError, match="redundant experts"):
        lora.add_lora(replicas, lora.LoraConfig())
    with pytest.raises(ValueError, match="'attention' matched nothing"):
        lora.add_lora(ep.MoELayer(MOE), lora.LoraConfig(targets=("attention",)))
    with pytest.raises(ValueError, match="lora.targets must be a list"):
        lora.LoraConfig.from_section({"targets": "experts"})


# -- on 2 ranks -------------------------------------------------------------------------------


@on_ranks(2)
def test_the_ep_adapted_model_equals_the_one_process_model(tmp_path):
    rank, group = dist.get_rank(), dist.group.WORLD
    reference = tiny_model(seed=3)
    sharded, fresh_two = copy.deepcopy(reference), copy.deepcopy(reference)
    shard_experts(sharded, group)
    shard_experts(fresh_two, group)
    # Added afresh at each layout, every logical expert draws the same A.
    fresh_one = copy.deepcopy(reference)
    lora.add_lora(fresh_one, CONFIG)
    lora.add_lora(fresh_two, CONFIG)
    local = slice(2 * rank, 2 * rank + 2)
    for name, param in fresh_two.named_parameters():
        if ".experts.lora." in name:
            assert_equal(f"initial {name}", param, fresh_one.get_parameter(name)[local])

    lora.add_lora(reference, CONFIG)
    randomise(reference)
    if rank == 0:
        lora.save_adapter(reference, tmp_path / "one", CONFIG)
    dist.barrier()
    lora.load_adapter(sharded, tmp_path / "one")
    x = tokens(seed=rank, batch=2 + rank)
    outs = []
    for model in (reference, sharded):
        out = model(x)[0]
        out.square().mean().backward()
        outs.append(out.detach())
    assert_close("logits", outs[1], outs[0], 1e-5)
    for name, param in sharded.named_parameters():
        if not param.requires_grad:
            continue
        want = reference.get_parameter(name).grad.clone()
        if ".experts.lora." in name:  # the expert's rows came from both ranks' tokens
            dist.all_reduce(want)
            want = want[local]
        assert_close(f"grad of {name}", param.grad, want, 1e-5)

    lora.save_adapter(sharded, tmp_path / "two", CONFIG)  # gathered in global expert order
    one, two = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
