"""One step's flat batch on the host, and its upload to the device in two copies.

The engine builds a step's inputs as numpy arrays (:class:`HostBatch`); :class:`HostStaging`
turns them into the model's tensors. On the CPU that is ``torch.from_numpy`` (no copy). On CUDA
six small host-to-device copies per step cost more host time than the data is worth, and a copy
from pageable memory blocks the host; instead every int64 array is packed into one pinned
buffer and every int32 array into another, each goes over in one asynchronous copy, and the
device tensors are views of the two destinations. A CUDA event recorded after the copies is
waited on before the pinned buffers are written again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fast.model.attention_context import AttentionContext

__all__ = ["HostBatch", "HostStaging", "leading_decodes", "padded_width", "to_device"]


def to_device(values: object, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host array (a list or numpy array) as a 1-D tensor of ``dtype`` on ``device``,
    without waiting for the device.

    ``torch.tensor(values, device=cuda)`` and ``.to(cuda)`` of a pageable CPU tensor copy
    synchronously: the host waits for every kernel queued on the stream before the copy, which
    undoes overlapped scheduling (the step launched ahead is among them). On CUDA the values go
    through pinned memory in an asynchronous copy (the pinned block is not reused before the
    copy is done: torch's host allocator records the copy's stream); elsewhere a plain tensor.

    >>> to_device([3, 1, 2], torch.int64, torch.device("cpu")).tolist()
    [3, 1, 2]
    >>> to_device(np.array([0.5, 2.0]), torch.float32, torch.device("cpu")).dtype
    torch.float32
    """
    host = torch.as_tensor(np.asarray(values), dtype=dtype).reshape(-1)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def padded_width(width: int, max_width: int) -> int:
    """Block-table width handed to the CUDA kernels: ``width`` rounded up to a power of two,
    at least 16, at most ``max_width`` (never below ``width``).

    The decode kernel's split count is a compile-time constant chosen from the table width;
    rounding keeps the number of widths (and so of compiled variants) to a handful.

    >>> [padded_width(w, 128) for w in (1, 16, 17, 100, 128)]
    [16, 16, 32, 128, 128]
    >>> padded_width(7, 10), padded_width(12, 10)
    (10, 12)
    """
    return max(width, min(max_width, max(16, 1 << max(0, (width - 1).bit_length()))))


def leading_decodes(cu_seqlens_q: np.ndarray) -> int:
    """How many of the first sequences have one new token each (all of them: 0, a decode step
    needs no split).

    >>> leading_decodes(np.array([0, 1, 2, 7, 8])), leading_decodes(np.array([0, 1, 2]))
    (2, 0)
    """
    single = np.diff(cu_seqlens_q) == 1  # [B]
    if single.all():
        return 0
    return int(single.argmin())


@dataclass(frozen=True)
class HostBatch:
    """A step's inputs as numpy arrays (T tokens of B sequences, N of them sampled)."""

    tokens: np.ndarray  # [T] int64 token ids
    positions: np.ndarray  # [T] int64 absolute positions
    slots: np.ndarray  # [T] int64 cache slots
    tables: np.ndarray  # [B, W] int32 block tables
    seq_lens: np.ndarray  # [B] int32 cached + new tokens
    cu_seqlens_q: np.ndarray  # [B + 1] int32
    max_seqlen_q: int
    decode: bool  # every sequence has exactly one new token
    sample_rows: np.ndarray  # [N] int64 rows of the flat batch whose next token is sampled


class HostStaging:
    """Uploads :class:`HostBatch` arrays; on CUDA through two reused pinned buffers."""

    def __init__(
        self, device: torch.device, pack: bool | None = None, split: bool | None = None
    ) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._pack = self._cuda if pack is None else pack  # tests pack on the CPU too
        # a mixed step's leading single-token sequences go to the decode kernel (on CUDA;
        # tests split on the CPU too): AttentionContext.num_decodes
        self.split = self._cuda if split is None else split
        self._host: dict[torch.dtype, torch.Tensor] = {}
        self._events: dict[torch.dtype, torch.cuda.Event] = {}

    def upload(
        self, batch: HostBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionContext, torch.Tensor]:
        """(input_ids [T], positions [T], ctx, sample_rows [N]) on the device."""
        b, w = batch.tables.shape
        longs = self.put(
            torch.int64, [batch.tokens, batch.positions, batch.slots, batch.sample_rows]
        )
        int_arrays = [batch.tables.reshape(-1), batch.seq_lens, batch.cu_seqlens_q]
        n = leading_decodes(batch.cu_seqlens_q) if self.split and not batch.decode else 0
        if n:  # the prefill rows' metadata in arrays of their own (16-byte aligned: a slice
            # at an odd offset would compile another kernel variant mid-run)
            cu = batch.cu_seqlens_q[n:] - batch.cu_seqlens_q[n]  # [B - n + 1]
            int_arrays += [batch.tables[n:].reshape(-1), batch.seq_lens[n:], cu]
        ints = self.put(torch.int32, int_arrays)
        ctx = AttentionContext(
            slot_mapping=longs[2],
            block_tables=ints[0].view(b, w),
            seq_lens=ints[1],
            cu_seqlens_q=ints[2],
            max_seqlen_q=batch.max_seqlen_q,
            is_decode=batch.decode,
            num_decodes=n,
            prefill_block_tables=ints[3].view(b - n, w) if n else None,
            prefill_seq_lens=ints[4] if n else None,
            prefill_cu_seqlens_q=ints[5] if n else None,
        )
        return longs[0], longs[1], ctx, longs[3]

    def put(self, dtype: torch.dtype, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """The arrays as 1-D device tensors of ``dtype``: one copy on CUDA, none on the CPU."""
        if not self._pack:
            return [torch.from_numpy(np.ascontiguousarray(a, dtype=_NP[dtype])) for a in arrays]
        sizes = [int(a.shape[0]) for a in arrays]
        # Each array starts on a 16-byte boundary: Triton specializes a kernel on whether each
        # pointer argument is 16-byte aligned, so unaligned slices (an offset that varies with
        # the batch's shape) compiled a new kernel variant in the middle of a run (a 1.8 s
        # first prefill step on an H200); warm-up's own tensors are aligned, so these must be.
        per = 16 // torch.empty((), dtype=dtype).element_size()
        starts = np.cumsum([0] + [-(-n // per) * per for n in sizes])  # [len + 1]
        total = int(starts[-1])
        self.wait(dtype)
        host = self._host.get(dtype)
        if host is None or host.shape[0] < total:
            host = torch.empty(max(total, 1024) * 2, dtype=dtype, pin_memory=self._cuda)
            self._host[dtype] = host
        view = host.numpy()
        for a, at, n in zip(arrays, starts, sizes):
            view[at : at + n] = a
        dev = host[:total].to(self.device, non_blocking=True)  # [sum, padded]
        if self._cuda:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
            self._events[dtype] = event
        return [dev[at : at + n] for at, n in zip(starts.tolist(), sizes)]

    def wait(self, dtype: torch.dtype) -> None:
        """Block until the last copy out of ``dtype``'s pinned buffer has finished."""
        event = self._events.pop(dtype, None)
        if event is not None:
            event.synchronize()


_NP = {torch.int64: np.int64, torch.int32: np.int32}
