# mypy: disable-error-code="no-untyped-def,untyped-decorator"
"""Triton paged prefill: variable-length chunks after cached prefixes, one launch.

Grid ``(P, Hkv)`` with ``P = T // TOK_M + B``. Sequence ``b`` owns programs
``[cu_q[b] // TOK_M + b, cu_q[b+1] // TOK_M + b + 1)``: at least ``ceil(q_len_b / TOK_M)`` of
them, since ``floor((a + n) / m) - floor(a / m) + 1 >= ceil(n / m)``. A program finds its
sequence by binary search over ``cu_seqlens_q`` itself, so the tile map costs no extra launch and
no host synchronisation; a program past its sequence's last tile does nothing. Programs run in
reverse order so the long causal tiles (late in a sequence) start first. A program packs
``TOK_M = BLOCK_M // G`` query tokens times the ``G`` query heads of one KV head into ``BLOCK_M``
rows (row ``r``: token ``r // G``, head ``r % G``), so each K/V tile is loaded once for all heads
sharing it. Query ``i`` of sequence ``b`` sits at position ``seq_len - q_len + i`` (bottom-right
causal). The visible key range of the tile is cut into a masked head (sliding window), an
unmasked middle whose tiles every row sees whole, and a masked tail (the causal diagonal); only
the two ends pay for masks. Key ``n`` is read from page ``block_table[n // PAGE]`` row
``n % PAGE``, so any page size from 1 works (a tile spans ``BLOCK_N / PAGE`` pages). A head dim
``D`` that is not a power of two is tiled as ``BLOCK_D = next_pow2(D)`` columns; loads and stores
are masked by ``col < D`` (``other=0``, even in the otherwise unmasked middle), so padded lanes
add 0 to the logits and are never written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting
from kernels.checks import AttentionDims
from kernels.triton_common import (
    check_inner_contiguous,
    check_triton_dims,
    dot_config,
    next_pow2,
    padded_head_dim,
)
from kernels.triton_launch import FastLaunch

__all__ = ["triton_paged_prefill", "prefill_config", "search_steps"]

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def _attend(
    acc,
    l_i,
    m_i,
    q,
    k_ptr,
    v_ptr,
    bt_row,
    head_off,
    stride_kb,
    pos,
    start,
    end,
    scale_log2,
    softcap,
    window,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    FP8: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_D)  # [BLOCK_D] head-dim lanes, >= D
    col_ok = cols < D
    for tile in range(start, end, BLOCK_N):
        n = tile + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        if MASKED:
            ok = n < end
            page = tl.load(bt_row + n // PAGE, mask=ok, other=0).to(tl.int64)
        else:
            page = tl.load(bt_row + n // PAGE).to(tl.int64)
        kv_off = page * stride_kb + (n % PAGE).to(tl.int64) * (HKV * D) + head_off  # int64
        kv_ptrs = kv_off[:, None] + cols[None, :]  # [BLOCK_N, BLOCK_D]
        if MASKED:
            if BLOCK_D == D:
                kv_mask = ok[:, None]
            else:
                kv_mask = ok[:, None] & col_ok[None, :]
            k = tl.load(k_ptr + kv_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_ptrs, mask=kv_mask, other=0.0)
        elif BLOCK_D == D:
            k = tl.load(k_ptr + kv_ptrs)
            v = tl.load(v_ptr + kv_ptrs)
        else:
            k = tl.load(k_ptr + kv_ptrs, mask=col_ok[None, :], other=0.0)
            v = tl.load(v_ptr + kv_ptrs, mask=col_ok[None, :], other=0.0)
        if FP8:  # fp8 codes -> q's dtype, exactly; the scales are applied outside the loop
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        if HAS_SOFTCAP:
            y = s * (scale_log2 / (_LOG2E * softcap))
            s = softcap * _LOG2E * (1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))
        else:
            s = s * scale_log2
        if MASKED:
            seen = (n[None, :] <= pos[:, None]) & ok[None, :]
            if HAS_WINDOW:
                seen = seen & (n[None, :] > pos[:, None] - window)
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = p.to(v.dtype)
        if DOT_F32:
            pv = pv.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["stride_btb", "batch", "window"])
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    bt_ptr,
    lens_ptr,
    cu_ptr,
    ks_ptr,
    vs_ptr,
    stride_kb,
    stride_btb,
    batch,
    scale_log2,
    softcap,
    window,
    HKV: tl.constexpr,
    G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TOK_M: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SEARCH: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    FP8: tl.constexpr,
):
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)
    lo_b = 0  # largest b with cu[b] // TOK_M + b <= pid, by binary search
    hi_b = batch
    for _ in tl.static_range(SEARCH):
        mid = (lo_b + hi_b) // 2
        go_right = tl.load(cu_ptr + mid) // TOK_M + mid <= pid
        lo_b = tl.where(go_right, mid, lo_b)
        hi_b = tl.where(go_right, hi_b, mid)
    seq = lo_b
    q_start = tl.load(cu_ptr + seq)
    n_q = tl.load(cu_ptr + seq + 1) - q_start
    t = pid - (q_start // TOK_M + seq)  # tile index within the sequence
    if t * TOK_M < n_q:
        seq_len = tl.load(lens_ptr + seq)
        ctx = seq_len - n_q  # cached keys before this chunk

        r = tl.arange(0, BLOCK_M)
        tok = t * TOK_M + r // G  # [BLOCK_M] token index within the chunk
        head = kvh * G + r % G  # [BLOCK_M] query head
        row_ok = (r < TOK_M * G) & (tok < n_q)
        pos = ctx + tok  # absolute positions
        cols = tl.arange(0, BLOCK_D)  # [BLOCK_D] head-dim lanes, >= D
        if BLOCK_D == D:
            qo_mask = row_ok[:, None]  # [BLOCK_M, 1]
        else:
            qo_mask = row_ok[:, None] & (cols[None, :] < D)  # [BLOCK_M, BLOCK_D]
        qo_off = ((q_start + tok).to(tl.int64) * (HKV * G) + head) * D  # q, out [T, Hq, D]
        q = tl.load(q_ptr + qo_off[:, None] + cols[None, :], mask=qo_mask, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        if FP8:  # one KV head per program: its k scale joins the logit scale
            scale_log2 = scale_log2 * tl.load(ks_ptr + kvh)

        min_pos = ctx + t * TOK_M
        max_pos = ctx + tl.minimum(n_q, (t + 1) * TOK_M) - 1
        hi = max_pos + 1  # keys [lo, hi) are seen by some row
        lo = 0
        full_lo = 0  # keys [full_lo, min_pos] are seen by every row
        if HAS_WINDOW:
            lo = tl.maximum(min_pos - window + 1, 0)
            full_lo = tl.maximum(max_pos - window + 1, 0)
        a = lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_N) * BLOCK_N
        a = tl.minimum(a, hi)
        b = a + (tl.maximum(min_pos + 1 - a, 0) // BLOCK_N) * BLOCK_N

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        bt_row = bt_ptr + seq.to(tl.int64) * stride_btb  # type: ignore[attr-defined]
        head_off = kvh.to(tl.int64) * D
        acc, l_i, m_i = _attend(
            acc,
            l_i,
            m_i,
            q,
            k_ptr,
            v_ptr,
            bt_row,
            head_off,
            stride_kb,
            pos,
            lo,
            a,
            scale_log2,
            softcap,
            window,
            HKV,
            D,
            BLOCK_D,
            PAGE,
            BLOCK_N,
            True,
            HAS_WINDOW,
            HAS_SOFTCAP,
            PRECISION,
            DOT_F32,
            FP8,
        )
        acc, l_i, m_i = _attend(
            acc,
            l_i,
            m_i,
            q,
            k_ptr,
            v_ptr,
            bt_row,
            head_off,
            stride_kb,
            pos,
            a,
            b,
            scale_log2,
            softcap,
            window,
            HKV,
            D,
            BLOCK_D,
            PAGE,
            BLOCK_N,
            False,
            HAS_WINDOW,
            HAS_SOFTCAP,
            PRECISION,
            DOT_F32,
            FP8,
        )
        acc, l_i, m_i = _attend(
            acc,
            l_i,
            m_i,
            q,
            k_ptr,
            v_ptr,
            bt_row,
            head_off,
            stride_kb,
            pos,
            b,
            hi,
            scale_log2,
            softcap,
            window,
            HKV,
            D,
            BLOCK_D,
            PAGE,
            BLOCK_N,
            True,
            HAS_WINDOW,
            HAS_SOFTCAP,
            PRECISION,
            DOT_F32,
            FP8,
        )
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        if FP8:
            o = o * tl.load(vs_ptr + kvh)
        tl.store(
            o_ptr + qo_off[:, None] + cols[None, :],
            o.to(o_ptr.dtype.element_ty),
            mask=qo_mask,
        )


_PREFILL = FastLaunch(_prefill_kernel)


def prefill_config(head_dim: int, dtype: torch.dtype, group: int) -> tuple[int, int, int, int]:
    """(BLOCK_M rows, BLOCK_N keys, num_warps, num_stages) for a head dim, dtype and GQA ratio.

    Tuned on an H200 for 64, 128 and 256; other dims take the config of their padded tile width
    (next power of two), which sets the registers and shared memory per program.
    """
    if interpreting():
        return max(16, next_pow2(group)), 16, 1, 1
    width = padded_head_dim(head_dim)
    if dtype == torch.float32:
        rows, block_n, warps, stages = (64, 32, 4, 2) if width <= 128 else (32, 32, 4, 1)
    elif width <= 128:  # H200 sweep: 341 TFLOP/s causal 4k (128x64: 282, 256x64: 318)
        rows, block_n, warps, stages = 128, 128, 8, 3
    else:
        rows, block_n, warps, stages = 64, 32, 4, 2
    return max(rows, next_pow2(group)), block_n, warps, stages


def search_steps(batch: int) -> int:
    """Binary-search steps for ``batch`` sequences, bucketed so the constexpr rarely changes.

    Extra steps are harmless (the search has converged), so every batch below 256 shares one
    compiled kernel instead of one per ``batch.bit_length()`` (an engine's prefill batch size
    varies from step to step, and each new value cost a Triton compile in the middle of a run).
    """
    return max(8, batch.bit_length())


def triton_paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    dims: AttentionDims,
    *,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    out: torch.Tensor | None,
    config: tuple[int, int, int, int] | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Launch the prefill kernel. Shapes as ``kernels.paged_prefill``; ``kv_scales``: the
    ``[Hkv]`` float32 (k_scale, v_scale) of an fp8 cache (None otherwise)."""
    check_triton_dims(dims, q.dtype)
    t, hq, d = q.shape
    if out is None:
        out = torch.empty_like(q)
    if t == 0 or dims.batch == 0:
        return out
    check_inner_contiguous(k_cache)
    result = out if out is not None and out.is_contiguous() else torch.empty_like(q)
    q = q.contiguous()
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    g = dims.group
    rows, block_n, warps, stages = config or prefill_config(d, q.dtype, g)
    tok_m = rows // g
    precision, dot_f32 = dot_config(q.dtype)
    _PREFILL(
        (t // tok_m + dims.batch, dims.num_kv_heads, 1),
        q,
        k_cache,
        v_cache,
        result,
        block_tables,
        seq_lens,
        cu_seqlens_q,
        kv_scales[0] if kv_scales is not None else seq_lens,
        kv_scales[1] if kv_scales is not None else seq_lens,
        k_cache.stride(0),
        block_tables.stride(0),
        dims.batch,
        scale * LOG2E,
        float(softcap or 1.0),
        int(sliding_window or 0),
        HKV=dims.num_kv_heads,
        G=g,
        BLOCK_M=rows,
        TOK_M=tok_m,
        D=d,
        BLOCK_D=padded_head_dim(d),
        PAGE=dims.block_size,
        BLOCK_N=block_n,
        SEARCH=search_steps(dims.batch),
        HAS_WINDOW=sliding_window is not None,
        HAS_SOFTCAP=softcap is not None,
        PRECISION=precision,
        DOT_F32=dot_f32,
        FP8=kv_scales is not None,
        num_warps=warps,
        num_stages=stages,
    )
    if out is not None and result is not out:
        out.copy_(result)
        return out
    return result
