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
    aux_loss: scalar, E * sum_i f_i * P_i (Switch Transformer), before its
        coefficient, over the tokens of config.aux_loss_scope ("global_batch" is
        finished by the layer: here it is the micro-batch value).
    z_loss: scalar, mean_t logsumexp(logits_t)^2 (ST-MoE), before its coefficient.
    capacity: assignments each expert could keep; None when dropless.
    choices_per_expert: [E] long, assignments per expert before capacity drops.
    mean_probs: [E] float32, P_i: expert i's probability averaged over the T
        tokens (differentiable; the layer's global-batch aux loss uses it).
    """

    expert_ids: Tensor
    weights: Tensor
    keep: Tensor
    tokens_per_expert: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    capacity: int | None
    choices_per_expert: Tensor
    mean_probs: Tensor

    @property
    def num_dropped(self) -> Tensor:
        return (~self.keep).sum()


def route(
    logits_TE: Tensor,
    config: MoEConfig,
    forced_expert_ids_TK: Tensor | None = None,
    *,
    selection_bias_E: Tensor | None = None,
    training: bool = True,
    sequence_length: int | None = None,
    decided: tuple[Tensor, Tensor] | None = None,
    check_finite: bool = True,
    routes_TK: Tensor | None = None,
) -> Routing:
    """Route T tokens given their router logits [T, E].

    Scores: softmax over all E logits, or sigmoid per logit.
    Choice: the K best experts by score; ties go to the lower expert id. With
    `selection_bias_E` (config.selection_bias) the choice ranks score + bias;
    with config.group_topk, only experts of the group_topk best groups compete
    (a group's rank: the sum of its two best, biased, scores; DeepSeek-V3).
    Weights: the chosen unbiased scores, renormalised to sum to 1 if
    `config.normalize_weights` (divided by max(sum, config.normalize_min)
    when that is > 0), times config.routed_scaling_factor, then
    zeroed where dropped; the remaining weights of a token are not
    renormalised after a drop.
    Capacity: config.capacity(T, training); see `keep_within_capacity`.
    sequence_length: S for aux_loss_scope "sequence" (T = B * S tokens in
        sequence order); None treats the T tokens as one sequence.
    forced_expert_ids_TK: for benchmarks and tests only (skewed or adversarial
        loads): use these [T, K] distinct expert ids per token instead of the
        scores' choice; weights, capacity and losses follow as usual.
    decided: (expert_ids [T, K], keep [T, K]) of an earlier call on the same
        tokens: reuse that choice and those drops, recompute everything
        differentiable from `logits_TE`. The layer passes it when activation
        checkpointing recomputes a forward, so that near-ties cannot flip.
    routes_TK: [T, K] integer logical expert ids to replay (router record and
        replay, docs/post-training.md): a row of ids is the token's choice,
        exactly, in that order; a row of -1 chooses natively (the scores, or
        `forced_expert_ids_TK`). Weights, capacity and losses follow from the
        live logits as for any choice, so the router still gets gradients.
        A row mixing -1 and ids, an id outside [-1, E) or one repeated within
        a row is a ValueError (see `_check_routes`).

    check_finite: refuse NaN / Inf logits (a host sync; the layer passes False for a
        dispatcher that promises none, `host_sync_free`: plan.plan_call).

    NOTE: under torch.compile the host-synchronising input checks are skipped
    (they would break the graph); eager runs keep them.
    """
    if not torch.compiler.is_compiling():
        _check_logits(logits_TE, config, check_finite)
    logits_TE = logits_TE.float()
    num_tokens = logits_TE.shape[0]

    if config.score_func == "softmax":
        probs_TE = F.softmax(logits_TE, dim=-1)
    else:
        # Sigmoid scores normalised to sum to 1 (for P_i of the aux loss),
        # computed in log space so that scores that underflow to 0 cannot give 0 / 0.
        probs_TE = F.softmax(F.logsigmoid(logits_TE), dim=-1)

    if decided is not None:
        expert_ids_TK = decided[0]
    else:
        if routes_TK is not None:
            routes_TK, replay_T1 = _check_routes(routes_TK, num_tokens, config, logits_TE.device)
        if forced_expert_ids_TK is not None:
            expert_ids_TK = _check_forced(forced_expert_ids_TK, num_tokens, config)
        else:
            # NOTE: detached: the choice is not differentiable, and a sort on the graph would save
            # tensors that an activation-checkpointing recompute reusing the choice does not.
            expert_ids_TK = _choose_experts(logits_TE.detach(), probs_TE.detach(), selection_bias_E, config)
        if routes_TK is not None:
            expert_ids_TK = torch.where(replay_T1, routes_TK, expert_ids_TK)
    topk_logits_TK = logits_TE.gather(1, expert_ids_TK)

    if config.score_func == "softmax":
        scores_TK = probs_TE.gather(1, expert_ids_TK)
        # softmax over the K chosen logits equals the chosen probabilities over
        # their sum, and is what SimpleMoE computes, bit for bit.
        log_scores_TK = topk_logits_TK  # the log-probabilities up to a per-token constant
    else:
        log_scores_TK = F.logsigmoid(topk_logits_TK)
        scores_TK = log_scores_TK.exp()
    if not config.normalize_weights:
        weights_TK = scores_TK
    elif config.normalize_min > 0:
        # NOTE: a floor under the sum (ERNIE-4.5), so the plain division: a selection
        # bias can choose experts whose scores sum to almost nothing.
        weights_TK = scores_TK / scores_TK.sum(dim=-1, keepdim=True).clamp(min=config.normalize_min)
    else:
        weights_TK = F.softmax(log_scores_TK, dim=-1)
    if config.routed_scaling_factor != 1.0:
        weights_TK = weights_TK * config.routed_scaling_factor

    capacity = config.capacity(num_tokens, training)
    if decided is not None:
        keep_TK = decided[1]
        if capacity is not None:
            weights_TK = weights_TK * keep_TK
    elif capacity is None:
        keep_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
    else:
        keep_TK = keep_within_capacity(
            expert_ids_TK, scores_TK.detach(), capacity, config.num_experts, config.drop_policy
        )
        weights_TK = weights_TK * keep_TK

    num_experts = config.num_experts
    tokens_per_expert_E = _count(expert_ids_TK, keep_TK.long(), num_experts)
    choices_E = _count(expert_ids_TK, torch.ones_like(expert_ids_TK), num_experts)
    mean_probs_E = probs_TE.mean(dim=0) if num_tokens else probs_TE.sum(dim=0)
    z_loss = torch.logsumexp(logits_TE, dim=-1).square().mean() if num_tokens else logits_TE.sum() * 0.0
    if config.aux_loss_scope == "sequence" and sequence_length is not None:
        aux_loss = sequence_aux_loss(probs_TE, expert_ids_TK, num_experts, sequence_length)
    else:
        aux_loss = switch_aux_loss(choices_E, mean_probs_E)
    return Routing(
        expert_ids_TK,
        weights_TK,
        keep_TK,
        tokens_per_expert_E,
        aux_loss,
        z_loss,
        capacity,
        choices_E,
        mean_probs_E,
    )


def _choose_experts(
    logits_TE: Tensor, probs_TE: Tensor, selection_bias_E: Tensor | None, config: MoEConfig
) -> Tensor:
    """[T, K] expert ids, best first, by (biased, group-limited) score; ties to the lower id.

    NOTE: a stable descending sort instead of topk: topk leaves the order of
    tied values undefined, and the choice order decides position drops.
    """
    top_k, num_groups = config.top_k, config.num_groups
    group_limited = config.group_topk is not None and config.group_topk < num_groups
    if selection_bias_E is None and not group_limited:
        # Both score functions are monotone in the logit: rank logits, which
        # keeps ties as ties (probabilities of distinct logits can round equal).
        return logits_TE.sort(dim=-1, descending=True, stable=True)[1][:, :top_k].contiguous()
    choice_TE = probs_TE if config.score_func == "softmax" else torch.sigmoid(logits_TE)
    if selection_bias_E is not None:
        choice_TE = choice_TE + selection_bias_E.float()
    if group_limited:
        num_tokens, per_group = choice_TE.shape[0], config.num_experts // num_groups
        choice_TGe = choice_TE.view(num_tokens, num_groups, per_group)
        best_two = choice_TGe.sort(dim=-1, descending=True).values[..., : min(2, per_group)]
        groups_TG = best_two.sum(dim=-1).sort(dim=-1, descending=True, stable=True)[1]
        allowed_TG = torch.zeros_like(choice_TGe[..., 0], dtype=torch.bool)
        allowed_TG.scatter_(1, groups_TG[:, : config.group_topk], True)
        choice_TE = choice_TGe.masked_fill(~allowed_TG.unsqueeze(-1), float("-inf")).view_as(choice_TE)
    return choice_TE.sort(dim=-1, descending=True, stable=True)[1][:, :top_k].contiguous()


def _count(expert_ids_TK: Tensor, values_TK: Tensor, num_experts: int) -> Tensor:
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=expert_ids_TK.device)
    return counts_E.scatter_add_(0, expert_ids_TK.reshape(-1), values_TK.reshape(-1))


def switch_aux_loss(choices_E: Tensor, mean_probs_E: Tensor) -> Tensor:
    """E * sum_i f_i * P_i, f_i = choices_E[i] / sum(choices_E) (before drops), P_i = mean_probs_E[i].

    0, still on the graph, when there are no choices. The layer's "global_batch"
    scope passes choices summed over ranks and micro-batches with the local P_i.
    """
    fraction_E = choices_E.float() / choices_E.sum().clamp(min=1)
    return choices_E.numel() * (fraction_E * mean_probs_E).sum()


def selection_bias_step(load_E: Tensor, rate: float) -> Tensor:
    """[E] u * sign(mean load - load): the selection bias's update after an optimizer step, load_E the
    choices per expert summed over the step and the stats group, u = rate (DeepSeek-V3's
    auxiliary-loss-free balancing: an under-loaded expert's bias rises, an over-loaded one's falls)."""
    return torch.sign(load_E.mean() - load_E) * rate


def sequence_aux_loss(
    probs_TE: Tensor, expert_ids_TK: Tensor, num_experts: int, sequence_length: int
) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss: E * sum_i f_i * P_i per sequence, averaged over sequences.

    T = B * S tokens in sequence order; f_i and P_i are computed within each sequence.
    """
    num_tokens, top_k = expert_ids_TK.shape
    if num_tokens == 0:
        return probs_TE.sum() * 0.0
    if num_tokens % sequence_length:
        raise ValueError(f"{num_tokens} tokens do not form sequences of length {sequence_length}")
    batch = num_tokens // sequence_length
    choices_BE = torch.zeros(batch, num_experts, device=probs_TE.device)
    seq_of_token_TK = (torch.arange(num_tokens, device=probs_TE.device) // sequence_length).unsqueeze(1)
    flat_index = (seq_of_token_TK * num_experts + expert_ids_TK).reshape(-1)
    choices_BE.view(-1).index_add_(0, flat_index, torch.ones(flat_index.numel(), device=probs_TE.device))
    fraction_BE = choices_BE / (sequence_length * top_k)
    mean_probs_BE = probs_TE.view(batch, sequence_length, num_experts).mean(dim=1)
    return num_experts * (fraction_BE * mean_probs_BE).sum(dim=-1).mean()


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
    # NOTE: a scatter, not bincount, whose output size depends on the data (a torch.compile graph break).
    counts_E = _count(expert_ids_N, torch.ones_like(expert_ids_N), num_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    slot_N = torch.arange(num_assignments, device=device) - starts_E[expert_ids_N[queue_N]]
    keep_N = torch.empty(num_assignments, dtype=torch.bool, device=device)
    keep_N[queue_N] = slot_N < capacity
    return keep_N.view(top_k, num_tokens).t()


def _check_logits(logits_TE: Tensor, config: MoEConfig, check_finite: bool = True) -> None:
    if not logits_TE.is_floating_point():
        raise TypeError(f"router logits must be floating point, got {logits_TE.dtype}")
    if logits_TE.dim() != 2 or logits_TE.shape[1] != config.num_experts:
        raise ValueError(
            f"router logits must be [T, num_experts={config.num_experts}], got {tuple(logits_TE.shape)}"
        )
    # NOTE: host sync. NaN would otherwise be routed silently to arbitrary experts.
    if check_finite and not bool(torch.isfinite(logits_TE).all()):
        bad = int((~torch.isfinite(logits_TE)).any(dim=-1).sum())
        raise ValueError(f"router logits contain NaN or Inf ({bad} of {logits_TE.shape[0]} tokens)")


def _check_routes(
    routes_TK: Tensor, num_tokens: int, config: MoEConfig, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(routes [T, K] long on `device`, [T, 1] bool: the rows to replay (ids), not route natively (-1)).

    NOTE: host syncs (the value checks, skipped under torch.compile): an id out of
    range would gather garbage weights, and a repeated one serve a token twice.
    """
    if not isinstance(routes_TK, Tensor) or routes_TK.is_floating_point() or routes_TK.is_complex():
        raise ValueError(f"routes must be an integer tensor, got {getattr(routes_TK, 'dtype', routes_TK)}")
    if routes_TK.dtype == torch.bool or routes_TK.shape != (num_tokens, config.top_k):
        raise ValueError(
            f"routes must be an integer tensor [T={num_tokens}, top_k={config.top_k}], "
            f"got {routes_TK.dtype} {tuple(routes_TK.shape)}"
        )
    routes_TK = routes_TK.to(device=device, dtype=torch.long)
    native_TK = routes_TK == -1
    replay_T1 = ~native_TK[:, :1]
    if torch.compiler.is_compiling() or num_tokens == 0:
        return routes_TK, replay_T1
    if not (-1 <= int(routes_TK.min()) and int(routes_TK.max()) < config.num_experts):
        raise ValueError(
            f"routes must be logical expert ids in [0, {config.num_experts}) or -1 (route natively), "
            f"got values in [{int(routes_TK.min())}, {int(routes_TK.max())}]"
        )
    mixed_T = native_TK.any(dim=-1) & ~native_TK.all(dim=-1)
    if bool(mixed_T.any()):
        raise ValueError(
            f"routes: a row is either all -1 (route natively) or K expert ids; rows "
            f"{mixed_T.nonzero().flatten()[:8].tolist()} mix them"
        )
    ordered_TK = routes_TK.sort(dim=-1).values
    repeated_T = (ordered_TK[:, 1:] == ordered_TK[:, :-1]).any(dim=-1) & replay_T1[:, 0]
    if bool(repeated_T.any()):
        raise ValueError(
            f"routes: expert ids repeat within rows {repeated_T.nonzero().flatten()[:8].tolist()}"
        )
    return routes_TK, replay_T1


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
