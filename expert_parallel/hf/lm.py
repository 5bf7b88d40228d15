"""A Hugging Face causal LM from `hf.from_pretrained`, trained as the trainer trains `model.Transformer`.

transformers' decoder layers take only the output tensor of an MoE block, so
`HFMoEBlock` returns just that. Training needs more of each MoE layer: its aux
loss and routing statistics, and, for the "global_batch" aux loss, this
step's earlier choices fed in. `HFCausalLM` gets them with hooks that live
for one forward (`moe_outputs`): a pre-hook hands each MoELayer its
`choices_before_E`, a hook keeps its MoEOutput. Nothing is stored on a module.

Legend: B sequences, S positions, V vocabulary, E experts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn.functional as F
from torch import Tensor, nn

from ..layer import MoELayer, MoEOutput
from .pretrained import HFMoEBlock


@contextmanager
def moe_outputs(layers: list[MoELayer], choices_before: list[Tensor | None] | None = None) -> Iterator[list]:
    """Within the block: each forward of `layers` appends its MoEOutput to the yielded list (its `out`
    detached), and layer i gets `choices_before[i]` as its `choices_before_E`."""
    outputs: list[MoEOutput] = []
    handles = []
    choices = list(choices_before or [])
    for layer, choices_E in zip(layers, choices + [None] * (len(layers) - len(choices))):

        def feed(module, args, kwargs, choices_E=choices_E):
            return args, {**kwargs, "choices_before_E": choices_E} if choices_E is not None else kwargs

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
        self, tokens_BS: Tensor, choices_before: list[Tensor | None] | None = None
    ) -> tuple[Tensor, list[MoEOutput]]:
        """tokens [B, S] -> (logits [B, S, V], an MoEOutput per layer); choices_before as in Transformer."""
        with moe_outputs([layer for _, layer in self.moe_layers()], choices_before) as outputs:
            logits_BSV = self.hf(input_ids=tokens_BS, use_cache=False).logits
        return logits_BSV, outputs

    def loss(
        self, tokens: Tensor, choices_before: list[Tensor | None] | None = None
    ) -> tuple[Tensor, Tensor, list[MoEOutput]]:
        """tokens [B, S + 1] -> (lm_loss, aux_loss, an MoEOutput per MoE layer), as Transformer.loss."""
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise ValueError(
                f"HFCausalLM.loss expects tokens [B, S + 1] with S >= 1, got {tuple(tokens.shape)}"
            )
        logits_BSV, outputs = self(tokens[:, :-1], choices_before)
        lm_loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), tokens[:, 1:].reshape(-1))
        aux_loss = lm_loss.new_zeros(())
        for moe in outputs:
            aux_loss = aux_loss + moe.aux_loss
        return lm_loss, aux_loss, outputs

    def num_params(self, active_only: bool = False) -> int:
        """Parameters of the whole model (experts counted from the config, as Transformer.num_params)."""
        layers = [layer for _, layer in self.moe_layers()]
        expert_params = {id(p) for layer in layers for p in layer.experts.parameters()}
        count = sum(p.numel() for p in self.parameters() if id(p) not in expert_params)
        for layer in layers:
            per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.num_local_experts
            count += per_expert * (layer.config.top_k if active_only else layer.config.num_experts)
        return count
