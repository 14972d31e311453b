"""Paged-attention test cases: shapes drawn by hypothesis, tensors built with poison around them.

A case is described by a frozen :class:`AttentionCase` (sizes, lengths, dtype, seed) and turned
into tensors by :func:`build_case`. The K/V pool holds the used blocks at permuted ids; every
other block, and every row of a last page past its sequence's length, is NaN, so a kernel that
reads a wrong block or an unmasked row fails (NaN never passes the tolerance). With
``high_block_ids`` the used blocks sit above the id at which ``id * block_stride`` passes 2^31
elements, which catches 32-bit offset arithmetic (several GB of pool: GPU only). The spec sees a
compact float64 copy holding only the used blocks.

An fp8 case (``kv_cache_dtype`` ``"fp8_e4m3"`` or ``"fp8_e5m2"``, :func:`fp8_attention_cases`)
draws float32 K/V of magnitude ``2^kv_exponent``, calibrates scales on them (per tensor, or per
KV head), multiplies them by ``scale_factor`` (below 1: the largest values saturate), and stores
the spec's codes (``spec.kv_quant.quantize``, exact in fp8) in a ``torch.float8_*`` pool, poisoned
with fp8 NaN as above. The spec reads the codes with the scales; the unquantized K/V are kept
for the error bound (``spec.kv_quant_bound``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from hypothesis import strategies as st
from numpy.typing import NDArray

__all__ = [
    "AttentionCase",
    "BuiltCase",
    "build_case",
    "attention_cases",
    "CPU_LIMITS",
    "GPU_LIMITS",
    "GPU_PREFILL_LIMITS",
    "CaseLimits",
    "ALL_HEAD_DIMS",
    "INTERPRETER_GENERAL_LIMITS",
    "GPU_GENERAL_LIMITS",
    "GPU_GENERAL_PREFILL_LIMITS",
    "fp8_attention_cases",
    "FP8_TORCH_DTYPES",
]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: kv_cache_dtype -> the torch dtype of the pool.
FP8_TORCH_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class AttentionCase:
    """One paged-attention problem. ``q_lens`` None means decode (one query per sequence)."""

    num_kv_heads: int
    group: int  # query heads per KV head (GQA ratio)
    head_dim: int
    block_size: int
    seq_lens: tuple[int, ...]
    q_lens: tuple[int, ...] | None
    dtype: str
    sliding_window: int | None = None
    softcap: float | None = None
    high_block_ids: bool = False
    seed: int = 0
    kv_cache_dtype: str = "auto"  # or "fp8_e4m3" / "fp8_e5m2": an fp8 pool (module docstring)
    per_head_scales: bool = False
    scale_factor: float = 1.0  # times the calibrated scales; < 1 saturates the largest values
    kv_exponent: int = 0  # fp8: K/V drawn as randn * 2^kv_exponent

    @property
    def fp8(self) -> bool:
        """Whether the pool is fp8."""
        return self.kv_cache_dtype != "auto"

    @property
    def num_q_heads(self) -> int:
        """Hq = Hkv * G."""
        return self.num_kv_heads * self.group

    @property
    def scale(self) -> float:
        """The usual 1 / sqrt(head_dim)."""
        return 1.0 / math.sqrt(self.head_dim)


@dataclass
class BuiltCase:
    """Tensors of a case (on one device) and the compact float64 view the spec reads."""

    case: AttentionCase
    q: torch.Tensor  # decode [B, Hq, D]; prefill [T, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, bs, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, W] int32
    seq_lens: torch.Tensor  # [B] int32
    cu_seqlens_q: torch.Tensor  # [B+1] int32 (decode: arange)
    spec_q: NDArray[np.float64] = field(repr=False)
    spec_k: NDArray[np.float64] = field(repr=False)  # [used, bs, Hkv, D]
    spec_v: NDArray[np.float64] = field(repr=False)
    spec_tables: NDArray[np.int64] = field(repr=False)  # [B, W] into the compact pool
    k_scale: NDArray[np.float64] | None = field(default=None, repr=False)  # fp8: [Hkv]
    v_scale: NDArray[np.float64] | None = field(default=None, repr=False)
    raw_k: NDArray[np.float64] | None = field(
        default=None, repr=False
    )  # fp8: unquantized, as spec_k
    raw_v: NDArray[np.float64] | None = field(default=None, repr=False)


def build_case(case: AttentionCase, device: str | torch.device = "cpu") -> BuiltCase:
    """Tensors for ``case`` on ``device``; see the module docstring for the poison layout."""
    gen = torch.Generator().manual_seed(case.seed)
    rng = np.random.default_rng(case.seed)
    dt = _DTYPES[case.dtype]
    bs, hkv, d = case.block_size, case.num_kv_heads, case.head_dim
    nblk = [-(-n // bs) for n in case.seq_lens]
    used = sum(nblk)
    width = max(nblk, default=0) + 1  # one padding column past the longest table
    compact_k = torch.randn(used, bs, hkv, d, generator=gen).to(dt)
    compact_v = torch.randn(used, bs, hkv, d, generator=gen).to(dt)
    if case.fp8:
        scales, raw, compact_k, compact_v = _quantized(case, compact_k, compact_v)
        dt = FP8_TORCH_DTYPES[case.kv_cache_dtype]
    order = rng.permutation(used)  # logical block i of the batch -> compact block order[i]
    spec_tables = np.zeros((len(case.seq_lens), width), dtype=np.int64)
    i = 0
    for b, n in enumerate(nblk):
        spec_tables[b, :n] = order[i : i + n]
        spec_tables[b, n:] = -7 if n else 0  # padding entries are never read
        i += n
        tail = case.seq_lens[b] % bs
        if n and tail:  # rows past the length in the last page: poison
            last = int(spec_tables[b, n - 1])
            compact_k[last, tail:] = float("nan")
            compact_v[last, tail:] = float("nan")
    spec_k = np.nan_to_num(compact_k.double().numpy(), nan=0.0)  # fp8: the codes
    spec_v = np.nan_to_num(compact_v.double().numpy(), nan=0.0)
    stride = bs * hkv * d
    base = -(-(2**31) // stride) if case.high_block_ids else int(rng.integers(0, 4))
    spare = 3
    num_blocks = base + used + spare
    spread = rng.permutation(used + spare)[:used]  # compact block c -> pool id base + spread[c]
    ids = torch.as_tensor(base + spread, device=device)
    if case.fp8:  # built as bytes: 0x7F is NaN in both fp8 formats
        shape = (num_blocks, bs, hkv, d)
        k_cache = torch.full(shape, 0x7F, dtype=torch.uint8, device=device)
        v_cache = torch.full_like(k_cache, 0x7F)
        if used:
            k_cache[ids] = compact_k.view(torch.uint8).to(device)
            v_cache[ids] = compact_v.view(torch.uint8).to(device)
        k_cache, v_cache = k_cache.view(dt), v_cache.view(dt)
    else:
        k_cache = torch.full((num_blocks, bs, hkv, d), float("nan"), dtype=dt, device=device)
        v_cache = torch.full_like(k_cache, float("nan"))
        if used:
            k_cache[ids] = compact_k.to(device)
            v_cache[ids] = compact_v.to(device)
    pool_tables = np.full_like(spec_tables, -7)
    if used:
        pool_tables = np.where(
            spec_tables >= 0, base + spread[np.clip(spec_tables, 0, used - 1)], -7
        )
    lens = torch.tensor(case.seq_lens, dtype=torch.int32, device=device)
    if case.q_lens is None:
        tokens = len(case.seq_lens)
        cu = torch.arange(tokens + 1, dtype=torch.int32, device=device)
    else:
        tokens = sum(case.q_lens)
        cu = torch.tensor(
            np.concatenate([[0], np.cumsum(case.q_lens)]), dtype=torch.int32, device=device
        )
    q = torch.randn(tokens, case.num_q_heads, d, generator=gen).to(_DTYPES[case.dtype])
    extra = {}
    if case.fp8:
        extra = {"k_scale": scales[0], "v_scale": scales[1], "raw_k": raw[0], "raw_v": raw[1]}
    return BuiltCase(
        case=case,
        q=q.to(device),
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=torch.tensor(pool_tables, dtype=torch.int32, device=device),
        seq_lens=lens,
        cu_seqlens_q=cu,
        spec_q=q.double().numpy(),
        spec_k=spec_k,
        spec_v=spec_v,
        spec_tables=np.clip(spec_tables, 0, None),
        **extra,
    )


def _quantized(
    case: AttentionCase, k: torch.Tensor, v: torch.Tensor
) -> tuple[
    tuple[NDArray[np.float64], NDArray[np.float64]],
    tuple[NDArray[np.float64], NDArray[np.float64]],
    torch.Tensor,
    torch.Tensor,
]:
    """((k_scale, v_scale) [Hkv], (raw k, raw v) float64, fp8 codes of k, v) of a compact pool.

    k, v [used, bs, Hkv, D] from randn; scaled by ``2^kv_exponent`` (float32) before quantizing.
    """
    from spec.kv_quant import calibrated_scales, quantize

    name = case.kv_cache_dtype
    fp8 = FP8_TORCH_DTYPES[name]
    mag = 2.0**case.kv_exponent
    raw = [(x.float() * mag).double().numpy() for x in (k, v)]  # [used, bs, Hkv, D]
    scales, codes = [], []
    for x in raw:
        rows = x.reshape(-1, *x.shape[2:])  # [used * bs, Hkv, D]
        s = calibrated_scales(rows, name, case.per_head_scales) * case.scale_factor
        s = s.astype(np.float32).astype(np.float64)  # the kernels take float32 scales
        scales.append(s)
        codes.append(torch.from_numpy(quantize(x, s, name)).to(fp8))  # exact: on the grid
    return (scales[0], scales[1]), (raw[0], raw[1]), codes[0], codes[1]


@dataclass(frozen=True)
class CaseLimits:
    """Bounds on what :func:`attention_cases` draws (small on CPU, larger on a GPU)."""

    max_batch: int
    max_len: int
    head_dims: tuple[int, ...]
    block_sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    kv_heads: tuple[int, ...]
    groups: tuple[int, ...] = (1, 4, 5, 8)
    high_ids: bool = False


CPU_LIMITS = CaseLimits(
    max_batch=3,
    max_len=70,
    head_dims=(64, 128, 256),
    block_sizes=(8, 16, 32, 64, 128, 256),
    dtypes=("float32", "float16", "bfloat16"),
    kv_heads=(1, 2),
)
GPU_LIMITS = CaseLimits(
    max_batch=8,
    max_len=3000,
    head_dims=(64, 128, 256),
    block_sizes=(8, 16, 32, 64, 128, 256),
    dtypes=("float32", "float16", "bfloat16"),
    kv_heads=(1, 2, 8),
    high_ids=True,
)
#: Prefill on a GPU: shorter, since the float64 spec costs O(q_len * seq_len) per head on the CPU.
GPU_PREFILL_LIMITS = CaseLimits(
    max_batch=4,
    max_len=700,
    head_dims=(64, 128, 256),
    block_sizes=(8, 16, 32, 64, 128, 256),
    dtypes=("float32", "float16", "bfloat16"),
    kv_heads=(1, 2, 8),
    high_ids=True,
)


@st.composite
def attention_cases(
    draw: st.DrawFn, limits: CaseLimits = CPU_LIMITS, prefill: bool = False
) -> AttentionCase:
    """Hypothesis strategy over :class:`AttentionCase` within ``limits``."""
    batch = draw(st.integers(1, limits.max_batch))
    min_len = 1 if prefill else 0
    lens = tuple(
        draw(st.lists(st.integers(min_len, limits.max_len), min_size=batch, max_size=batch))
    )
    q_lens = None
    if prefill:
        q_lens = tuple(draw(st.integers(1, n)) if n else 0 for n in lens)
    window = draw(st.one_of(st.none(), st.integers(1, max(1, limits.max_len // 2))))
    softcap = draw(st.one_of(st.none(), st.sampled_from([1.0, 5.0, 30.0])))
    return AttentionCase(
        num_kv_heads=draw(st.sampled_from(limits.kv_heads)),
        group=draw(st.sampled_from(limits.groups)),
        head_dim=draw(st.sampled_from(limits.head_dims)),
        block_size=draw(st.sampled_from(limits.block_sizes)),
        seq_lens=lens,
        q_lens=q_lens,
        dtype=draw(st.sampled_from(limits.dtypes)),
        sliding_window=window,
        softcap=softcap,
        high_block_ids=limits.high_ids and draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


#: Every head dim the Triton kernels take: the multiples of 16 from 32 to 256.
ALL_HEAD_DIMS = tuple(range(32, 257, 16))
#: Head dims that are not powers of two and page sizes below 8, under the Triton interpreter (CI):
#: a few short sequences, since the interpreter runs each program in numpy.
INTERPRETER_GENERAL_LIMITS = CaseLimits(
    max_batch=2,
    max_len=24,
    head_dims=(32, 48, 80, 96, 112, 160, 192),
    block_sizes=(1, 2, 4),
    dtypes=("float32", "float16", "bfloat16"),
    kv_heads=(1, 2),
)
#: Every head dim and page sizes 1 to 256 on a GPU, pools past 2^31 elements included.
GPU_GENERAL_LIMITS = CaseLimits(
    max_batch=8,
    max_len=2000,
    head_dims=ALL_HEAD_DIMS,
    block_sizes=(1, 2, 4, 8, 16, 64, 256),
    dtypes=("float32", "float16", "bfloat16"),
    kv_heads=(1, 2, 8),
    high_ids=True,
)
#: Prefill counterpart of :data:`GPU_GENERAL_LIMITS` (shorter: the float64 spec runs on the CPU).
GPU_GENERAL_PREFILL_LIMITS = CaseLimits(
    max_batch=4,
    max_len=500,
    head_dims=ALL_HEAD_DIMS,
    block_sizes=(1, 2, 4, 8, 16, 64, 256),
    dtypes=("float32", "float16", "bfloat16"),
    kv_heads=(1, 2, 8),
    high_ids=True,
)


@st.composite
def fp8_attention_cases(
    draw: st.DrawFn,
    limits: CaseLimits = CPU_LIMITS,
    prefill: bool = False,
    kv_cache_dtypes: tuple[str, ...] = ("fp8_e4m3", "fp8_e5m2"),
) -> AttentionCase:
    """:func:`attention_cases` over an fp8 pool: format, scale granularity, magnitude, and
    scales at or below calibration."""
    case = draw(attention_cases(limits, prefill=prefill))
    return dataclasses.replace(
        case,
        kv_cache_dtype=draw(st.sampled_from(kv_cache_dtypes)),
        per_head_scales=draw(st.booleans()),
        scale_factor=draw(st.sampled_from([1.0, 1.0, 0.25])),
        kv_exponent=draw(st.integers(-6, 6)),
    )
