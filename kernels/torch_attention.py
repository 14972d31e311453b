"""Torch fallbacks for paged attention: plain gathers and softmax, used where there is no GPU.

The math follows ARCHITECTURE.md: logits ``s = scale * q.k``, then soft-cap ``c * tanh(s / c)``,
a query at absolute position ``p`` sees key ``j`` iff ``j <= p`` and (with window ``w``)
``j > p - w``; query head ``h`` reads KV head ``h // (Hq // Hkv)``; a row that sees no key
outputs 0. Accumulation is float32 (float64 for float64 inputs). Without a soft-cap the softmax and
value
product run fused in ``F.scaled_dot_product_attention`` (about twice as fast on the CPU as the
explicit ops, which remain for the soft-cap); keys past a length are redirected to the
sequence's first token before the gather so that whatever those rows hold (NaN included) never
reaches the output. Prefill takes SDPA's causal flash path (``is_causal``, no mask) when nothing
is cached, merges two flash calls by log-sum-exp after a cached prefix, and keeps an explicit
mask, a query chunk at a time, only for sliding windows (docs/kernels.md, "The torch fallback").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "torch_paged_decode",
    "torch_paged_prefill",
    "gather_kv",
    "DecodePlan",
    "plan_decode",
    "planned_decode",
    "dequantized_view",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) each [seq_len, Hkv, D]: one sequence's keys and values in logical order.

    k_cache, v_cache [num_blocks, bs, Hkv, D], block_table [W] (entries past
    ``ceil(seq_len / bs)`` are not read). The torch twin of ``spec.kv_cache.gather_kv``, unchecked.
    """
    bs = k_cache.shape[1]
    nblk = -(-seq_len // bs)
    ids = block_table[:nblk].long()
    k = k_cache[ids].reshape(nblk * bs, *k_cache.shape[2:])[:seq_len]  # [seq_len, Hkv, D]
    v = v_cache[ids].reshape(nblk * bs, *v_cache.shape[2:])[:seq_len]
    return k, v


def dequantized_view(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocks an fp8 step reads, dequantized, and the block tables into them.

    caches [nb, bs, Hkv, D] fp8, block_tables [B, W], seq_lens [B], scales [Hkv] float32 ->
    (k, v [B * n, bs, Hkv, D] in the compute dtype, tables [B, n] int32) where ``n`` blocks cover
    the longest sequence: entry ``i`` of row ``b`` is block ``b * n + i``. Entries past a length
    may hold anything; they are clamped to a valid id and never read unmasked.
    """
    cdt = _compute_dtype(q.dtype)
    batch, bs = block_tables.shape[0], k_cache.shape[1]
    max_len = int(seq_lens.max()) if batch else 0
    n = max(1, -(-max_len // bs))
    ids = block_tables[:, :n].long().clamp(0, k_cache.shape[0] - 1).reshape(-1)  # [B * n]
    # gathered as bytes (index_select has no fp8 kernel on every device), then widened
    k = k_cache.view(torch.uint8).index_select(0, ids).view(k_cache.dtype)  # [B*n, bs, Hkv, D]
    v = v_cache.view(torch.uint8).index_select(0, ids).view(v_cache.dtype)
    k = k.to(cdt) * k_scale.to(cdt)[:, None]
    v = v.to(cdt) * v_scale.to(cdt)[:, None]
    tables = torch.arange(batch * n, dtype=torch.int32, device=q.device).view(batch, n)
    return k, v, tables


def _softmax_attend(
    s: torch.Tensor, visible: torch.Tensor, v: torch.Tensor, softcap: float | None
) -> torch.Tensor:
    """Masked softmax then weighted sum.

    s [..., N] scaled logits, visible [..., N] bool (broadcastable), v [..., N, D] -> [..., D]
    """
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)  # masked -> exp(-inf) = 0
    denom = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p, v)
    return torch.where(denom > 0, o / denom.clamp_min(1e-300), torch.zeros_like(o))


def torch_paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """One query per sequence at position ``seq_lens[b] - 1``.

    q [B, Hq, D], caches [nb, bs, Hkv, D], block_tables [B, W], seq_lens [B] -> [B, Hq, D]
    """
    batch, hq, d = q.shape
    nb, bs, hkv, _ = k_cache.shape
    g = hq // hkv
    cdt = _compute_dtype(q.dtype)
    if batch == 0:
        return torch.empty_like(q)
    lens = seq_lens.long()
    max_len = int(lens.max())
    nblk = max(1, -(-max_len // bs))
    if softcap is None:
        return _sdpa_decode(q, k_cache, v_cache, block_tables, lens, scale, sliding_window)
    bt = block_tables[:, :nblk].long().clamp(0, nb - 1)  # entries past a length: any valid id
    ids = bt.reshape(-1)  # [B * nblk]; index_select, as planned_decode gathers
    k = k_cache.index_select(0, ids).view(batch, nblk * bs, hkv, d).to(cdt)  # [B, N, Hkv, D]
    v = v_cache.index_select(0, ids).view(batch, nblk * bs, hkv, d).to(cdt)
    qf = q.to(cdt).reshape(batch, hkv, g, d)  # [B, Hkv, G, D]
    s = torch.einsum("bhgd,bnhd->bhgn", qf, k) * scale  # [B, Hkv, G, N]
    pos = torch.arange(nblk * bs, device=q.device)[None, :]  # [1, N]
    visible = pos < lens[:, None]  # [B, N]
    if sliding_window is not None:
        visible &= pos >= lens[:, None] - sliding_window
    v = v.masked_fill(~visible[:, :, None, None], 0.0)  # rows past a length may hold anything
    o = _softmax_attend(s, visible[:, None, None, :], v.permute(0, 2, 1, 3), softcap)
    return o.reshape(batch, hq, d).to(q.dtype)  # [B, Hkv, G, D] -> [B, Hq, D]


@dataclass(frozen=True)
class DecodePlan:
    """The gather indices and masks of one decode step, shared by every layer of a model.

    They depend only on the block tables, lengths, block size and window, so a model computes
    them once per step (:func:`plan_decode`) instead of once per layer.
    """

    slots: torch.Tensor  # [B, N] int64 flat cache rows to gather (invisible keys -> a finite row)
    visible: torch.Tensor  # [B, 1, 1, N] bool, key j of sequence b is attended
    nonempty: torch.Tensor  # [B, 1, 1, 1] bool, sequence b has at least one key


def plan_decode(
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    num_blocks: int,
    block_size: int,
    sliding_window: int | None,
) -> DecodePlan:
    """Indices and masks for :func:`planned_decode`: block_tables [B, W], lens [B] int64.

    The caller has validated the inputs (lens within the table, ids within the cache).
    """
    batch = lens.shape[0]
    max_len = int(lens.max()) if batch else 0
    nblk = max(1, -(-max_len // block_size))
    n = nblk * block_size
    bs = block_size
    pos = torch.arange(n, device=lens.device)  # [N]
    visible = pos[None, :] < lens[:, None]  # [B, N]
    if sliding_window is not None:
        visible &= pos[None, :] >= lens[:, None] - sliding_window
    blocks = block_tables[:, :nblk].long().clamp(0, num_blocks - 1)  # [B, nblk]
    slots = blocks[:, pos // bs] * bs + pos % bs  # [B, N]
    first = slots[:, :1]
    if sliding_window is not None:  # the first visible key, a finite row
        start = (lens - sliding_window).clamp_min(0).clamp_max(n - 1)[:, None]
        first = slots.gather(1, start)
    slots = torch.where(visible, slots, first)
    return DecodePlan(slots, visible[:, None, None, :], (lens > 0)[:, None, None, None])


def planned_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: DecodePlan,
    scale: float,
) -> torch.Tensor:
    """Decode through SDPA with a precomputed plan, no soft-cap: q [B, Hq, D] -> [B, Hq, D].

    No validation: the caller checked the step's inputs once (see :func:`plan_decode`).
    """
    batch, hq, d = q.shape
    nb, bs, hkv, _ = k_cache.shape
    cdt = _compute_dtype(q.dtype)
    n = plan.slots.shape[1]
    flat = plan.slots.reshape(-1)  # [B * N]; index_select gathers rows 4-6x faster than indexing
    k = k_cache.view(nb * bs, hkv, d).index_select(0, flat).view(batch, n, hkv, d)
    v = v_cache.view(nb * bs, hkv, d).index_select(0, flat).view(batch, n, hkv, d)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, N, D]
    qf = q.view(batch, hkv, hq // hkv, d)  # [B, Hkv, G, D]: G plays the query rows
    if cdt != q.dtype:
        k, v, qf = k.to(cdt), v.to(cdt), qf.to(cdt)
    o = F.scaled_dot_product_attention(qf, k, v, attn_mask=plan.visible, scale=scale)
    o = o.masked_fill(~plan.nonempty, 0.0)  # no key: 0
    return o.reshape(batch, hq, d).to(q.dtype)


def _sdpa_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Decode through SDPA: q [B, Hq, D], lens [B] int64 -> [B, Hq, D]."""
    plan = plan_decode(block_tables, lens, k_cache.shape[0], k_cache.shape[1], sliding_window)
    return planned_decode(q, k_cache, v_cache, plan, scale)


# Queries per call of the masked and soft-capped paths: bounds their [chunk, keys] masks/scores.
_QUERY_CHUNK = 512


def _gather_blocks(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gather_kv` through ``index_select`` (4-7x faster than indexing on the CPU)."""
    bs = k_cache.shape[1]
    nblk = -(-seq_len // bs)
    ids = block_table[:nblk].long()
    k = k_cache.index_select(0, ids).flatten(0, 1)[:seq_len]  # [seq_len, Hkv, D]
    v = v_cache.index_select(0, ids).flatten(0, 1)[:seq_len]
    return k, v


def _cpu_flash_with_lse() -> Any:
    """SDPA's CPU flash kernel returning (out, logsumexp), or None where this torch lacks it."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _causal_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, scale: float
) -> torch.Tensor:
    """Bottom-right causal attention: q [1, Hq, n, D], k, v [1, Hkv, prefix + n, D] -> like q.

    No prefix: SDPA's causal fast path (``is_causal``; the CPU flash kernel skips the blocks
    above the diagonal and reads KV head ``h // G`` for query head ``h`` itself). With a prefix,
    on the CPU: every query sees the whole prefix, so the output is the softmax-weighted merge of
    two flash calls, queries x prefix (no mask) and the causal square of the new keys, through
    their log-sum-exps. Memory traffic stays linear in the keys; no [n, L] mask is built.
    """
    if prefix == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    flash = _cpu_flash_with_lse() if q.device.type == "cpu" else None
    if flash is None:
        return _masked_prefill(q, k, v, prefix, scale, None)
    o_old, lse_old = flash(q, k[:, :, :prefix], v[:, :, :prefix], 0.0, False, scale=scale)
    o_new, lse_new = flash(q, k[:, :, prefix:], v[:, :, prefix:], 0.0, True, scale=scale)
    top = torch.maximum(lse_old, lse_new)  # [1, Hq, n], finite: every row sees a key
    w_old = (lse_old - top).exp_().unsqueeze(-1)  # [1, Hq, n, 1]
    w_new = (lse_new - top).exp_().unsqueeze(-1)
    merged: torch.Tensor = (o_old * w_old + o_new * w_new) / (w_old + w_new)
    return merged


def _chunk_visible(
    q_lo: int, q_hi: int, k_lo: int, k_hi: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """[q_hi - q_lo, k_hi - k_lo] bool: the query at p sees key j iff j <= p (and j > p - w)."""
    pos = torch.arange(q_lo, q_hi, device=device)[:, None]
    key = torch.arange(k_lo, k_hi, device=device)[None, :]
    visible = key <= pos
    if window is not None:
        visible &= key > pos - window
    return visible


def _key_range(prefix: int, lo: int, hi: int, window: int | None) -> tuple[int, int]:
    """The keys [k_lo, k_hi) that queries lo..hi-1 (positions prefix + i) can see."""
    k_lo = 0 if window is None else max(0, prefix + lo - window + 1)
    return k_lo, prefix + hi


def _masked_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: int,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """SDPA with an explicit mask, queries in chunks, each against only the keys it can see.

    q [1, Hq, n, D], k, v [1, Hkv, prefix + n, D] -> like q. With a window the keys per chunk
    are at most ``chunk + window``, so the work is linear in n.
    """
    n = q.shape[2]
    out = torch.empty_like(q)
    for lo in range(0, n, _QUERY_CHUNK):
        hi = min(n, lo + _QUERY_CHUNK)
        k_lo, k_hi = _key_range(prefix, lo, hi, window)
        visible = _chunk_visible(prefix + lo, prefix + hi, k_lo, k_hi, window, q.device)
        out[:, :, lo:hi] = F.scaled_dot_product_attention(
            q[:, :, lo:hi],
            k[:, :, k_lo:k_hi],
            v[:, :, k_lo:k_hi],
            attn_mask=visible,
            scale=scale,
            enable_gqa=True,
        )
    return out


def _softcap_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: int,
    scale: float,
    window: int | None,
    softcap: float,
) -> torch.Tensor:
    """Explicit soft-capped softmax (SDPA has no soft-cap), queries in chunks as above.

    q [1, Hq, n, D], k, v [1, Hkv, prefix + n, D] -> like q.
    """
    _, hq, n, d = q.shape
    hkv = k.shape[1]
    qg = q[0].view(hkv, hq // hkv, n, d)  # [Hkv, G, n, D]
    out = torch.empty_like(q)
    for lo in range(0, n, _QUERY_CHUNK):
        hi = min(n, lo + _QUERY_CHUNK)
        k_lo, k_hi = _key_range(prefix, lo, hi, window)
        visible = _chunk_visible(prefix + lo, prefix + hi, k_lo, k_hi, window, q.device)
        kc = k[0, :, k_lo:k_hi]  # [Hkv, Lc, D]
        s = torch.einsum("hgnd,hjd->hgnj", qg[:, :, lo:hi], kc) * scale  # [Hkv, G, c, Lc]
        o = _softmax_attend(s, visible, v[0, :, None, k_lo:k_hi], softcap)  # [Hkv, G, c, D]
        out[0, :, lo:hi] = o.reshape(hq, hi - lo, d)
    return out


def torch_paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Queries of each sequence after its cached prefix (bottom-right causal).

    q [T, Hq, D], caches [nb, bs, Hkv, D], block_tables [B, W], cu_seqlens_q [B+1],
    seq_lens [B] -> [T, Hq, D]
    """
    t, hq, d = q.shape
    cdt = _compute_dtype(q.dtype)
    out = torch.zeros(t, hq, d, dtype=q.dtype, device=q.device)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        n = end - start
        if n == 0:
            continue
        k, v = _gather_blocks(k_cache, v_cache, block_tables[b], seq_len)  # [L, Hkv, D]
        # heads first, one batch row: [1, H, len, D] views, the layout of SDPA's CPU flash kernel
        qb = q[start:end].to(cdt).transpose(0, 1)[None]  # [1, Hq, n, D]
        kb = k.to(cdt).transpose(0, 1)[None]  # [1, Hkv, L, D]
        vb = v.to(cdt).transpose(0, 1)[None]
        prefix = seq_len - n
        if softcap is not None:
            o = _softcap_prefill(qb, kb, vb, prefix, scale, sliding_window, softcap)
        elif sliding_window is not None:
            o = _masked_prefill(qb, kb, vb, prefix, scale, sliding_window)
        else:
            o = _causal_prefill(qb, kb, vb, prefix, scale)
        out[start:end] = o[0].transpose(0, 1).to(q.dtype)  # [1, Hq, n, D] -> [n, Hq, D]
    return out
