"""A Hugging Face causal LM from `hf.from_pretrained`, trained as the trainer trains `model.Transformer`.

transformers' decoder layers take only the output tensor of an MoE block, so
`HFMoEBlock` returns just that. Training needs more of each MoE layer: its aux
loss and routing statistics, and, for the "global_batch" aux loss, this
step's earlier choices fed in, and for router replay its routes. `HFCausalLM`
gets them with hooks that live for one forward (`moe_outputs`): a pre-hook
hands each MoELayer its `choices_before_E` and `routes`, a hook keeps its
MoEOutput. Nothing is stored on a module.

Legend: B sequences, S positions, V vocabulary, E experts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from ..layer import MoELayer, MoEOutput, layer_routes
from ..model import next_token_loss
from .pretrained import HFMoEBlock


@contextmanager
def moe_outputs(
    layers: list[MoELayer],
    choices_before: list[Tensor | None] | None = None,
    routes: list[Tensor | None] | None = None,
) -> Iterator[list]:
    """Within the block: each forward of `layers` appends its MoEOutput to the yielded list (its `out`
    detached), and layer i gets `choices_before[i]` as its `choices_before_E` and `routes[i]` [T, K]
    as its `routes` (router replay)."""
    outputs: list[MoEOutput] = []
    handles = []
    choices = list(choices_before or [])
    choices += [None] * (len(layers) - len(choices))
    routes = list(routes or [None] * len(layers))
    for layer, choices_E, routes_TK in zip(layers, choices, routes):

        def feed(module, args, kwargs, choices_E=choices_E, routes_TK=routes_TK):
            if choices_E is not None:
                kwargs = {**kwargs, "choices_before_E": choices_E}
            if routes_TK is not None:
                kwargs = {**kwargs, "routes": routes_TK}
            return args, kwargs

        def keep(module, args, kwargs, output: MoEOutput):
            outputs.append(output._replace(out=output.out.detach()))

        handles.append(layer.register_forward_pre_hook(feed, with_kwargs=True))
        handles.append(layer.register_forward_hook(keep, with_kwargs=True))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


class HFCausalLM(nn.Module):
    """`hf_model` (from `from_pretrained`) with Transformer's training interface: `loss`, `moe_layers`,
    `blocks` (its decoder layers, FSDP's units) and `num_params`.

    The wrapped model is `self.hf`; checkpoints of this module key its tensors `hf.<name>`.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.activation_checkpointing = (
            False  # not supported: transformers' own checkpointing is not wired in
        )
        decoder = getattr(hf_model, "model", None)
        if not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
            raise ValueError(f"{type(hf_model).__name__}: no decoder layers at .model.layers")
        if not self.moe_layers():
            raise ValueError(f"{type(hf_model).__name__}: no MoE layers (load it with hf.from_pretrained)")

    @property
    def blocks(self) -> nn.ModuleList:
        return self.hf.model.layers

    def moe_layers(self) -> list[tuple[str, MoELayer]]:
        """(name, layer) for every MoE block's layer, in model order."""
        return [(f"{name}.layer", m.layer) for name, m in self.named_modules() if isinstance(m, HFMoEBlock)]

    def forward(
        self,
        tokens_BS: Tensor,
        choices_before: list[Tensor | None] | None = None,
        *,
        routes: Tensor | None = None,
    ) -> tuple[Tensor, list[MoEOutput]]:
        """tokens [B, S] -> (logits [B, S, V], an MoEOutput per layer); choices_before and routes
        [B, S, L_moe, K] (router replay, layer l gets routes[:, :, l]) as in Transformer."""
        layers = [layer for _, layer in self.moe_layers()]
        per_layer = layer_routes(routes, tuple(tokens_BS.shape), len(layers), "HFCausalLM.forward")
        with moe_outputs(layers, choices_before, per_layer) as outputs:
            logits_BSV = self.hf(input_ids=tokens_BS, use_cache=False).logits
        return logits_BSV, outputs

    def loss(
        self,
        tokens: Tensor,
        choices_before: list[Tensor | None] | None = None,
        *,
        routes: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, list[MoEOutput]]:
        """tokens [B, S + 1] -> (lm_loss, aux_loss, an MoEOutput per MoE layer), as Transformer.loss
        (routes [B, S, L_moe, K], or [B, S + 1, L_moe, K] whose last position is not used)."""
        return next_token_loss(self, tokens, choices_before, routes, "HFCausalLM.loss")

    def num_params(self, active_only: bool = False) -> int:
        """Parameters of the whole model (experts counted from the config, as Transformer.num_params)."""
        layers = [layer for _, layer in self.moe_layers()]
        expert_params = {id(p) for layer in layers for p in layer.experts.parameters()}
        count = sum(p.numel() for p in self.parameters() if id(p) not in expert_params)
        for layer in layers:
            per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.num_local_experts
            count += per_expert * (layer.config.top_k if active_only else layer.config.num_experts)
        return count
