"""Choosing a backend: Triton on CUDA tensors (or under ``TRITON_INTERPRET=1``), torch otherwise."""

from __future__ import annotations

import os
from typing import Literal

import torch

from kernels.errors import BackendUnavailableError, KernelInputError

__all__ = ["resolve_backend", "interpreting"]


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1`` in the environment)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> Literal["triton", "torch"]:
    """``"auto"`` picks Triton on CUDA and torch elsewhere; ``"triton"`` on CPU needs the
    interpreter."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if device.type != "cuda" and not interpreting():
            raise BackendUnavailableError(
                "triton", f"tensors are on {device} and TRITON_INTERPRET=1 is not set"
            )
        return "triton"
    raise KernelInputError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
