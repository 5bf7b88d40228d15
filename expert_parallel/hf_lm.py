"""Compatibility: `HFCausalLM` and `moe_outputs` live in expert_parallel.hf (hf/lm.py)."""

from .hf.lm import HFCausalLM, moe_outputs

__all__ = ["HFCausalLM", "moe_outputs"]
