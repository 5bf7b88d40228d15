"""hf.generate: a Hugging Face model with its experts sharded generates as one process does.

A tiny random Mixtral (routers sharpened, so that routing is far from
uniform) is saved by transformers. On 2 and 4 gloo ranks each rank takes its
own prompts (none, one, or three of different lengths) and generates through
transformers' `generate` and its KV cache. Its tokens equal those of the
plain transformers model in one process on the same prompts, token for
token: greedy, sampled with the same seed, and with an end-of-sequence token
that stops one rank's sequence early while the others go on.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from collectives import counting_collectives
from rankpool import on_ranks

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")
pytestmark = pytest.mark.extras  # needs the hf extra: .ci/run's second step

from expert_parallel.hf import from_pretrained, generate  # noqa: E402

PROMPTS_PER_RANK = [1, 3, 0, 2]  # rank 2 of 4 has none and still takes part in every exchange


def save_tiny(directory) -> None:
    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = None  # every sequence runs to max_new_tokens unless told
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("gate.weight"):
                tensor.mul_(8.0)
    model.save_pretrained(directory)


def prompts_of(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    count = PROMPTS_PER_RANK[rank % len(PROMPTS_PER_RANK)]
    return [torch.randint(3, 128, (n,), generator=generator) for n in (4, 9, 6)[:count]]


@on_ranks(2, 4, timeout=300)
def test_sharded_generation_equals_one_process_token_for_token(tmp_path):
    rank = dist.get_rank()
    if rank == 0:
        save_tiny(tmp_path)
    dist.barrier()
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = from_pretrained(tmp_path, dist.group.WORLD)
    prompts = prompts_of(rank)
    for kwargs in (
        dict(max_new_tokens=12, do_sample=False),
        dict(max_new_tokens=12, do_sample=True, top_k=8),
    ):
        torch.manual_seed(7)
        want = generate(reference, prompts, **kwargs)
        torch.manual_seed(7)
        got = generate(ours, prompts, **kwargs)
        assert len(got) == len(prompts)
        for w, g in zip(want, got):
            assert w.numel() == 12 and torch.equal(g, w), (kwargs, w.tolist(), g.tolist())

    # The decode steps take the fixed dispatch: after the prefill's count exchange (an all-gather
    # per MoE layer), one all-to-all each way per layer and step, and no all-gather.
    with counting_collectives() as calls:
        generate(ours, prompts, max_new_tokens=12, do_sample=False)
    assert calls["all_gather"] == 2 and calls["all_to_all_single"] == 2 * 2 * 12, calls

    # An end-of-sequence token that rank 0's first prompt meets after 3 new tokens: that rank
    # finishes first, and keeps running forwards (synced_gpus) until the others are done.
    first = generate(reference, prompts_of(0)[:1], max_new_tokens=3, do_sample=False)[0]
    eos = int(first[-1])
    want = generate(reference, prompts, max_new_tokens=12, do_sample=False, eos_token_id=eos)
    got = generate(ours, prompts, max_new_tokens=12, do_sample=False, eos_token_id=eos)
    assert [g.tolist() for g in got] == [w.tolist() for w in want]
    if rank == 0:
        assert got[0].numel() <= 3 and int(got[0][-1]) == eos


def test_a_prompt_must_be_one_dimensional_and_non_empty(tmp_path):
    save_tiny(tmp_path)
    model = from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="1-d and non-empty"):
        generate(model, [torch.tensor([], dtype=torch.long)], max_new_tokens=2)
