"""Compatibility: `generate` lives in expert_parallel.hf (hf/generation.py)."""

from .hf.generation import generate

__all__ = ["generate"]
