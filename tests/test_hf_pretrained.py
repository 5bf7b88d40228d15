"""expert_parallel.hf.from_pretrained: a saved Hugging Face MoE model, loaded by shard, equals transformers'.

For each family, a tiny random model (8 experts) is saved with transformers'
`save_pretrained` to a temporary directory (no download), with its routers
perturbed so that routing is far from uniform, a nonzero selection bias
where the family has one, and random expert and router biases where it has
those (GPT-OSS, whose small swiglu_limit makes the clamps bite). Loaded with
`from_pretrained` in one process and with its experts sharded over 2 and 4
gloo ranks: logits equal the transformers model's to 1e-5 and the gradient of
the input embeddings to 1e-4.
Saved back with `save_pretrained` from 2 ranks: every tensor of the original
checkpoint, bitwise, under the same keys, and the same logits when
transformers loads it.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from rankpool import on_ranks

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")
pytestmark = pytest.mark.extras  # needs the hf extra: .ci/run's second step

from expert_parallel.hf import HFMoEBlock, from_pretrained, save_pretrained  # noqa: E402

SMALL = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts_per_tok=2,
)
GROUPED = dict(n_routed_experts=8, n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1)
MLA = dict(
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    num_key_value_heads=4,
)
FAMILIES = {
    "mixtral": dict(num_local_experts=8),
    "qwen2_moe": dict(num_experts=8, shared_expert_intermediate_size=32),
    "qwen3_moe": dict(num_experts=8),
    "olmoe": dict(num_experts=8),
    "deepseek_v2": {**GROUPED, **MLA},
    "deepseek_v3": {**GROUPED, **MLA},
    "glm4_moe": GROUPED,
    "dots1": GROUPED,
    # Its MoE blocks; its linear-attention layers stay transformers' (4 layers: one full attention).
    "qwen3_next": dict(num_experts=8, shared_expert_intermediate_size=16, num_hidden_layers=4),
    # Layer 0 dense (moe_layer_start_index 1), layers 1 and 2 MoE with a shared expert.
    "ernie4_5_moe": dict(moe_num_experts=8, moe_num_shared_experts=1, num_hidden_layers=3),
    "minimax_m2": dict(num_local_experts=8),
    # d_model 32 = 2I: gate_up_proj [E, 32, 32] reads either way; down_proj [E, 16, 32] tells.
    "llama4_text": dict(num_local_experts=8, intermediate_size=16, intermediate_size_mlp=64),
    "gpt_oss": dict(num_local_experts=8, intermediate_size=16, swiglu_limit=0.5),
    "granitemoe": dict(num_local_experts=8, intermediate_size=16),
    # Its router's weight is gate.wg.weight; its shared expert is shared_mlp.
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=2, intermediate_size=16),
}


# Where the families keep their MoE block (Llama 4: feed_forward, Granite-MoE: block_sparse_moe).
MOE_BLOCKS = ("mlp.", "feed_forward.", "block_sparse_moe.")


def save_tiny(directory, family: str, values: dict | None = None) -> None:
    """A random model of `family` (of config `values`, default FAMILIES'), its routers made uneven,
    saved by transformers."""
    config = transformers.AutoConfig.for_model(family, **{**SMALL, **(values or FAMILIES[family])})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            in_block = any(where in name for where in MOE_BLOCKS)
            if (
                in_block
                and name.endswith(("gate.weight", "router.weight", "gate.wg.weight"))
                and tensor.dim() == 2
            ):
                tensor.mul_(8.0)  # sharper routers: a few experts take most tokens
            elif name.endswith("e_score_correction_bias"):  # the router's, the block's, or moe_statics'
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5)
            elif in_block and name.endswith(
                ("router.bias", "experts.gate_up_proj_bias", "experts.down_proj_bias")
            ):
                tensor.copy_(
                    torch.randn(tensor.shape, generator=generator) * 0.5
                )  # transformers zeroes these
    model.save_pretrained(directory)


def compare(directory, group, rank: int) -> None:
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    ours = from_pretrained(directory, group)
    assert any(isinstance(m, HFMoEBlock) for m in ours.modules())
    tokens = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(rank))
    grads = []
    for model in (reference, ours):
        embeds = model.get_input_embeddings()(tokens).detach().requires_grad_()
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        (logits.square().mean()).backward()
        grads.append((logits.detach(), embeds.grad))
    (want, want_grad), (got, got_grad) = grads
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_process_equals_transformers(tmp_path, family):
    save_tiny(tmp_path, family)
    compare(tmp_path, None, 0)


@on_ranks(2, 4, timeout=300)
def test_experts_sharded_over_the_ranks_equal_transformers(tmp_path):
    for family in FAMILIES:
        directory = tmp_path / family
        if dist.get_rank() == 0:
            save_tiny(directory, family)
        dist.barrier()
        compare(directory, dist.group.WORLD, dist.get_rank())


@on_ranks(2)
def test_each_rank_holds_only_its_experts(tmp_path):
    if dist.get_rank() == 0:
        save_tiny(tmp_path, "mixtral")
    dist.barrier()
    model = from_pretrained(tmp_path, dist.group.WORLD)
    layer = model.model.layers[0].mlp.layer
    assert layer.experts.w1.shape[0] == 4 and layer.local_expert_ids == list(
        range(4 * dist.get_rank(), 4 * dist.get_rank() + 4)
    )


def test_a_missing_tensor_a_truncated_file_and_a_wrong_shape_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    save_tiny(tmp_path, "qwen2_moe")
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    dropped = dict(tensors)
    dropped.pop("model.layers.1.self_attn.q_proj.weight")
    save_file(dropped, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no tensor for 'model\.layers\.1\.self_attn\.q_proj\.weight'"):
        from_pretrained(tmp_path)
    wrong = dict(tensors)
    wrong["model.layers.0.mlp.gate.weight"] = torch.zeros(8, 16)
    save_file(wrong, file, metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate\.weight' has shape"
    ):
        from_pretrained(tmp_path)
    save_file(tensors, file, metadata={"format": "pt"})
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot be read as safetensors"):
        from_pretrained(tmp_path)


def test_a_directory_without_a_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        from_pretrained(tmp_path)


REFUSED = {  # case: (family, config, what the error says)
    # DeepSeek-V2's group-limited router ranks a group by its best score (MoEConfig: its two best).
    "deepseek_v2-group-limited-by-max": (
        "deepseek_v2",
        {**GROUPED, **MLA, "topk_method": "group_limited_greedy"},
        r"DeepseekV2Moe: its router and the layer's routing disagree",
    ),
    # ERNIE-4.5 with use_bias: its shared experts have biases, its routed experts none.
    "ernie4_5_moe-use_bias": (
        "ernie4_5_moe",
        {**FAMILIES["ernie4_5_moe"], "use_bias": True},
        r"block at model\.layers\.1\.mlp: Ernie4_5_MoeSparseMoeBlock\.shared_experts: .* with biases",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_family_whose_math_the_layer_does_not_compute_is_refused(tmp_path, case):
    family, values, message = REFUSED[case]
    save_tiny(tmp_path, family, values)
    with pytest.raises(ValueError, match=message):
        from_pretrained(tmp_path)


@pytest.mark.dist
@pytest.mark.slow
def test_loading_at_ep4_reads_only_this_ranks_experts(tmp_path):
    import json

    from multirank import REPO, launch

    # Experts are most of the bytes: 2 layers x 64 experts x 3 x 256 x 1024 in fp32, 384 MiB.
    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=64, num_experts_per_tok=2,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    results = launch(REPO / "tests" / "hf_load_memory.py", 4, [str(tmp_path)], timeout=240)
    for result in results:
        assert result.returncode == 0, result.output[-3000:]
        line = next(x for x in result.output.splitlines() if x.startswith("MEMORY "))
        mib = json.loads(line.removeprefix("MEMORY "))
        experts_mib = 2 * 64 * 3 * 256 * 1024 * 4 / 2**20
        assert mib["held"] < experts_mib / 4 + 8  # a quarter of the experts and the small dense part
        assert mib["peak"] - mib["before"] <= 1.3 * mib["held"] + 64, mib


def read_checkpoint(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@on_ranks(2)
def test_saved_back_it_is_the_original_checkpoint_bitwise(tmp_path):
    for family in FAMILIES:
        original, saved = tmp_path / family / "original", tmp_path / family / "saved"
        if dist.get_rank() == 0:
            save_tiny(original, family)
        dist.barrier()
        save_pretrained(from_pretrained(original, dist.group.WORLD), saved)
        if dist.get_rank() == 0:
            want, got = read_checkpoint(original), read_checkpoint(saved)
            assert sorted(got) == sorted(want), family
            for key in want:
                assert torch.equal(got[key], want[key]), (family, key)
            tokens = torch.randint(0, 128, (2, 11))
            logits = [
                transformers.AutoModelForCausalLM.from_pretrained(d).eval()(tokens).logits
                for d in (original, saved)
            ]
            torch.testing.assert_close(logits[1], logits[0], rtol=1e-6, atol=1e-6)
