"""Tensor assertions whose messages say what differed and by how much (on any rank, in any process)."""

from __future__ import annotations

import torch


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 2e-5) -> None:
    """allclose with rtol = atol = tol."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    if not torch.allclose(got, want, rtol=tol, atol=tol):
        raise AssertionError(f"{name}: max |diff| {(got - want).abs().max().item():.3g} over tol {tol}")


def assert_equal(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Bitwise equal: same shape, dtype and values."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} vs {want.dtype}"
    if not torch.equal(got, want):
        diff = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
        raise AssertionError(f"{name}: not bitwise equal (max |diff| {diff:.3g})")
