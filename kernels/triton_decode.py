# mypy: disable-error-code="no-untyped-def,untyped-decorator"
"""Triton paged decode: flash-decoding with all query heads of a KV head in one program.

Grid ``(B, Hkv, S)``. Program ``(b, h, s)`` loads the ``G = Hq / Hkv`` query heads that share KV
head ``h`` as one ``[G_PAD, D]`` tile (``G_PAD >= 16`` rows, padding rows zero) so that both
products run on the tensor cores: ``[G_PAD, D] x [D, BLOCK_N]`` for the logits and
``[G_PAD, BLOCK_N] x [BLOCK_N, D]`` for the values. It walks split ``s`` of the visible keys in
tiles of ``BLOCK_N`` tokens; token ``n`` is read from page ``block_table[b, n // PAGE]`` row
``n % PAGE``, with the element offset formed in int64 (block ids times the block stride pass
2^31 on large pools). With ``S == 1`` the program writes the normalised output directly;
otherwise it writes a partial ``(o, lse)`` and ``_merge_kernel`` combines the ``S`` states:
``o = sum_j w_j o_j / sum_j w_j`` with ``w_j = 2^(lse_j - max lse)`` (base-2 log-sum-exp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting
from kernels.checks import AttentionDims
from kernels.splits import choose_num_splits
from kernels.triton_common import check_triton_dims, dot_config, next_pow2

__all__ = ["triton_paged_decode", "decode_config"]

LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_btb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    scale_log2, softcap, window, num_splits,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    n_tiles = tl.cdiv(seq_len - lo, BLOCK_N)
    tiles_per_split = tl.cdiv(n_tiles, num_splits)
    start = lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(seq_len, start + tiles_per_split * BLOCK_N)

    rows = tl.arange(0, G_PAD)  # [G_PAD] query heads of this KV head
    cols = tl.arange(0, D)  # [D]
    row_ok = rows < G
    q_off = b.to(tl.int64) * stride_qb + (kvh * G + rows).to(tl.int64)[:, None] * stride_qh
    q = tl.load(q_ptr + q_off + cols[None, :], mask=row_ok[:, None], other=0.0)  # [G_PAD, D]
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    head_off = kvh.to(tl.int64) * stride_kh
    for tile in range(start, end, BLOCK_N):
        n = tile + tl.arange(0, BLOCK_N)  # [BLOCK_N] token positions
        ok = n < end
        page = tl.load(bt_row + n // PAGE, mask=ok, other=0).to(tl.int64)
        kv_off = page * stride_kb + (n % PAGE).to(tl.int64) * stride_kt + head_off  # int64
        k = tl.load(k_ptr + kv_off[:, None] + cols[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off[:, None] + cols[None, :], mask=ok[:, None], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [G_PAD, BLOCK_N] fp32
        if HAS_SOFTCAP:
            # c * tanh(x / c) with tanh(y) = 1 - 2 / (exp(2y) + 1); scale_log2 = scale * log2(e)
            y = s * (scale_log2 / (LOG2E * softcap))
            s = softcap * LOG2E * (1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))
        else:
            s = s * scale_log2
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds a visible key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [G_PAD, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = p.to(v.dtype)
        if DOT_F32:
            pv = pv.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=PRECISION)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # empty split: l = 0, acc = 0 -> 0
    o_off = b.to(tl.int64) * stride_ob + (kvh * G + rows).to(tl.int64)[:, None] * stride_oh
    if DIRECT:
        tl.store(o_ptr + o_off + cols[None, :], o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        o_off += split.to(tl.int64) * stride_os
        tl.store(o_ptr + o_off + cols[None, :], o, mask=row_ok[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        lse_off = b * stride_lb + (kvh * G + rows) * stride_lh + split
        tl.store(lse_ptr + lse_off, lse, mask=row_ok)


@triton.jit
def _merge_kernel(
    part_ptr, lse_ptr, o_ptr,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    num_splits,
    D: tl.constexpr, S_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, S_PAD)
    cols = tl.arange(0, D)
    ok = sp < num_splits
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + sp, mask=ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # [S_PAD]; empty splits weigh 0
    part_off = b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph + sp[:, None] * stride_ps
    parts = tl.load(part_ptr + part_off + cols[None, :], mask=ok[:, None], other=0.0)
    total = tl.sum(w, 0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # [D]
    o_off = b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_ptr + o_off + cols, o.to(o_ptr.dtype.element_ty))


def decode_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for a head dim and dtype."""
    if interpreting():
        return 16, 1, 1
    if dtype == torch.float32:
        return (32, 4, 2) if head_dim <= 128 else (16, 4, 2)
    return (64, 4, 3) if head_dim <= 128 else (32, 4, 2)


def triton_paged_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, dims: AttentionDims, *, scale: float, sliding_window: int | None,
    softcap: float | None, num_splits: int | None, out: torch.Tensor | None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Launch the decode kernel (and the merge when split). Shapes as ``kernels.paged_decode``;
    ``config`` overrides (BLOCK_N, num_warps, num_stages) for tuning."""
    check_triton_dims(dims, q.dtype)
    batch, hq, d = q.shape
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    g = dims.group
    g_pad = max(16, next_pow2(g))
    block_n, warps, stages = config or decode_config(d, q.dtype)
    if num_splits is None:
        sms = 132
        if q.is_cuda:
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        num_splits = choose_num_splits(
            batch, dims.num_kv_heads, dims.max_blocks * dims.block_size, num_sms=sms
        )
    num_splits = max(1, int(num_splits))
    precision, dot_f32 = dot_config(q.dtype)
    direct = num_splits == 1
    if direct:
        part, lse = out, out  # lse unused
        part_strides = (out.stride(0), out.stride(1), 0)
        lse_strides = (0, 0)
    else:
        part = torch.empty(batch, hq, num_splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, hq, num_splits, dtype=torch.float32, device=q.device)
        part_strides = (part.stride(0), part.stride(1), part.stride(2))
        lse_strides = (lse.stride(0), lse.stride(1))
    grid = (batch, dims.num_kv_heads, num_splits)
    _decode_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, part, lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        *part_strides, *lse_strides,
        scale * LOG2E, float(softcap or 1.0), int(sliding_window or 0), num_splits,
        G=g, G_PAD=g_pad, D=d, PAGE=dims.block_size, BLOCK_N=block_n, DIRECT=direct,
        HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=softcap is not None,
        PRECISION=precision, DOT_F32=dot_f32, num_warps=warps, num_stages=stages,
    )
    if not direct:
        _merge_kernel[(batch, hq)](
            part, lse, out,
            part.stride(0), part.stride(1), part.stride(2),
            lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            num_splits, D=d, S_PAD=max(2, next_pow2(num_splits)), num_warps=4 if d >= 128 else 2,
        )
    return out
