"""expert_parallel.lora on Hugging Face models: the adapter file is PEFT's, at ep 1 and 2.

Proof by PEFT itself: a tiny random model of each family (tests/test_hf_pretrained.py's,
saved by transformers, no download) is loaded with `hf.from_pretrained`, adapted
(experts and attention) with trained-looking adapters, and saved with `save_adapter`;
`peft.PeftModel.from_pretrained(transformers model, dir)` then gives our logits (1e-4;
measured about 1e-7). Families: Mixtral, Qwen3-MoE, OLMoE, GPT-OSS (its experts
transposed and interleaved) and Llama 4 (transposed without saying so: lora._peft_reads_swapped).
`launch.finetune` with [lora] trains the adapters at ep 2 and saves the file PEFT loads.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from asserts import assert_close
from rankpool import on_ranks

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")
peft = pytest.importorskip("peft", reason="the peft extra: pip install -e '.[peft]'")
pytestmark = pytest.mark.extras

import test_lora  # noqa: E402
from test_hf_pretrained import save_tiny  # noqa: E402

from expert_parallel import lora  # noqa: E402
from expert_parallel.hf import from_pretrained, save_pretrained  # noqa: E402
from expert_parallel.tensorfile import load_file  # noqa: E402

CONFIG = lora.LoraConfig(r=4, alpha=8.0, targets=("experts", "attention"))
FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss", "llama4_text")


def randomise(model) -> None:
    test_lora.randomise(model, seed=3, scale=0.1)


def tokens(seed: int = 0):
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(seed))


def peft_logits(base_dir, adapter_dir, x, merged: bool = False):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    if merged:
        model = model.merge_and_unload()
    with torch.no_grad():
        return model(x, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_our_adapter_and_computes_our_logits(tmp_path, family):
    save_tiny(tmp_path / "base", family)
    ours = from_pretrained(tmp_path / "base")
    lora.add_lora(ours, CONFIG)
    randomise(ours)
    with torch.no_grad():
        want = ours(tokens(), use_cache=False).logits
    lora.save_adapter(ours, tmp_path / "adapter", CONFIG)
    record = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert record["peft_type"] == "LORA" and record["r"] == 4 and record["lora_alpha"] == 8.0
    assert {p.rpartition(".")[2] for p in record["target_parameters"]} == {"gate_up_proj", "down_proj"}
    got = peft_logits(tmp_path / "base", tmp_path / "adapter", tokens())
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert (got - base(tokens(), use_cache=False).logits).abs().max() > 0.1  # the adapters do something
    assert_close("PEFT's logits", got, want, 1e-4)

    # Read back into a fresh model, then merged and saved: the checkpoint PEFT's merge gives.
    again = from_pretrained(tmp_path / "base")
    assert lora.load_adapter(again, tmp_path / "adapter") == lora.LoraConfig(4, 8.0, CONFIG.targets)
    with torch.no_grad():
        assert_close("loaded back", again(tokens(), use_cache=False).logits, want, 1e-6)
    save_pretrained(lora.merge_lora(again), tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        merged_logits = merged(tokens(), use_cache=False).logits
    assert_close(
        "merged", merged_logits, peft_logits(tmp_path / "base", tmp_path / "adapter", tokens(), True), 1e-4
    )


def test_an_adapter_for_other_targets_is_refused(tmp_path):
    save_tiny(tmp_path / "base", "mixtral")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.down_proj"])
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "theirs")
    with pytest.raises(ValueError, match="only both expert weights"):
        lora.load_adapter(from_pretrained(tmp_path / "base"), tmp_path / "theirs")


@pytest.mark.parametrize("family", ("mixtral", "qwen3_moe"))
@on_ranks(2)
def test_at_ep2_each_rank_reads_and_writes_its_experts_slice(tmp_path, family):
    rank, group = dist.get_rank(), dist.group.WORLD
    if rank == 0:  # one process's adapter, in PEFT's format
        save_tiny(tmp_path / "base", family)
        one = from_pretrained(tmp_path / "base")
        lora.add_lora(one, CONFIG)
        randomise(one)
        lora.save_adapter(one, tmp_path / "one", CONFIG)
    dist.barrier()
    ours = from_pretrained(tmp_path / "base", group)
    lora.load_adapter(ours, tmp_path / "one")
    local = [p for n, p in ours.named_parameters() if n.endswith("experts.lora.in_a")]
    assert local and all(p.shape[0] == 4 for p in local)  # 4 of the 8 experts' adapters
    x = tokens(seed=rank)
    with torch.no_grad():
        got = ours(x, use_cache=False).logits
    assert_close("PEFT's logits", got, peft_logits(tmp_path / "base", tmp_path / "one", x), 1e-4)
    lora.save_adapter(ours, tmp_path / "two", CONFIG)
    one, two = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.dist
@pytest.mark.slow
def test_launch_finetune_trains_lora_at_ep2_and_saves_what_peft_loads(tmp_path):
    from test_finetune import finetune, metrics, read_checkpoint, validation_loss
    from test_finetune import save_tiny as save_mixtral

    save_mixtral(tmp_path / "model", num_local_experts=8)
    out_dir = tmp_path / "run"
    out = finetune(
        tmp_path / "model", out_dir, 2,
        "train.steps=8", "train.eval_every=8", "train.checkpoint_every=0", "train.lr=1e-2",
        "lora.r=4", "lora.alpha=8", "lora.targets=['experts','attention']",
    )  # fmt: skip
    assert "LoRA r=4" in out and "PEFT's format" in out
    rows = metrics(out_dir)
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    assert not (out_dir / "export").exists()  # the adapter is what it saves
    adapter = read_checkpoint(out_dir / "adapter")
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k)  # B trained from 0

    # PEFT's model over the untouched base is the trained model: the run's validation loss.
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    model = peft.PeftModel.from_pretrained(base, out_dir / "adapter").eval()
    summary = json.loads((out_dir / "summary.json").read_text())
    assert validation_loss(model, summary) == pytest.approx(summary["val_loss"], rel=1e-5)
