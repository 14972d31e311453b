"""Error bounds for implementations checked against the float64 spec, stated once.

The measure is the relative Frobenius error ``||out - ref||_F / ||ref||_F`` over the whole output.
Where ``||ref||_F = 0`` (every row fully masked, or zero values) the absolute norm
``||out||_F`` is used instead, so an all-zero reference must be met to the same bound in absolute
terms. A NaN or infinity anywhere (in ``out`` or ``ref``) gives ``inf``: it never passes.

Bounds per dtype of the implementation's inputs and output: float32 ``1e-5`` (with IEEE fp32 dot
products, not TF32), float16 ``2e-3``, bfloat16 ``1e-2``.

>>> import numpy as np
>>> ref = np.array([3.0, 4.0])
>>> relative_error(ref + [0.0, 5e-3], ref)
0.001
>>> out = ref + [0.0, 5e-3]
>>> within_tolerance(out, ref, "float16"), within_tolerance(out, ref, "float32")
(True, False)
>>> relative_error([np.nan, 4.0], ref)
inf
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
from numpy.typing import ArrayLike

from spec.attention import AttentionShapeError

TOLERANCES: Mapping[str, float] = MappingProxyType(
    {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
)


def relative_error(out: ArrayLike, ref: ArrayLike) -> float:
    """``||out - ref||_F / ||ref||_F`` (``||out - ref||_F`` when ``ref`` is 0); ``inf`` on NaN/inf.

    Both must have one shape. Convert torch tensors first (``t.float().cpu().numpy()``: numpy has
    no bfloat16).
    """
    o = np.asarray(out, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if o.shape != r.shape:
        raise AttentionShapeError("out and ref shapes differ", out=o.shape, ref=r.shape)
    if not (np.all(np.isfinite(o)) and np.all(np.isfinite(r))):
        return math.inf
    diff = float(np.linalg.norm((o - r).ravel()))
    norm = float(np.linalg.norm(r.ravel()))
    return diff / norm if norm > 0.0 else diff


def within_tolerance(out: ArrayLike, ref: ArrayLike, dtype_name: str) -> bool:
    """Whether ``out`` meets ``ref`` within ``TOLERANCES[dtype_name]``."""
    if dtype_name not in TOLERANCES:
        raise AttentionShapeError(
            "no tolerance for this dtype", dtype_name=dtype_name, known=sorted(TOLERANCES)
        )
    return relative_error(out, ref) <= TOLERANCES[dtype_name]
