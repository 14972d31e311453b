"""Kernel tests: without CUDA, Triton kernels run in Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before the kernel modules are imported (``@triton.jit``
decides at decoration time); ``kernels`` imports them lazily, on the first Triton call.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
