"""Routing as a pure function: scores, top-k, capacity, drops and auxiliary losses.

Legend: T tokens, E experts, K choices per token, N = T * K assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import MoEConfig


@dataclass(frozen=True)
class Routing:
    """Where each of T tokens goes and with what weight.

    expert_ids: [T, K] long, global expert ids, best first.
    weights: [T, K] float32, combine weights; 0 where the assignment was dropped.
    keep: [T, K] bool, False where the chosen expert was already full.
    tokens_per_expert: [E] long, kept assignments per expert.
    aux_loss: scalar, E * sum_i f_i * P_i (Switch Transformer), before its coefficient.
    z_loss: scalar, mean_t logsumexp(logits_t)^2 (ST-MoE), before its coefficient.
    capacity: assignments each expert could keep; None when dropless.
    """

    expert_ids: Tensor
    weights: Tensor
    keep: Tensor
    tokens_per_expert: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    capacity: int | None

    @property
    def num_dropped(self) -> Tensor:
        return (~self.keep).sum()


def route(logits_TE: Tensor, config: MoEConfig, forced_expert_ids_TK: Tensor | None = None) -> Routing:
    """Route T tokens given their router logits [T, E].

    forced_expert_ids_TK: for benchmarks and tests only (skewed or adversarial
    loads): use these [T, K] distinct expert ids per token instead of the
    logits' choice; weights, capacity and losses follow as usual.

    Scores: softmax over all E logits, or sigmoid per logit. The K best
    experts are chosen by logit (both score functions are monotone, so this
    is the score ranking); ties go to the lower expert id.
    Weights: the chosen scores, renormalised to sum to 1 if
    `config.normalize_weights`, then zeroed where dropped; the remaining
    weights of a token are not renormalised after a drop.
    Capacity: see `keep_within_capacity`.
    """
    _check_logits(logits_TE, config)
    logits_TE = logits_TE.float()
    num_tokens = logits_TE.shape[0]
    top_k = config.top_k

    # NOTE: a stable descending sort instead of topk: topk leaves the order of
    # tied logits undefined, and the choice order decides position drops.
    if forced_expert_ids_TK is None:
        topk_logits_TK, expert_ids_TK = logits_TE.sort(dim=-1, descending=True, stable=True)
        topk_logits_TK = topk_logits_TK[:, :top_k]
        expert_ids_TK = expert_ids_TK[:, :top_k].contiguous()
    else:
        expert_ids_TK = _check_forced(forced_expert_ids_TK, num_tokens, config)
        topk_logits_TK = logits_TE.gather(1, expert_ids_TK)

    if config.score_func == "softmax":
        probs_TE = F.softmax(logits_TE, dim=-1)
        scores_TK = probs_TE.gather(1, expert_ids_TK)
        # softmax over the K chosen logits equals the chosen probabilities over
        # their sum, and is what SimpleMoE computes, bit for bit.
        weights_TK = F.softmax(topk_logits_TK, dim=-1) if config.normalize_weights else scores_TK
    else:
        # Sigmoid scores normalised to sum to 1, computed in log space so that
        # scores that underflow to 0 cannot give 0 / 0.
        log_scores_TE = F.logsigmoid(logits_TE)
        probs_TE = F.softmax(log_scores_TE, dim=-1)
        log_scores_TK = F.logsigmoid(topk_logits_TK)
        scores_TK = log_scores_TK.exp()
        weights_TK = F.softmax(log_scores_TK, dim=-1) if config.normalize_weights else scores_TK

    capacity = config.capacity(num_tokens)
    if capacity is None:
        keep_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
    else:
        keep_TK = keep_within_capacity(
            expert_ids_TK, scores_TK.detach(), capacity, config.num_experts, config.drop_policy
        )
        weights_TK = weights_TK * keep_TK

    tokens_per_expert_E = torch.zeros(
        config.num_experts, dtype=torch.long, device=logits_TE.device
    ).scatter_add_(0, expert_ids_TK.reshape(-1), keep_TK.reshape(-1).long())
    aux_loss, z_loss = _balance_losses(logits_TE, probs_TE, expert_ids_TK, config.num_experts)
    return Routing(expert_ids_TK, weights_TK, keep_TK, tokens_per_expert_E, aux_loss, z_loss, capacity)


def keep_within_capacity(
    expert_ids_TK: Tensor, scores_TK: Tensor, capacity: int, num_experts: int, policy: str
) -> Tensor:
    """[T, K] bool: which assignments fit in their expert's `capacity`.

    Each expert serves its assignments in priority order and keeps the first
    `capacity` of them; an expert drops only when it is full.
    "position": priority = (choice rank, token index), so every token's first
        choice precedes any second choice (GShard).
    "probs": priority = score, highest first; equal scores fall back to the
        position order. The score is the router's probability for that expert
        (softmax over all E, or sigmoid), not the renormalised weight, which is
        exactly 1 for every token under top-1.

    Example, T=3, K=2, E=2, capacity=2, position:
        expert_ids = [[0, 1], [0, 1], [1, 0]]
        queue of expert 0: (k0,t0) (k0,t1) | (k1,t2)   t2's second choice dropped
        queue of expert 1: (k0,t2) (k1,t0) | (k1,t1)   t1's second choice dropped
        keep = [[T, T], [T, F], [T, F]]
    """
    num_tokens, top_k = expert_ids_TK.shape
    num_assignments = num_tokens * top_k
    device = expert_ids_TK.device
    # Choice-major flattening: assignment n = k * T + t.
    expert_ids_N = expert_ids_TK.t().reshape(-1)
    if policy == "probs":
        priority_N = scores_TK.t().reshape(-1).argsort(descending=True, stable=True)
    else:
        priority_N = torch.arange(num_assignments, device=device)
    # NOTE: stable, so each expert's queue keeps the priority order.
    queue_N = priority_N[expert_ids_N[priority_N].argsort(stable=True)]
    counts_E = torch.bincount(expert_ids_N, minlength=num_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    slot_N = torch.arange(num_assignments, device=device) - starts_E[expert_ids_N[queue_N]]
    keep_N = torch.empty(num_assignments, dtype=torch.bool, device=device)
    keep_N[queue_N] = slot_N < capacity
    return keep_N.view(top_k, num_tokens).t()


def _balance_losses(
    logits_TE: Tensor, probs_TE: Tensor, expert_ids_TK: Tensor, num_experts: int
) -> tuple[Tensor, Tensor]:
    """Switch aux loss E * sum_i f_i * P_i and ST-MoE z-loss; both 0 for T = 0.

    f_i: share of the T * K choices (before dropping) that picked expert i.
    P_i: mean over tokens of expert i's probability.
    """
    if logits_TE.shape[0] == 0:
        # Zero, but still attached to the graph so backward passes through.
        zero = logits_TE.sum() * 0.0
        return zero, zero
    choices_E = torch.bincount(expert_ids_TK.reshape(-1), minlength=num_experts)
    fraction_E = choices_E.float() / expert_ids_TK.numel()
    aux_loss = num_experts * (fraction_E * probs_TE.mean(dim=0)).sum()
    z_loss = torch.logsumexp(logits_TE, dim=-1).square().mean()
    return aux_loss, z_loss


def _check_logits(logits_TE: Tensor, config: MoEConfig) -> None:
    if not logits_TE.is_floating_point():
        raise TypeError(f"router logits must be floating point, got {logits_TE.dtype}")
    if logits_TE.dim() != 2 or logits_TE.shape[1] != config.num_experts:
        raise ValueError(
            f"router logits must be [T, num_experts={config.num_experts}], got {tuple(logits_TE.shape)}"
        )
    # NOTE: host sync. NaN would otherwise be routed silently to arbitrary experts.
    if not bool(torch.isfinite(logits_TE).all()):
        bad = int((~torch.isfinite(logits_TE)).any(dim=-1).sum())
        raise ValueError(f"router logits contain NaN or Inf ({bad} of {logits_TE.shape[0]} tokens)")


def _check_forced(expert_ids_TK: Tensor, num_tokens: int, config: MoEConfig) -> Tensor:
    if expert_ids_TK.shape != (num_tokens, config.top_k) or expert_ids_TK.dtype != torch.long:
        raise ValueError(
            f"forced expert ids must be a long tensor [T={num_tokens}, top_k={config.top_k}], "
            f"got {expert_ids_TK.dtype} {tuple(expert_ids_TK.shape)}"
        )
    if num_tokens and not (0 <= int(expert_ids_TK.min()) and int(expert_ids_TK.max()) < config.num_experts):
        raise ValueError(f"forced expert ids must lie in [0, {config.num_experts})")
    ordered_TK = expert_ids_TK.sort(dim=-1).values
    if bool((ordered_TK[:, 1:] == ordered_TK[:, :-1]).any()):
        raise ValueError("forced expert ids must be distinct within each token")
    return expert_ids_TK.contiguous()
