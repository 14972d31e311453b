"""rank 0's commands to the workers: an 8-int64 header, then (for some) one int64 payload.

Both go over the control group (gloo, CPU). A step's model inputs travel as the fields of the
engine's own ``HostBatch`` (numpy arrays: token ids, positions, slots, block tables, lengths;
:class:`StepBatch` here), rebuilt on the worker with the constructor the engine gives
(:class:`EngineKit`), so every rank uploads them and runs the same forward, eager or CUDA graph,
as rank 0 does. ``fast.distributed`` sits below ``fast.engine`` (the engine imports it), so the
engine hands its step machinery down in an :class:`EngineKit` rather than being imported.
Opcodes and fields:

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

__all__ = ["Op", "HEADER", "EngineKit", "StepBatch", "header", "pack_batch", "unpack_batch"]

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


class StepBatch(Protocol):
    """The fields of a step's batch (``fast.engine.batch.HostBatch``'s), T tokens of B
    sequences, N of them sampled."""

    tokens: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64
    tables: np.ndarray  # [B, W] int32
    seq_lens: np.ndarray  # [B] int32
    cu_seqlens_q: np.ndarray  # [B + 1] int32
    max_seqlen_q: int
    decode: bool
    sample_rows: np.ndarray  # [N] int64


@dataclass(frozen=True)
class EngineKit:
    """The engine's step machinery a worker runs, given by the engine (module-level classes and
    functions: they travel to the spawned worker by name).

    ``batch``: the batch class (its fields in :class:`StepBatch` order); ``staging(device)``:
    its uploader (``upload(batch) -> (ids, positions, ctx, rows)``); ``save_kv(caches, blocks,
    device)`` / ``restore_kv(caches, saved)``: the rollback's KV copies; ``warm_up`` and
    ``graphs``: the CUDA warm-up and decode-graph class (None off CUDA).
    """

    batch: Callable[..., Any]
    staging: Callable[[torch.device], Any]
    save_kv: Callable[..., Any]
    restore_kv: Callable[..., None]
    warm_up: Callable[..., None] | None = None
    graphs: Callable[..., Any] | None = None


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


def pack_batch(batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
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


def unpack_batch(head: torch.Tensor, payload: torch.Tensor, make: Callable[..., Any]) -> Any:
    """``make(*fields)``: the batch rank 0 packed, its fields in :class:`StepBatch` order with
    the dtypes the engine builds (``make`` is the engine's batch class).

    >>> from types import SimpleNamespace as Batch
    >>> fields = ("tokens positions slots tables seq_lens cu_seqlens_q max_seqlen_q decode "
    ...           "sample_rows").split()
    >>> b = Batch(**dict(zip(fields, (np.array([5, 6]), np.array([0, 1]), np.array([8, 9]),
    ...     np.array([[2]], dtype=np.int32), np.array([2], dtype=np.int32),
    ...     np.array([0, 2], dtype=np.int32), 2, False, np.array([1])))))
    >>> u = unpack_batch(*pack_batch(b), lambda *f: Batch(**dict(zip(fields, f))))
    >>> u.tables.tolist(), u.tables.dtype, u.sample_rows.tolist(), u.decode
    ([[2]], dtype('int32'), [1], False)
    """
    t, b, w, n, max_q, decode = (int(x) for x in head[1:7])
    a = payload.numpy()
    at = [0]
    for size in (t, t, t, b * w, b, b + 1, n):
        at.append(at[-1] + size)
    part = [a[at[i] : at[i + 1]] for i in range(7)]
    return make(
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
