"""What benchmarks.bench compares the layer with: the seed's per-expert loop and fairscale's MOELayer.

- SimpleMoE: the starting design (shared/seeds, "SimpleMoE"): a linear gate
  with bias, top-k over the logits, softmax over the k chosen, experts
  Linear(D, H) -> ReLU -> Linear(H, D), and one boolean-mask pass per expert
  (gather the rows that chose it, run it, scatter-add its weighted output).
  It has no expert parallelism: every rank holds all E experts and runs its
  own tokens, so it computes the same T * K rows per rank as the layer.
- fairscale: `MOELayer(Top2Gate(D, E), experts, group)` with the rank's E / P
  local experts as nn.Modules (the same Linear -> ReLU -> Linear). Top2Gate
  fixes the capacity at 2T/E (capacity factor 1.0 for top-2), samples the
  second expert with Gumbel noise, and dispatches and combines with dense
  one-hot einsums over [T, E, C] tensors: memory and FLOPs quadratic in T.
  An optional dependency (the `bench` extra); `fairscale_missing()` says why not.

Legend: T tokens on this rank, D d_model, H d_hidden, E experts, e local
experts, K top-k, C capacity, P ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_tools import PhaseTape, timed_step

PHASES = ("routing", "permutation", "all-to-all", "experts", "combine", "loss")


def _expert(d_model: int, d_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_model))


class SimpleMoE(nn.Module):
    """The seed's MoE, unchanged in substance: a boolean mask per expert over all T tokens."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.experts = nn.ModuleList(_expert(d_model, d_hidden) for _ in range(num_experts))
        self.gate = nn.Linear(d_model, num_experts)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        weights_TK, indices_TK = torch.topk(self.gate(x_TD), self.top_k, dim=-1)
        weights_TK = F.softmax(weights_TK, dim=-1)
        results_TD = torch.zeros_like(x_TD)
        for expert_id, expert in enumerate(self.experts):
            mask_T = (indices_TK == expert_id).any(dim=-1)
            if mask_T.sum() > 0:
                expert_weights = weights_TK[mask_T, (indices_TK[mask_T] == expert_id).nonzero()[:, 1]]
                results_TD[mask_T] += expert(x_TD[mask_T]) * expert_weights.unsqueeze(-1)
        return results_TD


def simple_moe_step(model: SimpleMoE, x_TD: torch.Tensor, upstream_TD: torch.Tensor):
    return timed_step(lambda: (model(x_TD) * upstream_TD).sum(), drop=(model, x_TD))


def fairscale_missing() -> str | None:
    """None if fairscale's MoE imports, else why not (to print as a note)."""
    try:
        from fairscale.nn.moe import MOELayer, Top2Gate  # noqa: F401
    except Exception as err:  # ImportError, or a fairscale that no longer imports on this torch
        return f"fairscale not importable ({type(err).__name__}: {err}); pip install -e '.[bench]'"
    return None


def fairscale_dense_bytes(tokens: int, num_experts: int) -> int:
    """A rough lower bound on the bytes of Top2Gate's [T, E, C] tensors per rank (C = 2T/E).

    combine_weights, its two per-choice halves and the dispatch mask as
    float: about 4 fp32 tensors of T * E * C = 2 T^2 elements.
    """
    capacity = 2 * tokens // num_experts
    return 4 * 4 * tokens * num_experts * capacity


def build_fairscale(num_experts: int, d_model: int, d_hidden: int, group):
    import torch.distributed as dist
    from fairscale.nn.moe import MOELayer, Top2Gate

    local = num_experts // dist.get_world_size(group)
    experts = nn.ModuleList(_expert(d_model, d_hidden) for _ in range(local))
    return MOELayer(Top2Gate(d_model, num_experts), experts, group)


def fairscale_input(layer, x_TD: torch.Tensor) -> torch.Tensor:
    """MOELayer takes [s, t, D] with s divisible by its local experts."""
    local = len(layer.experts)
    return x_TD.view(local, x_TD.shape[0] // local, x_TD.shape[1])


def fairscale_step(layer, x_TD: torch.Tensor, upstream_TD: torch.Tensor):
    x_sTD, upstream_sTD = fairscale_input(layer, x_TD), fairscale_input(layer, upstream_TD)

    return timed_step(lambda: (layer(x_sTD) * upstream_sTD).sum() + layer.l_aux, drop=(layer, x_TD))


def fairscale_instrumented_step(layer, x_TD: torch.Tensor, upstream_TD: torch.Tensor):
    """Phase by phase through fairscale's MOELayer.forward (0.4.13); mirrors it, so keep the two in step.

    routing: the gate (logits, top-2 with Gumbel noise, the [T, E, C] combine
    weights and dispatch mask); permutation: the dispatch einsum "sec,sm->ecm"
    and the reshapes; experts: the local expert modules; combine: the einsum "sec,ecm->sm".
    """
    from fairscale.nn.moe.moe_layer import _AllToAll

    group, size, local = layer.group, layer.world_size, len(layer.experts)

    def step() -> dict[str, float]:
        tape = PhaseTape(PHASES, group)
        x = x_TD.detach().requires_grad_()
        d_model = x.shape[1]
        with tape.clock("routing"):
            l_aux, combine_weights, dispatch_mask = layer.gate(x)
        combine_weights, l_aux = tape.cut("routing", combine_weights, l_aux)
        with tape.clock("permutation"):
            dispatched = torch.einsum("sec,sm->ecm", dispatch_mask.float(), x)
        dispatched = tape.cut("permutation", dispatched)
        with tape.clock("all-to-all", barrier=True):
            dispatched = _AllToAll.apply(group, dispatched)
        dispatched = tape.cut("all-to-all", dispatched, barrier=True)
        with tape.clock("experts"):
            chunks = dispatched.reshape(size, local, -1, d_model).chunk(local, dim=1)
            expert_output = torch.cat([expert(chunk) for chunk, expert in zip(chunks, layer.experts)], dim=1)
        expert_output = tape.cut("experts", expert_output)
        with tape.clock("all-to-all", barrier=True):
            expert_output = _AllToAll.apply(group, expert_output)
        expert_output = tape.cut("all-to-all", expert_output, barrier=True)
        with tape.clock("combine"):
            expert_output = expert_output.reshape(size * local, -1, d_model)
            out = torch.einsum("sec,ecm->sm", combine_weights, expert_output)
        out = tape.cut("combine", out)
        with tape.clock("loss"):
            loss = (out * upstream_TD).sum() + l_aux
        seconds = tape.backward(loss)
        layer.zero_grad(set_to_none=True)
        return seconds

    return step
