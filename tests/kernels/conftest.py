"""Kernel tests: without CUDA, Triton kernels run in Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before the kernel modules are imported (``@triton.jit``
decides at decoration time); ``kernels`` imports them lazily, on the first Triton call.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # triton.language's own @jit helpers (tl.cdiv...) were created for the compiler; an
        # interpreted kernel calling them fails with "Cannot call @triton.jit'd outside of the
        # scope of a kernel". Name the cause instead.
        raise RuntimeError(
            "triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1 "
            "(a test module collected earlier imports it at module level: import it inside the "
            "test or a fixture, or run pytest with TRITON_INTERPRET=1)"
        )
    os.environ.setdefault("TRITON_INTERPRET", "1")
