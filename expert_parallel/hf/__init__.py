"""Hugging Face MoE models as expert-parallel layers, and back.

- blocks.py: one transformers MoE block <-> MoELayer (`from_hf_block`,
  `copy_to_hf_block`), and the helpers that read a block (its router, experts,
  shared experts, routing math), which pretrained.py shares;
- pretrained.py: a whole checkpoint loaded by shard (`from_pretrained`: the
  dense tensors and this rank's experts) and saved in its own format
  (`save_pretrained`);
- lm.py: a loaded model with the trainer's interface (`HFCausalLM`, `moe_outputs`);
- generation.py: transformers' `generate` with the experts sharded (`generate`).

Imports flow one way: blocks <- pretrained <- lm, generation. transformers
itself is imported only when a function needs it.
"""

from .blocks import copy_to_hf_block, from_hf_block
from .generation import generate
from .lm import HFCausalLM, moe_outputs
from .pretrained import HFMoEBlock, from_pretrained, save_pretrained

__all__ = [
    "HFCausalLM",
    "HFMoEBlock",
    "copy_to_hf_block",
    "from_hf_block",
    "from_pretrained",
    "generate",
    "moe_outputs",
    "save_pretrained",
]
