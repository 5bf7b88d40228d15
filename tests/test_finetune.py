"""launch.finetune: a saved Hugging Face MoE model fine-tuned under torchrun, resumed exactly, exported.

A tiny random Mixtral (and a DeepSeek-V3 for the selection bias) is saved
with transformers' `save_pretrained` (no download); the runs read the
standard library as bytes modulo its vocabulary of 128, or a text file
through a tokenizer saved beside the model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from multirank import REPO

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")
# Every test runs the fine-tuner as processes.
pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.extras]

SMALL = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts_per_tok=2,
)  # fmt: skip
DEEPSEEK = dict(
    moe_intermediate_size=16, n_routed_experts=8, n_group=2, topk_group=1, first_k_dense_replace=1,
    n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
    v_head_dim=8, num_key_value_heads=4,
)  # fmt: skip
SHORT = ["data.seq_len=32", "train.max_corpus_bytes=200000", "train.global_batch=8", "train.micro_batch=2"]
CORPUS_BYTES = 200_000


def save_tiny(directory, family: str = "mixtral", **extra) -> None:
    config = transformers.AutoConfig.for_model(family, **{**SMALL, **extra})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)


def finetune(model_dir, out_dir, world: int, *overrides: str, timeout: float = 240) -> str:
    args = [
        "-m", "launch.finetune", "--config", "configs/finetune.toml",
        f"model.path={model_dir}", f"train.out_dir={out_dir}", *SHORT, *overrides,
    ]  # fmt: skip
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    cmd = [sys.executable, *(launcher if world > 1 else []), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def read_checkpoint(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def validation_loss(model, summary: dict, batch_size: int = 2, eval_batches: int = 4) -> float:
    """The trainer's validation loss, computed by `model` (a transformers model) in one process."""
    from expert_parallel import data

    val = data.load_corpus(max_bytes=CORPUS_BYTES)[1]
    val = data.ByteCorpus(val.data % 128, val.num_files)
    batches = data.val_batches(val, eval_batches * summary["world"], batch_size, 32)
    with torch.no_grad():
        losses = [
            F.cross_entropy(model(input_ids=b[:, :-1]).logits.flatten(0, 1), b[:, 1:].reshape(-1)).item()
            for b in batches
        ]
    return sum(losses) / len(losses)


def test_twenty_steps_at_ep2_resume_exactly_and_export_what_transformers_loads(tmp_path):
    save_tiny(tmp_path / "model", num_local_experts=8)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["train.steps=20", "train.checkpoint_every=10", "train.eval_every=10"]
    finetune(tmp_path / "model", straight, 2, *common)
    finetune(tmp_path / "model", resumed, 2, *common, "train.steps=10")
    out = finetune(tmp_path / "model", resumed, 2, *common)
    assert "resumed from" in out and "step_10" in out

    rows = metrics(straight)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in rows]  # bitwise: exact resume

    original = read_checkpoint(tmp_path / "model")
    exported = read_checkpoint(straight / "export")
    assert exported.keys() == original.keys()
    assert any(not torch.equal(exported[k], original[k]) for k in original)  # trained
    again = read_checkpoint(resumed / "export")
    assert all(torch.equal(again[k], exported[k]) for k in exported)

    # transformers loads the export, and it is the trained model: the run's validation loss.
    model = transformers.AutoModelForCausalLM.from_pretrained(straight / "export").eval()
    summary = json.loads((straight / "summary.json").read_text())
    assert validation_loss(model, summary) == pytest.approx(summary["val_loss"], rel=1e-5)


def test_the_librarys_options_reach_every_moe_layer(tmp_path):
    save_tiny(tmp_path / "model", "deepseek_v3", **DEEPSEEK)
    out_dir = tmp_path / "run"
    finetune(
        tmp_path / "model", out_dir, 2,
        "train.steps=6", "train.eval_every=6", "train.checkpoint_every=0",
        "moe.capacity_factor=1.0", "moe.aux_loss_coef=0.01", "moe.aux_loss_scope=global_batch",
        "moe.selection_bias_rate=0.01", "execution.dispatch=once_per_rank",
        "parallel.redundant_experts=2", "parallel.replan_every=2",
    )  # fmt: skip
    rows = metrics(out_dir)
    assert all(r["dropped_fraction"] > 0 for r in rows)  # a capacity factor of 1 drops overflow
    assert all(r["aux_loss"] > 0 for r in rows)
    recorded = json.loads((out_dir / "config.json").read_text())
    assert recorded["moe"]["aux_loss_scope"] == "global_batch"
    assert recorded["execution"]["dispatch"] == "once_per_rank"
    # The selection bias moved, and went out with the export under DeepSeek's own name.
    original, exported = read_checkpoint(tmp_path / "model"), read_checkpoint(out_dir / "export")
    (bias,) = [k for k in original if k.endswith("e_score_correction_bias")]
    assert not torch.equal(exported[bias], original[bias])
    transformers.AutoModelForCausalLM.from_pretrained(out_dir / "export")


def test_fsdp_trains_as_the_plain_run_and_exports_whole_tensors(tmp_path):
    save_tiny(tmp_path / "model", num_local_experts=8)
    runs = {}
    for fsdp in ("false", "true"):
        out_dir = tmp_path / f"fsdp-{fsdp}"
        finetune(
            tmp_path / "model", out_dir, 2,
            "train.steps=5", "train.eval_every=5", "train.checkpoint_every=0",
            "parallel.ep=1", f"parallel.fsdp={fsdp}",
        )  # fmt: skip
        runs[fsdp] = (metrics(out_dir), read_checkpoint(out_dir / "export"))
    (plain, plain_export), (sharded, sharded_export) = runs["false"], runs["true"]
    assert [r["loss"] for r in sharded] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    assert sharded_export.keys() == plain_export.keys()
    for key, value in plain_export.items():
        assert sharded_export[key].shape == value.shape
        torch.testing.assert_close(sharded_export[key], value, rtol=1e-4, atol=1e-5)


def test_a_text_file_goes_through_the_directorys_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))
    (tmp_path / "corpus.txt").write_text(text)
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    save_tiny(tmp_path / "model", num_local_experts=4)
    fast.save_pretrained(tmp_path / "model")

    out = finetune(
        tmp_path / "model", tmp_path / "run", 1,
        f"data.text={tmp_path / 'corpus.txt'}", "data.val_fraction=0.1", "parallel.ep=1",
        "train.steps=3", "train.eval_every=3", "train.checkpoint_every=0", "model.export=false",
    )  # fmt: skip
    assert "tokens: bytes" not in out and f"of {tmp_path / 'model'}" in out  # "tokens: <its class> of <dir>"
    cut = round(len(text.encode()) * 0.9)
    want = len(fast.encode(text.encode()[:cut].decode(), add_special_tokens=False))
    assert re.search(rf"corpus {want:,} train", out), out
    assert len(metrics(tmp_path / "run")) == 3 and not (tmp_path / "run" / "export").exists()
