"""A model built for its layout: on the meta device, experts sharded, FSDP2 over the rest, then materialised.

No rank ever allocates what it does not hold. `build_model` builds the
Transformer on `torch.device("meta")`, swaps its MoE layers for ones over the
ep group (parallel.shard_experts), optionally wraps it with FSDP2
(`apply_fsdp`), and only then gives the parameters storage (`to_empty`) and
values (`reset_parameters`, which writes each rank's part of the
layout-independent initialisation: materialize.py).

FSDP2 layout (torchtitan's, over the dp x ep mesh of parallel.make_layout):
- dense parameters (attention, norms, embeddings, routers, shared experts)
  are sharded over all ranks, one FSDP unit per block and one for the rest;
- each MoE layer's experts are their own unit, sharded over the dp ranks that
  hold the same experts: over the local-expert dimension where dp divides it,
  else over the next dimension (d_model of w1, d_hidden of w2); with dp = 1
  and no param_dtype they stay plain tensors outside FSDP (no other rank
  holds them);
- gradients are reduce-scattered as sums (divide factor 1: each rank's loss is
  already scaled by 1 / micro-batches in the global batch), in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from .config import ExecutionConfig
from .model import ModelConfig, Transformer
from .parallel import Layout, shard_experts


def build_model(
    config: ModelConfig,
    layout: Layout,
    device: torch.device | str = "cpu",
    *,
    execution: ExecutionConfig | None = None,
    fsdp: bool = False,
    param_dtype: torch.dtype | None = None,
) -> Transformer:
    """The Transformer of `config` holding only this rank's part, initialised as the one-process build.

    After torch.manual_seed(s), every parameter equals its slice of
    `Transformer(config)` built in one process after the same seed, bit for bit.
    `fsdp`: shard the dense part over the world and the experts over dp
    (`apply_fsdp`); `param_dtype`: FSDP's compute dtype (None: the parameters').
    """
    if fsdp and layout.world == 1:
        raise ValueError("parallel.fsdp = true needs more than one rank (launch with torchrun)")
    if param_dtype is not None and not fsdp:
        raise ValueError("build_model: param_dtype is FSDP's mixed precision; without fsdp use autocast")
    if fsdp and execution is not None and execution.dispatch == "balanced":
        # NOTE: the dispatch lends the experts' weights before their forward, where FSDP still
        # holds them sharded; not supported yet.
        raise ValueError("execution.dispatch = 'balanced' does not run with parallel.fsdp = true yet")
    with torch.device("meta"):
        model = Transformer(config, execution)
    # Load statistics (global-batch aux loss, selection bias) are summed over every rank.
    shard_experts(model, layout.ep_group, dist.group.WORLD if layout.world > 1 else None)
    if fsdp:
        apply_fsdp(model, layout, param_dtype)
    model.to_empty(device=device)
    model.tie_weights()
    model.reset_parameters()
    return model


def apply_fsdp(model: Transformer, layout: Layout, param_dtype: torch.dtype | None = None) -> None:
    """Wrap `model` (experts already sharded over ep) with FSDP2 as the module doc says, in place."""
    mesh = layout.mesh
    if mesh is None:
        raise ValueError("apply_fsdp needs a dp x ep mesh of more than one rank (parallel.make_layout)")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    world_mesh = _world_mesh(mesh)
    unsharded: set[nn.Parameter] = set()
    for _, layer in model.moe_layers():
        if layer.placement is not None:
            raise ValueError("parallel.fsdp does not support redundant experts (parallel.redundant_experts)")
        if layout.dp == 1 and param_dtype is None:
            # NOTE: no other rank holds these experts, so there is nothing to shard or reduce; as an
            # FSDP unit of one rank they would still be copied whole for every forward and backward.
            # (With a param_dtype they stay a unit: that copy is then the compute-dtype one.)
            unsharded.update(layer.experts.parameters())
            continue
        fully_shard(
            layer.experts,
            mesh=mesh["dp"],
            mp_policy=policy,
            shard_placement_fn=_expert_shard_dim(layer.num_local_experts, layout.dp),
        )
    for block in model.blocks:
        fully_shard(block, mesh=world_mesh, mp_policy=policy, ignored_params=unsharded or None)
    fully_shard(model, mesh=world_mesh, mp_policy=policy, ignored_params=unsharded or None)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # NOTE: plain sums: the divide factor would otherwise be NCCL's PREMUL_SUM, which gloo lacks.
            module.set_force_sum_reduction_for_comms(True)
            # A rank whose experts received no rows still takes part in their reduce-scatter.
            module.set_reduce_scatter_unused_params(True, recurse=False)


def _world_mesh(mesh: DeviceMesh) -> DeviceMesh:
    return init_device_mesh(mesh.device_type, (mesh.size(),), mesh_dim_names=("world",))


def _expert_shard_dim(num_local_experts: int, dp: int):
    """FSDP's placement for a stacked expert tensor [e, ...]: whole experts per rank where dp divides e,
    else a slice of every expert (dim 1), so no rank is left holding nothing."""
    dim = 0 if num_local_experts % dp == 0 else 1

    def placement(param: nn.Parameter) -> Shard:
        return Shard(dim if param.dim() > dim else 0)

    return placement
