"""Checkpoints: keyed by global expert id, atomic, and never executing code from the file."""

import pickle
from pathlib import Path

import pytest
import torch

from expert_parallel import checkpoint
from expert_parallel.model import ModelConfig, Transformer

CONFIG = ModelConfig.from_dict(
    dict(seq_len=8, d_model=8, n_layers=2, n_heads=2, moe=dict(d_model=8, d_hidden=8, num_experts=4))
)


def model_and_optimizer():
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    return model, torch.optim.AdamW(model.parameters())


def test_state_keys_split_experts_by_global_id():
    model, optimizer = model_and_optimizer()
    state = checkpoint.training_state(model, optimizer, step=0)
    w1 = [k for k in state if k.startswith("blocks.0.ffn.experts.w1.")]
    assert sorted(w1) == [f"blocks.0.ffn.experts.w1.{g}" for g in range(4)]
    assert state["blocks.0.ffn.experts.w1.2"].shape == (8, 8)
    assert "optim.blocks.0.ffn.experts.w1.exp_avg.3" in state and "trainer.step" in state


def test_round_trip_and_latest(tmp_path):
    model, optimizer = model_and_optimizer()
    checkpoint.save(tmp_path, 1, model, optimizer)
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    checkpoint.save(tmp_path, 2, model, optimizer)
    assert checkpoint.latest(tmp_path).name == "step_2"
    assert checkpoint.load(tmp_path / "step_1", model, optimizer) == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), saved))


def test_a_partial_save_is_never_the_latest(tmp_path):
    model, optimizer = model_and_optimizer()
    checkpoint.save(tmp_path, 1, model, optimizer)
    (tmp_path / "step_2.partial").mkdir()  # a crash while saving step 2
    assert checkpoint.latest(tmp_path).name == "step_1"


def test_truncated_checkpoint_names_the_file_and_the_previous_one_still_loads(tmp_path):
    model, optimizer = model_and_optimizer()
    checkpoint.save(tmp_path, 1, model, optimizer)
    checkpoint.save(tmp_path, 2, model, optimizer)
    data_file = next((tmp_path / "step_2").glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match=rf"step_2/{data_file.name} holds 100 bytes"):
        checkpoint.load(tmp_path / "step_2", model, optimizer)
    metadata = tmp_path / "step_2" / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:50])
    with pytest.raises(checkpoint.CheckpointError, match=r"step_2/\.metadata"):
        checkpoint.load(tmp_path / "step_2", model, optimizer)
    assert checkpoint.load(tmp_path / "step_1", model, optimizer) == 1


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/expert_parallel_pwned"),))


def test_hostile_metadata_is_refused_without_running_it(tmp_path):
    model, optimizer = model_and_optimizer()
    checkpoint.save(tmp_path, 1, model, optimizer)
    marker = Path("/tmp/expert_parallel_pwned")
    marker.unlink(missing_ok=True)
    (tmp_path / "step_1" / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint needs"):
        checkpoint.load(tmp_path / "step_1", model, optimizer)
    assert not marker.exists()


def test_a_dotted_global_inside_an_allowed_module_is_refused(tmp_path):
    # pickle resolves "os.system" inside torch.distributed.checkpoint.filesystem, which imports os.
    model, optimizer = model_and_optimizer()
    checkpoint.save(tmp_path, 1, model, optimizer)
    payload = b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00"  # protocol 4 frame header
    payload += b"\x8c\x27torch.distributed.checkpoint.filesystem\x94\x8c\x09os.system\x94\x93\x94"
    payload += b"\x8c\x24touch /tmp/expert_parallel_pwned_too\x94\x85\x94R\x94."
    marker = Path("/tmp/expert_parallel_pwned_too")
    marker.unlink(missing_ok=True)
    (tmp_path / "step_1" / ".metadata").write_bytes(payload)
    with pytest.raises(checkpoint.CheckpointError, match="os.system"):
        checkpoint.load(tmp_path / "step_1", model, optimizer)
    assert not marker.exists()


def test_the_selection_bias_and_shared_experts_are_saved_and_loaded(tmp_path):
    moe = dict(d_model=8, d_hidden=8, num_experts=4, selection_bias=True, num_shared_experts=1)
    config = ModelConfig.from_dict(dict(seq_len=8, d_model=8, n_layers=1, n_heads=2, moe=moe))
    torch.manual_seed(0)
    model = Transformer(config)
    layer = model.blocks[0].ffn
    layer.selection_bias.copy_(torch.tensor([0.1, -0.2, 0.3, -0.4]))
    state = checkpoint.model_state(model)
    assert "blocks.0.ffn.selection_bias" in state and "blocks.0.ffn.shared_experts.w1" in state
    # Weights and the bias are state; per-step counts are not (the trainer owns them).
    parts = {k.split(".")[3] for k in state if k.startswith("blocks.0.ffn.")}
    assert parts == {"router", "experts", "shared_experts", "selection_bias"}
    checkpoint.save(tmp_path, 1, model, torch.optim.AdamW(model.parameters()))
    with torch.no_grad():
        layer.selection_bias.zero_()
        layer.shared_experts.w1.zero_()
    checkpoint.load(checkpoint.latest(tmp_path), model)
    assert layer.selection_bias.tolist() == pytest.approx([0.1, -0.2, 0.3, -0.4])
    assert bool(layer.shared_experts.w1.abs().sum() > 0)
