"""Generation with a Hugging Face model whose experts are sharded (`hf.from_pretrained(path, group)`).

Each rank generates for its own prompts through transformers' `generate` and
its KV cache. The MoE layers exchange tokens with the other ranks at every
forward, so every rank must run the same number of forwards, whatever its
prompts. Two things can break that:
- a rank's sequences can all stop early (an end-of-sequence token);
- a rank can have no prompt at all.

`generate` handles both:
- transformers' `synced_gpus=True` keeps a finished rank running forwards
  until every rank is done (an all-reduce of a flag per step);
- a rank without prompts runs a one-token dummy prompt and returns nothing.

Its one-token decode steps tell the MoE layers a bound on every rank's
tokens (the most prompts of any rank, one all-reduce before generating), so
the layers take the fixed dispatch for them: one all-to-all each way per
layer, no count exchange (`layer.Inference`, dispatchers.for_call).

Prompts of different lengths are left-padded into one batch with an
attention mask, and each prompt gets back its own new tokens.

`record_routes=True` also returns each prompt's routes (router record and
replay): the logical expert ids of every MoE layer at every position, prompt
and new tokens, [S_prompt + N, L_moe, K], which `HFCausalLM.forward(...,
routes=)` over the same tokens replays. transformers' `generate` never runs
its last new token, so that position's row is -1 (route natively).

Legend: B prompts on this rank, S the longest prompt.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..layer import Inference
from .pretrained import HFMoEBlock


@torch.no_grad()
def generate(
    model: nn.Module, prompts: list[Tensor], *, record_routes: bool = False, **generate_kwargs
) -> list[Tensor] | tuple[list[Tensor], list[Tensor]]:
    """The new tokens for each of this rank's `prompts` (1-d token ids), from `model.generate`;
    with `record_routes`, (new tokens, routes [S_prompt + N, L_moe, K] long) per prompt (module doc).

    Every rank of the MoE layers' group calls it together, each with its own
    prompts (possibly none). `generate_kwargs` go to transformers' `generate`
    (`max_new_tokens`, `do_sample`, `temperature`, `top_k`, ...). A prompt's
    output stops after its end-of-sequence token, as transformers stops it.
    """
    if any(p.dim() != 1 or p.numel() == 0 for p in prompts):
        raise ValueError(
            f"generate: each prompt must be 1-d and non-empty, got {[tuple(p.shape) for p in prompts]}"
        )
    layers = [m.layer for m in model.modules() if isinstance(m, HFMoEBlock)]
    sharded = dist.is_initialized() and any(layer.group is not None for layer in layers)
    device = next(model.parameters()).device
    batch = prompts or [torch.zeros(1, dtype=torch.long)]  # a dummy prompt keeps an idle rank in step
    pad = _pad_id(model)
    S = max(p.numel() for p in batch)
    ids_BS = torch.full((len(batch), S), pad, dtype=torch.long, device=device)
    mask_BS = torch.zeros_like(ids_BS)
    for i, prompt in enumerate(batch):  # left padding: every prompt's last token at position S - 1
        ids_BS[i, S - prompt.numel() :] = prompt.to(device)
        mask_BS[i, S - prompt.numel() :] = 1
    kwargs = {"pad_token_id": pad, **generate_kwargs}
    with (
        _decode_bound(layers, _most_prompts(len(batch), layers, sharded)),
        _routes(layers if record_routes else []) as calls,
    ):
        out = model.generate(ids_BS, attention_mask=mask_BS, synced_gpus=sharded, **kwargs)
    eos = generate_kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    new = [_until_end(row[S:], eos) for row in out[: len(prompts)]]
    if not record_routes:
        return new
    # Each layer's calls: the prefill [B * S, K], then one [B, K] per step; the last token never runs.
    routes_BXLK = torch.stack(
        [torch.cat([c.view(len(batch), -1, c.shape[-1]) for c in layer], 1) for layer in calls], 2
    )
    routes_BXLK = F.pad(routes_BXLK, (0, 0, 0, 0, 0, 1), value=-1)
    rows = [routes_BXLK[b, S - p.numel() : S + n.numel()] for b, (p, n) in enumerate(zip(prompts, new))]
    return new, rows


@contextmanager
def _routes(layers: list):
    """Within the block, each layer's `stats.expert_ids` of every call, in call order (one list per layer)."""
    calls: list[list[Tensor]] = [[] for _ in layers]
    handles = [
        layer.register_forward_hook(lambda module, args, out, kept=kept: kept.append(out.stats.expert_ids))
        for layer, kept in zip(layers, calls)
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _most_prompts(mine: int, layers: list, sharded: bool) -> int:
    """The most prompts any rank of the layers' group decodes (one all-reduce when sharded)."""
    if not sharded:
        return mine
    most = torch.tensor([mine], dtype=torch.long, device=layers[0].router.weight.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=layers[0].group)
    return int(most)


@contextmanager
def _decode_bound(layers: list, batch_bound: int):
    """Within the block, every call of an MoE layer after its first (the prefill) is a decode step
    of one token per sequence, and is told that no rank has more than `batch_bound` tokens in it.

    NOTE: told by the call's place, not by its shape: a rank whose prompts are one token long
    has a prefill shaped like a decode step, and every rank must pick the same dispatch.
    """
    calls: dict[int, int] = {}

    def bound(module, args, kwargs):
        calls[id(module)] = calls.get(id(module), 0) + 1
        if calls[id(module)] == 1:
            return args, kwargs
        return args, {**kwargs, "inference": Inference(tokens_per_rank=batch_bound)}

    handles = [layer.register_forward_pre_hook(bound, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pad_id(model: nn.Module) -> int:
    config = model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    return int(pad) if pad is not None else 0


def _until_end(new_N: Tensor, eos: int | list[int] | None) -> Tensor:
    """A row's new tokens up to and including its first end-of-sequence token (the rest is padding)."""
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for i, token in enumerate(new_N.tolist()):
        if token in eos:
            return new_N[: i + 1]
    return new_N
