"""rank 0's commands to the workers: an 8-int64 header, then (for some) one int64 payload.

Both go over the control group (gloo, CPU). A step's model inputs travel as the engine's own
:class:`~fast.engine.batch.HostBatch` (numpy arrays: token ids, positions, slots, block tables,
lengths), so every rank uploads them and runs the same forward, eager or CUDA graph, as rank 0
does. Opcodes and fields:

=============  =============================================  ====================================
op             header fields after the op                    payload
=============  =============================================  ====================================
FORWARD        T, B, W, N sampled rows, max_seqlen_q, decode  tokens, positions, slots [T],
                                                              tables [B W], seq_lens [B],
                                                              cu_seqlens_q [B + 1], rows [N]
LOGITS         N hidden rows                                   (hidden [N, H] on the device group)
CACHE_OPS      swap-outs, swap-ins, copies (pairs each)        the pairs, flattened
SAVE_KV        E blocks                                        the blocks [E]
RESTORE_KV     -                                               -
ALLOCATE       device blocks, host blocks, block size          -
GRAPHS         max width, max_num_seqs, capture, S sizes       the sizes [S]
FAIL           the rank that must raise (tests), in the step   -
SHUTDOWN       -                                               -
=============  =============================================  ====================================
"""

from __future__ import annotations

import enum

import numpy as np
import torch

from fast.engine.batch import HostBatch

__all__ = ["Op", "HEADER", "header", "pack_batch", "unpack_batch"]

HEADER = 8  # int64 fields of a command header


class Op(enum.IntEnum):
    """The commands (header field 0)."""

    FORWARD = 1
    LOGITS = 2
    CACHE_OPS = 3
    SAVE_KV = 4
    RESTORE_KV = 5
    ALLOCATE = 6
    GRAPHS = 7
    FAIL = 8
    SHUTDOWN = 9


def header(op: Op, *fields: int) -> torch.Tensor:
    """[HEADER] int64: the op and up to seven fields, zero-padded.

    >>> header(Op.ALLOCATE, 64, 0, 16).tolist()
    [6, 64, 0, 16, 0, 0, 0, 0]
    """
    if len(fields) > HEADER - 1:
        raise ValueError(f"a header holds {HEADER - 1} fields: {len(fields)} given")
    out = torch.zeros(HEADER, dtype=torch.int64)
    out[0] = int(op)
    out[1 : 1 + len(fields)] = torch.tensor([int(f) for f in fields], dtype=torch.int64)
    return out


def pack_batch(batch: HostBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload [3T + BW + 2B + 1 + N] int64) of a step's batch."""
    t = int(batch.tokens.shape[0])
    b, w = batch.tables.shape
    n = int(batch.sample_rows.shape[0])
    parts = [
        batch.tokens,
        batch.positions,
        batch.slots,
        batch.tables.reshape(-1),
        batch.seq_lens,
        batch.cu_seqlens_q,
        batch.sample_rows,
    ]
    payload = torch.from_numpy(np.concatenate([p.astype(np.int64, copy=False) for p in parts]))
    head = header(Op.FORWARD, t, b, w, n, batch.max_seqlen_q, int(batch.decode))
    return head, payload


def payload_size(head: torch.Tensor) -> int:
    """The payload length [int64 elements] a FORWARD header announces."""
    t, b, w, n = (int(x) for x in head[1:5])
    return 3 * t + b * w + 2 * b + 1 + n


def unpack_batch(head: torch.Tensor, payload: torch.Tensor) -> HostBatch:
    """The :class:`HostBatch` rank 0 packed (the dtypes the engine builds).

    >>> b = HostBatch(np.array([5, 6]), np.array([0, 1]), np.array([8, 9]),
    ...               np.array([[2]], dtype=np.int32), np.array([2], dtype=np.int32),
    ...               np.array([0, 2], dtype=np.int32), 2, False, np.array([1]))
    >>> u = unpack_batch(*pack_batch(b))
    >>> u.tables.tolist(), u.tables.dtype, u.sample_rows.tolist(), u.decode
    ([[2]], dtype('int32'), [1], False)
    """
    t, b, w, n, max_q, decode = (int(x) for x in head[1:7])
    a = payload.numpy()
    at = [0]
    for size in (t, t, t, b * w, b, b + 1, n):
        at.append(at[-1] + size)
    part = [a[at[i] : at[i + 1]] for i in range(7)]
    return HostBatch(
        part[0].copy(),
        part[1].copy(),
        part[2].copy(),
        part[3].astype(np.int32).reshape(b, w),
        part[4].astype(np.int32),
        part[5].astype(np.int32),
        max_q,
        bool(decode),
        part[6].copy(),
    )
