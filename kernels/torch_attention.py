"""Torch fallbacks for paged attention: plain gathers and softmax, used where there is no GPU.

The math follows ARCHITECTURE.md: logits ``s = scale * q.k``, then soft-cap ``c * tanh(s / c)``,
a query at absolute position ``p`` sees key ``j`` iff ``j <= p`` and (with window ``w``)
``j > p - w``; query head ``h`` reads KV head ``h // (Hq // Hkv)``; a row that sees no key
outputs 0. Accumulation is float32 (float64 for float64 inputs). Without a soft-cap the softmax and
value
product run fused in ``F.scaled_dot_product_attention`` (about twice as fast on the CPU as the
explicit ops, which remain for the soft-cap); keys past a length are redirected to the
sequence's first token before the gather so that whatever those rows hold (NaN included) never
reaches the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "torch_paged_decode",
    "torch_paged_prefill",
    "gather_kv",
    "DecodePlan",
    "plan_decode",
    "planned_decode",
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
    k = k_cache[bt].reshape(batch, nblk * bs, hkv, d).to(cdt)  # [B, N, Hkv, D]
    v = v_cache[bt].reshape(batch, nblk * bs, hkv, d).to(cdt)
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
    slots = plan.slots
    k = k_cache.view(nb * bs, hkv, d)[slots].transpose(1, 2)  # [B, Hkv, N, D]
    v = v_cache.view(nb * bs, hkv, d)[slots].transpose(1, 2)
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
    hkv = k_cache.shape[2]
    g = hq // hkv
    cdt = _compute_dtype(q.dtype)
    out = torch.zeros(t, hq, d, dtype=q.dtype, device=q.device)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        n = end - start
        if n == 0:
            continue
        k, v = gather_kv(k_cache, v_cache, block_tables[b], seq_len)  # [L, Hkv, D]
        k, v = k.to(cdt), v.to(cdt)
        qb = q[start:end].to(cdt).reshape(n, hkv, g, d)  # [n, Hkv, G, D]
        pos = torch.arange(seq_len - n, seq_len, device=q.device)[:, None]  # [n, 1]
        key = torch.arange(seq_len, device=q.device)[None, :]  # [1, L]
        visible = key <= pos  # [n, L]: every row sees at least its own key
        if sliding_window is not None:
            visible &= key > pos - sliding_window
        if softcap is None:  # fused: rows (g, i) of each KV head, mask repeated over g
            qs = qb.permute(1, 2, 0, 3).reshape(hkv, g * n, d)  # [Hkv, G*n, D]
            o = F.scaled_dot_product_attention(
                qs,
                k.transpose(0, 1),
                v.transpose(0, 1),
                attn_mask=visible.repeat(g, 1),
                scale=scale,
            ).view(hkv, g, n, d)  # [Hkv, G, n, D]
        else:
            s = torch.einsum("nhgd,jhd->hgnj", qb, k) * scale  # [Hkv, G, n, L]
            o = _softmax_attend(s, visible, v.permute(1, 0, 2)[:, None], softcap)
        out[start:end] = o.permute(2, 0, 1, 3).reshape(n, hq, d).to(q.dtype)
    return out
