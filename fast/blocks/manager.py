"""The fast block manager: the spec's policy, with its state in numpy arrays and numba kernels.

Observably identical to :class:`spec.block_manager.BlockManager` (same block ids, copy-on-write
pairs, swap maps, evictions and exceptions; unchanged state after an error), which
``python -m conformance --impl fast`` checks. The arrays are described in
:mod:`fast.blocks.state` and changed only by the kernels of :mod:`fast.blocks.kernels`; this
module validates arguments in the spec's order, keeps the Python side of the bookkeeping (which
row holds which sequence, free rows, extra keys), grows the arrays by doubling, and turns a
kernel's failed result into the spec's exception.

>>> from fast.blocks.manager import BlockManager, BlockManagerConfig
>>> bm = BlockManager(BlockManagerConfig(block_size=4, num_gpu_blocks=8))
>>> bm.allocate(0, [10, 11, 12, 13, 14])
0
>>> bm.block_table(0), bm.slot_mapping(0, 0, 5)
([0, 1], [0, 1, 2, 3, 4])
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np
from numpy.typing import NDArray

from fast.blocks import kernels as K
from fast.blocks.freelist import COUNT, EVICTED, HEAD, NEXT, REF, new_pool, queue_order
from fast.blocks.hash import chain_hashes as chain_hashes_numba
from fast.blocks.hash import scratch_for
from fast.blocks.integrity import check_integrity
from fast.blocks.open_addressing import insert
from fast.blocks.prefix_ids import PrefixIds, intern_chain
from fast.blocks.state import ENTRY_PID, BlockArrays, BlockState, live_prefix_ids, pack
from spec.block_manager import BlockManagerConfig
from spec.errors import (
    DoubleFreeError,
    InvalidArgumentError,
    OutOfBlocksError,
    SequenceExistsError,
    SequenceStateError,
    SwapInError,
    SwapOutError,
    UnknownSequenceError,
)
from spec.prefix_cache import ROOT_PARENT_HASH, HashFn, chain_hashes, hash_block_tokens

__all__ = ["BlockManager", "BlockManagerConfig"]

_INT64_MAX = (1 << 63) - 1
_BAD_TOKEN = "token ids must be ints in [0, 2**63)"
_EMPTY = np.zeros(0, dtype=np.int64)
_NO_PAIRS = np.zeros((0, 2), dtype=np.int64)
# per-row arrays read only below the row's token / full-block count: grown without zeroing
# (zeroing megabytes of fresh pages was most of a first batch's cost)
_UNREAD_PAST_END = ("tokens", "block_hash", "block_pid")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pow2_at_least(n: int) -> int:
    return 1 << max(3, (n - 1).bit_length())


def _check_token(token: Any, name: str) -> int:
    try:
        value = operator.index(token)
    except TypeError:
        raise InvalidArgumentError(name, token, "token ids must be ints") from None
    if isinstance(token, bool) or not 0 <= value <= _INT64_MAX:
        raise InvalidArgumentError(name, token, _BAD_TOKEN)
    return value


def _int_list_array(values: object) -> NDArray[np.int64] | None:
    """``values`` as int64 ``[n]`` when it is a non-empty list of plain ints that fit, else None
    (numpy converts such a list in C; anything else takes the element-by-element path)."""
    if type(values) is not list or not values or set(map(type, values)) != {int}:
        return None
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        return None


def _tokens_array(token_ids: Sequence[int] | NDArray[Any], name: str) -> NDArray[np.int64]:
    """``token_ids`` as int64 ``[n]``, validated as the spec does (first bad token raises)."""
    tokens = _int_list_array(token_ids)
    if tokens is None and isinstance(token_ids, np.ndarray) and token_ids.dtype == np.int64:
        tokens = token_ids if token_ids.ndim == 1 else None
    if tokens is not None:
        if tokens.size and tokens.min() < 0:
            bad = np.flatnonzero(tokens < 0)
            raise InvalidArgumentError(name, int(tokens[bad[0]]), _BAD_TOKEN)
        return tokens
    return np.array([_check_token(t, name) for t in token_ids], dtype=np.int64)


class BlockManager:
    """Array-backed block manager, a drop-in for ``spec.block_manager.BlockManager``.

    ``hash_fn`` (keyword only) is the block content hash, as in the spec (tests plant
    collisions with it); the spec's default is computed in numba, any other is called from
    Python. Besides the spec's operations it offers :meth:`gather`, the int32 block tables and
    lengths a GPU step takes.
    """

    def __init__(self, config: BlockManagerConfig, *, hash_fn: HashFn = hash_block_tokens) -> None:
        if not isinstance(config, BlockManagerConfig):
            raise InvalidArgumentError("config", config, "must be a BlockManagerConfig")
        self.config = config
        self._bs = bs = config.block_size
        self._wm = config.watermark_blocks
        self._caching = config.enable_prefix_caching
        self._hash_fn = hash_fn
        g, c = config.num_gpu_blocks, config.num_cpu_blocks
        # live prefix ids are at most the cached blocks plus the live full blocks (<= g + c):
        # start at that bound (up to 2**16 nodes) so that serving rarely collects or grows
        self._pids = PrefixIds(bs, _pow2_at_least(min(g + c, 1 << 16)) if self._caching else 8)
        self._xids: dict[str, int] = {}  # extra key -> id (its bytes are in the state)
        rows, width = 8, 4
        cap = _pow2_at_least(2 * g + 1)
        self._a = BlockArrays(
            block_size=bs,
            watermark=self._wm,
            caching=self._caching,
            numba_hash=hash_fn is hash_block_tokens,
            gpu_pool=(pools := (new_pool(g), new_pool(c)))[0][0],
            gpu_ends=pools[0][1],
            cpu_pool=pools[1][0],
            cpu_ends=pools[1][1],
            cache_entry=np.full((2, g), -1, dtype=np.int64),
            index_keys=np.full(cap, -1, dtype=np.int64),
            index_blocks=np.full(cap, -1, dtype=np.int32),
            pids=self._pids.arrays,
            key_bytes=np.zeros(0, dtype=np.uint8),
            key_offsets=np.zeros(1, dtype=np.int64),
            hash_scratch=scratch_for(bs, 0),
            id_keys=np.full(16, -1, dtype=np.int64),
            id_rows=np.full(16, -1, dtype=np.int32),
            tables=np.zeros((rows, width), dtype=np.int32),
            num_tokens=np.zeros(rows, dtype=np.int64),
            tokens=np.zeros((rows, width * bs), dtype=np.int64),
            swapped=np.zeros(rows, dtype=np.uint8),
            block_hash=np.zeros((rows, width), dtype=np.int64),
            block_pid=np.zeros((rows, width), dtype=np.int64),
            extra_id=np.full(rows, -1, dtype=np.int64),
            num_computed=np.zeros(rows, dtype=np.int64),
            row_seen=np.zeros(rows, dtype=np.int32),
            cow_count=np.zeros(g, dtype=np.int32),
        )
        self._s: BlockState = pack(self._a)
        # the Python side: live sequence -> row, each row's extra key, free rows (last = next)
        self._rows: dict[int, int] = {}
        self._extra: list[str | None] = [None] * rows
        self._free_rows = list(range(rows - 1, -1, -1))
        self._freed: set[int] = set()

    def __deepcopy__(self, memo: dict[int, Any]) -> BlockManager:
        """An independent manager in the same state (``copy.deepcopy``): the arrays and the
        Python bookkeeping are copied, and the copy packs its own arrays for the kernels (the
        structref itself cannot be copied)."""
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        for name, value in vars(self).items():
            if name != "_s":
                setattr(clone, name, copy.deepcopy(value, memo))
        clone._s = pack(clone._a)
        return clone

    def _set(self, **arrays: Any) -> None:
        """Replace arrays of the state (growth) and pack it again for the kernels."""
        self._a = self._a._replace(**arrays)
        self._s = pack(self._a)

    # ------------------------------------------------------------------ growth
    def _ensure_width(self, blocks: int) -> None:
        """Room for ``blocks`` blocks (and their tokens) in every row."""
        a = self._a
        w = a.tables.shape[1]
        if blocks <= w:
            return
        while w < blocks:
            w *= 2
        r = a.tables.shape[0]
        new: dict[str, NDArray[Any]] = {}
        for name, cols in (("tables", w), ("block_hash", w), ("block_pid", w)):
            new[name] = self._widened(name, r, cols)
        new["tokens"] = self._widened("tokens", r, w * self._bs)
        self._set(**new)

    def _widened(self, name: str, rows: int, cols: int) -> NDArray[Any]:
        old = getattr(self._a, name)
        new = (np.empty if name in _UNREAD_PAST_END else np.zeros)((rows, cols), dtype=old.dtype)
        new[:, : old.shape[1]] = old
        return new

    def _free_row(self, more: int = 1) -> int:
        """The row the next new sequence gets, with room for ``more`` new sequences (rows and
        id map)."""
        if len(self._free_rows) < more:
            self._grow_rows(more)
        need = 2 * (len(self._rows) + more)
        cap = len(self._a.id_keys)
        if need > cap:
            while need > cap:
                cap *= 2
            keys = np.full(cap, -1, dtype=np.int64)
            rows = np.full(cap, -1, dtype=np.int32)
            for seq_id, row in self._rows.items():
                insert(keys, rows, seq_id, row)
            self._set(id_keys=keys, id_rows=rows)
        return self._free_rows[-1]

    def _grow_rows(self, free_needed: int) -> None:
        """Double the number of rows until ``free_needed`` rows are free, in one copy (the new
        rows are free and used last)."""
        a = self._a
        r = new_r = a.tables.shape[0]
        while new_r - r + len(self._free_rows) < free_needed:
            new_r *= 2
        new: dict[str, NDArray[Any]] = {}
        names = (
            "tables", "tokens", "block_hash", "block_pid", "num_tokens", "num_computed", "swapped",
        )  # fmt: skip
        for name in names + ("row_seen", "extra_id"):
            old = getattr(a, name)
            arr = np.empty((new_r,) + old.shape[1:], dtype=old.dtype)
            arr[:r] = old
            if name not in _UNREAD_PAST_END:
                arr[r:] = -1 if name == "extra_id" else 0
            new[name] = arr
        self._set(**new)
        self._extra.extend([None] * (new_r - r))
        self._free_rows = list(range(new_r - 1, r - 1, -1)) + self._free_rows

    def _take_row(self, seq_id: int, row: int, extra_key: str | None) -> None:
        """Python bookkeeping of a row a kernel just gave to ``seq_id`` (the next free row)."""
        self._free_rows.pop()
        self._rows[seq_id] = row
        self._extra[row] = extra_key
        self._freed.discard(seq_id)

    def _drop_row(self, seq_id: int, row: int) -> None:
        """Python bookkeeping of a row a kernel just freed."""
        del self._rows[seq_id]
        self._extra[row] = None
        self._free_rows.append(row)

    def _reserve_pids(self, n: int) -> None:
        """Room for ``n`` new prefix ids (collecting, then growing: the state is repacked)."""
        self._pids.reserve(n, lambda: live_prefix_ids(self._a))
        if self._pids.arrays is not self._a.pids:
            self._set(pids=self._pids.arrays)

    # ------------------------------------------------------------------ queries
    @property
    def num_free_gpu_blocks(self) -> int:
        """GPU blocks in the free queue (including cached blocks with refcount 0)."""
        return int(self._a.gpu_ends[COUNT])

    @property
    def num_free_cpu_blocks(self) -> int:
        """CPU blocks not holding a swapped-out sequence."""
        return int(self._a.cpu_ends[COUNT])

    def has_sequence(self, seq_id: int) -> bool:
        """True when ``seq_id`` is live (resident or swapped out)."""
        return seq_id in self._rows

    def _get(self, seq_id: int) -> int:
        row = self._rows.get(seq_id)
        if row is None:
            raise UnknownSequenceError(seq_id)
        return row

    def _resident(self, seq_id: int, operation: str) -> int:
        row = self._get(seq_id)
        if self._a.swapped[row]:
            raise SequenceStateError(seq_id, True, operation)
        return row

    def _nblocks(self, row: int) -> int:
        return -(-int(self._a.num_tokens[row]) // self._bs)

    def num_tokens(self, seq_id: int) -> int:
        """Tokens held by the sequence. Raises UnknownSequenceError."""
        return int(self._a.num_tokens[self._get(seq_id)])

    def token_ids(self, seq_id: int) -> list[int]:
        """A copy of the sequence's token ids. Raises UnknownSequenceError."""
        row = self._get(seq_id)
        return list(self._a.tokens[row, : self._a.num_tokens[row]].tolist())

    def block_table(self, seq_id: int) -> list[int]:
        """Physical block ids in logical order (CPU ids while swapped out)."""
        row = self._get(seq_id)
        return list(self._a.tables[row, : self._nblocks(row)].tolist())

    def slot_mapping(self, seq_id: int, start: int, end: int) -> list[int]:
        """Slots ``block * bs + offset`` of tokens ``start..end-1`` of a resident sequence."""
        row = self._resident(seq_id, "slot_mapping")
        n = int(self._a.num_tokens[row])
        if not (_is_int(start) and _is_int(end) and 0 <= start <= end <= n):
            raise InvalidArgumentError("start, end", (start, end), f"need 0 <= start <= end <= {n}")
        t = np.arange(start, end, dtype=np.int64)  # [end - start]
        slots = self._a.tables[row, t // self._bs].astype(np.int64) * self._bs + t % self._bs
        return list(slots.tolist())

    def is_swapped(self, seq_id: int) -> bool:
        """True when the sequence lives in the CPU pool. Raises UnknownSequenceError."""
        return bool(self._a.swapped[self._get(seq_id)])

    def refcount(self, block: int) -> int:
        """How many live resident sequences reference GPU ``block``."""
        return int(self._a.gpu_pool[REF, block])

    def free_block_order(self) -> list[int]:
        """The GPU free queue, head (next block to be taken) first."""
        return queue_order(self._a.gpu_pool, self._a.gpu_ends)

    def cached_blocks(self) -> list[int]:
        """GPU blocks registered in the prefix cache, ascending."""
        return list(np.flatnonzero(self._a.cache_entry[ENTRY_PID] >= 0).tolist())

    def num_computed_tokens(self, seq_id: int) -> int:
        """Leading tokens of the sequence whose KV is written. Raises UnknownSequenceError."""
        return int(self._a.num_computed[self._get(seq_id)])

    @property
    def num_evictions(self) -> int:
        """Blocks taken from the free queue so far whose prefix-cache entry that dropped (a
        counter: two equal readings mean no cached KV was given away in between)."""
        return int(self._a.gpu_ends[EVICTED])

    def cached_mask(self) -> NDArray[np.bool_]:
        """``[G]`` bool: True for the GPU blocks in the prefix cache (a copy)."""
        mask: NDArray[np.bool_] = self._a.cache_entry[ENTRY_PID] >= 0
        return mask

    def sequence_ids(self) -> list[int]:
        """Live sequence ids, ascending."""
        return sorted(self._rows)

    def can_allocate(self, token_ids: Sequence[int], extra_key: str | None = None) -> bool:
        """Whether ``allocate`` of this prompt would succeed now (with the watermark).

        With the default hash nothing is hashed: the prefix-id memo knows the hash of every
        prefix that can hit, and a prefix it does not know cannot."""
        tokens = self._check_prompt(token_ids)
        self._check_extra_key(extra_key)
        x = self._extra_id(extra_key)
        hashes = pids = _EMPTY
        if self._caching and not self._a.numba_hash:
            hashes, pids = self._chain(tokens, extra_key, create=False)
        result = K.allocate_kernel(self._s, 0, -1, tokens, x, hashes, pids, False)
        return bool(result.status == K.OK)

    def can_append(self, seq_ids: Sequence[int]) -> bool:
        """Whether ``append_batch`` of one token to each of ``seq_ids`` would succeed now."""
        sids = self._ids_array(seq_ids, "can_append")
        result = K.append_kernel(self._s, sids, _EMPTY, -1, _EMPTY, False, _EMPTY, _NO_PAIRS)
        if result.status not in (K.OK, K.NO_BLOCKS):
            self._raise_for(result, "can_append", seq_ids)
        return bool(result.status == K.OK)

    def can_swap_in(self, seq_id: int, num_new_tokens: int = 1) -> bool:
        """Whether the swapped-out sequence fits back with ``num_new_tokens`` more tokens."""
        row = self._get(seq_id)
        if not self._a.swapped[row]:
            raise SequenceStateError(seq_id, False, "can_swap_in")
        if not _is_int(num_new_tokens) or num_new_tokens < 0:
            raise InvalidArgumentError("num_new_tokens", num_new_tokens, "must be an int >= 0")
        need = -(-(int(self._a.num_tokens[row]) + num_new_tokens) // self._bs)
        return self.num_free_gpu_blocks - need >= self._wm

    # ------------------------------------------------------------------ validation helpers
    @staticmethod
    def _check_new_id(seq_id: int) -> None:
        if not _is_int(seq_id) or not 0 <= seq_id <= _INT64_MAX:
            raise InvalidArgumentError("seq_id", seq_id, "must be an int in [0, 2**63)")

    @staticmethod
    def _check_prompt(token_ids: Sequence[int] | NDArray[Any]) -> NDArray[np.int64]:
        tokens = _tokens_array(token_ids, "token_ids")
        if tokens.shape[0] == 0:
            raise InvalidArgumentError("token_ids", list(token_ids), "the prompt is empty")
        return tokens

    @staticmethod
    def _check_extra_key(extra_key: str | None) -> None:
        if extra_key is not None and not isinstance(extra_key, str):
            raise InvalidArgumentError("extra_key", extra_key, "must be a str or None")

    def _extra_id(self, extra_key: str | None) -> int:
        """The id of an extra key (-1 for None), adding its bytes to the state if new."""
        if extra_key is None:
            return -1
        x = self._xids.get(extra_key)
        if x is None:
            data = np.frombuffer(extra_key.encode("utf-8"), dtype=np.uint8)
            x = len(self._xids)
            self._xids[extra_key] = x
            key_bytes = np.concatenate([self._a.key_bytes, data])
            offsets = np.append(self._a.key_offsets, key_bytes.shape[0])
            scratch = scratch_for(self._bs, int(np.diff(offsets).max()))
            self._set(key_bytes=key_bytes, key_offsets=offsets, hash_scratch=scratch)
        return x

    def _chain(
        self, tokens: NDArray[np.int64], extra_key: str | None, create: bool
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Hashes and prefix ids ``[n // bs]`` of the full blocks (empty with caching off),
        interning new prefixes when ``create``: the kernels' input under a Python ``hash_fn``."""
        if not self._caching:
            return _EMPTY, _EMPTY
        bs = self._bs
        x = self._extra_id(extra_key)
        if self._a.numba_hash:
            a = self._a
            key = (
                a.key_bytes[a.key_offsets[x] : a.key_offsets[x + 1]] if x >= 0 else a.key_bytes[:0]
            )
            hashes = chain_hashes_numba(tokens, bs, key, x >= 0)
        else:
            hashes = np.array(
                chain_hashes(tokens.tolist(), bs, extra_key, self._hash_fn), dtype=np.int64
            )
        if create:
            self._reserve_pids(hashes.shape[0])
        pids = intern_chain(tokens, bs, hashes, x, create, self._pids.arrays)
        return hashes, pids

    def _ids_array(
        self, seq_ids: Sequence[int] | NDArray[Any], operation: str
    ) -> NDArray[np.int64]:
        """``seq_ids`` as int64 ``[N]``; ids no row can have are reported in the spec's order."""
        if isinstance(seq_ids, np.ndarray) and seq_ids.dtype == np.int64:
            return seq_ids
        ids = _int_list_array(seq_ids)
        if ids is not None:
            return ids
        if all(isinstance(s, int) and -(1 << 63) <= s <= _INT64_MAX for s in seq_ids):
            return np.array(seq_ids, dtype=np.int64).reshape(-1)
        if len(set(seq_ids)) != len(seq_ids):
            raise InvalidArgumentError("seq_ids", list(seq_ids), "a sequence appears twice")
        for seq_id in seq_ids:
            self._resident(seq_id, operation)
        raise AssertionError("unreachable: an id that is no int64 cannot be live")

    def _raise_for(
        self,
        result: K.AppendResult,
        operation: str,
        seq_ids: Sequence[int] | NDArray[np.int64],
        token_name: str = "token_ids",
        token_ids: Sequence[int] | NDArray[np.int64] = (),
    ) -> NoReturn:
        """The spec's exception for a failed :func:`~fast.blocks.kernels.append_kernel`."""
        status = result.status
        if status == K.DUPLICATE:
            raise InvalidArgumentError("seq_ids", list(seq_ids), "a sequence appears twice")
        if status == K.UNKNOWN:
            raise UnknownSequenceError(int(result.seq_id))
        if status == K.SWAPPED:
            raise SequenceStateError(int(result.seq_id), True, operation)
        if status == K.BAD_TOKEN:
            token = token_ids[int(result.bad_token)]
            _check_token(token, token_name)  # a token that is no int has its own message
            raise InvalidArgumentError("token_ids", token, _BAD_TOKEN)
        if status == K.NO_BLOCKS:
            raise OutOfBlocksError(int(result.needed), int(result.free))
        raise AssertionError(f"append_kernel returned status {status}")

    # ------------------------------------------------------------------ operations
    def allocate(
        self,
        seq_id: int,
        token_ids: Sequence[int] | NDArray[np.int64],
        extra_key: str | None = None,
    ) -> int:
        """Give a new sequence blocks for its whole prompt; return its cached-token count.

        Same checks, order and policy as ``spec.block_manager.BlockManager.allocate``. An
        int64 numpy array is taken as it is (the kernel reports a negative token); a list is
        validated token by token.
        """
        self._check_new_id(seq_id)  # the spec's order: id, tokens, extra key, exists, blocks
        if (
            isinstance(token_ids, np.ndarray)
            and token_ids.dtype == np.int64
            and token_ids.ndim == 1
            and token_ids.shape[0] > 0
        ):
            tokens = token_ids
        else:
            tokens = self._check_prompt(token_ids)
        if extra_key is not None and not isinstance(extra_key, str):
            self._check_prompt(token_ids)  # a bad token is reported first
            self._check_extra_key(extra_key)
        x = self._extra_id(extra_key)
        bs = self._bs
        self._ensure_width(-(-tokens.shape[0] // bs))
        row = self._free_row()
        hashes = pids = _EMPTY
        if self._caching:
            if self._a.numba_hash:
                self._reserve_pids(tokens.shape[0] // bs)
            else:
                hashes, pids = self._chain(tokens, extra_key, create=True)
        result = K.allocate_kernel(self._s, seq_id, row, tokens, x, hashes, pids, True)
        status = result.status
        if status == K.OK:
            self._take_row(seq_id, row, extra_key)
            return int(result.cached)
        if status == K.BAD_TOKEN:
            raise InvalidArgumentError("token_ids", int(tokens[result.bad_token]), _BAD_TOKEN)
        if status == K.EXISTS:
            raise SequenceExistsError(seq_id)
        if status == K.NO_BLOCKS:
            raise OutOfBlocksError(int(result.needed), int(result.free), self._wm)
        raise AssertionError(f"allocate_kernel returned status {status}")

    def append(self, seq_id: int, token_id: int) -> tuple[int, int] | None:
        """Append one token; return ``(src, dst)`` when it forced a copy-on-write."""
        self._resident(seq_id, "append")
        token = _check_token(token_id, "token_id")
        sids = np.array([seq_id], dtype=np.int64)
        toks = np.array([token], dtype=np.int64)
        _, pairs = self._append(sids, toks, -1, [token_id], "append", [seq_id], "token_id")
        if pairs.shape[0]:
            return (int(pairs[0, 0]), int(pairs[0, 1]))
        return None

    def append_batch(
        self,
        seq_ids: Sequence[int] | NDArray[np.int64],
        token_ids: Sequence[int] | NDArray[np.int64],
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Append ``token_ids[i]`` to ``seq_ids[i]`` in order, all or nothing.

        Returns the slots ``[N]`` and the copy-on-write pairs ``[M, 2]``. int64 numpy arrays
        are taken as they are (the fast path); lists are converted and validated.
        """
        if len(seq_ids) != len(token_ids):
            raise InvalidArgumentError(
                "token_ids", len(token_ids), f"need one token per sequence ({len(seq_ids)})"
            )
        sids = self._ids_array(seq_ids, "append_batch")
        bad = -1
        if isinstance(token_ids, np.ndarray) and token_ids.dtype == np.int64:
            toks = token_ids
        else:
            vals: list[int] = []
            for i, t in enumerate(token_ids):
                try:
                    vals.append(_check_token(t, "token_ids"))
                except InvalidArgumentError:
                    bad = i
                    break
            toks = np.array(vals + [0] * (len(token_ids) - len(vals)), dtype=np.int64)
        return self._append(sids, toks, bad, token_ids, "append_batch", seq_ids, "token_ids")

    def peek_append(
        self, seq_ids: Sequence[int] | NDArray[np.int64]
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]] | None:
        """The slots ``[N]`` that ``append_batch(seq_ids, tokens)`` would return now, whatever
        the tokens, and the free blocks ``[K]`` it would take (queue head first), without
        changing anything; None when that append would copy-on-write, run out of blocks, or a
        sequence is unknown, swapped out or repeated.

        The slot of an append does not depend on its token: a sequence whose length is a
        multiple of the block size takes the next block from the free queue's head, any other
        writes into its last block. The engine's overlapped scheduling launches a step with
        these slots before the tokens are known, then appends the tokens (which the block
        manager hashes into the prefix cache) with nothing changed in between.
        """
        a, bs = self._a, self._bs
        rows: list[int] = []
        for seq_id in np.asarray(seq_ids, dtype=np.int64).tolist():
            row = self._rows.get(seq_id)
            if row is None or a.swapped[row]:
                return None
            rows.append(row)
        if len(set(rows)) != len(rows):
            return None
        r = np.array(rows, dtype=np.int64)  # [N]
        t = a.num_tokens[r].astype(np.int64)  # [N]
        new = t % bs == 0  # [N] the appends that take a fresh block
        k = int(new.sum())
        if k > int(a.gpu_ends[COUNT]):
            return None
        old = ~new
        last = a.tables[r[old], t[old] // bs].astype(np.int64)  # [N - K]
        if last.size and int(a.gpu_pool[REF, last].max()) > 1:  # shared: copy-on-write
            return None
        fresh = np.empty(k, dtype=np.int64)  # [K]
        b = int(a.gpu_ends[HEAD])
        for j in range(k):
            fresh[j] = b
            b = int(a.gpu_pool[NEXT, b])
        slots = np.empty(r.shape[0], dtype=np.int64)  # [N]
        slots[old] = last * bs + t[old] % bs
        slots[new] = fresh * bs
        return slots, fresh

    def _append(
        self,
        sids: NDArray[np.int64],
        toks: NDArray[np.int64],
        bad: int,
        token_ids: Sequence[int] | NDArray[np.int64],
        operation: str,
        seq_ids: Sequence[int] | NDArray[np.int64],
        token_name: str,
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        n = sids.shape[0]
        if self._caching:
            self._reserve_pids(n)  # every append may fill a block
        slots = np.empty(n, dtype=np.int64)  # [N]
        pairs = np.empty((n, 2), dtype=np.int64)  # [N, 2], the first num_pairs rows written
        fill_hash = _EMPTY
        while True:
            if self._caching and not self._a.numba_hash:  # a Python hash: hash the fills first
                result = K.append_kernel(self._s, sids, toks, bad, _EMPTY, False, slots, pairs)
                if result.status == K.OK:
                    fill_hash = self._fill_hashes(sids, toks)
            result = K.append_kernel(self._s, sids, toks, bad, fill_hash, True, slots, pairs)
            if result.status != K.GROW:
                break
            self._ensure_width(2 * self._a.tables.shape[1])
        if result.status == K.OK:
            return slots, pairs[: result.num_pairs]
        self._raise_for(result, operation, seq_ids, token_name, token_ids)

    def _fill_hashes(self, sids: NDArray[np.int64], toks: NDArray[np.int64]) -> NDArray[np.int64]:
        """Hashes (by the Python ``hash_fn``) of the blocks a validated batch fills, in batch
        order: the append kernel's input under a Python hash."""
        a, bs = self._a, self._bs
        hashes: list[int] = []
        for seq_id, token in zip(sids.tolist(), toks.tolist()):
            row = self._rows[seq_id]
            t = int(a.num_tokens[row])
            if (t + 1) % bs:
                continue
            i = t // bs
            block = tuple(a.tokens[row, i * bs : t].tolist()) + (token,)
            parent = int(a.block_hash[row, i - 1]) if i > 0 else ROOT_PARENT_HASH
            hashes.append(self._hash_fn(parent, block, self._extra[row]))
        return np.array(hashes, dtype=np.int64)

    def mark_computed(self, seq_id: int, num_tokens: int) -> None:
        """The KV of the sequence's first ``num_tokens`` tokens is written; its full blocks
        below that count enter the prefix cache (the spec's checks and order)."""
        self.mark_computed_batch([seq_id], [num_tokens])

    def mark_computed_batch(
        self,
        seq_ids: Sequence[int] | NDArray[np.int64],
        num_tokens: Sequence[int] | NDArray[np.int64],
    ) -> None:
        """``mark_computed(seq_ids[i], num_tokens[i])`` in order, all or nothing (one kernel
        call: what the scheduler makes after every step)."""
        if len(seq_ids) != len(num_tokens):
            raise InvalidArgumentError(
                "num_tokens", len(num_tokens), f"need one count per sequence ({len(seq_ids)})"
            )
        sids = self._ids_array(seq_ids, "mark_computed_batch")
        if isinstance(num_tokens, np.ndarray) and num_tokens.dtype == np.int64:
            counts = num_tokens
        else:  # the spec's checks in Python, so a count that is no int is reported in order
            ids = sids.tolist()
            if len(set(ids)) != len(ids):
                raise InvalidArgumentError("seq_ids", list(seq_ids), "a sequence appears twice")
            vals: list[int] = []
            for seq_id, c in zip(ids, num_tokens):
                row = self._resident(seq_id, "mark_computed")
                lo, hi = int(self._a.num_computed[row]), int(self._a.num_tokens[row])
                try:
                    v = operator.index(c)
                except TypeError:
                    v = -1
                if isinstance(c, bool) or not lo <= v <= hi:
                    raise InvalidArgumentError("num_tokens", c, f"need {lo} <= num_tokens <= {hi}")
                vals.append(v)
            counts = np.array(vals, dtype=np.int64)
        result = K.mark_computed_kernel(self._s, sids, counts)
        status = result.status
        if status == K.OK:
            return
        if status == K.DUPLICATE:
            raise InvalidArgumentError("seq_ids", list(seq_ids), "a sequence appears twice")
        if status == K.UNKNOWN:
            raise UnknownSequenceError(int(result.seq_id))
        if status == K.SWAPPED:
            raise SequenceStateError(int(result.seq_id), True, "mark_computed")
        if status == K.BAD_COUNT:
            row = self._rows[int(result.seq_id)]
            k = int(result.bad_token)
            raise InvalidArgumentError(
                "num_tokens",
                int(counts[k]),
                f"need {int(self._a.num_computed[row])} <= num_tokens <= "
                f"{int(self._a.num_tokens[row])}",
            )
        raise AssertionError(f"mark_computed_kernel returned status {status}")

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (each refcount rises by one)."""
        self._check_new_id(child_id)
        prow = self._resident(parent_id, "fork")
        if child_id in self._rows:
            raise SequenceExistsError(child_id)
        crow = self._free_row()
        K.fork_kernel(self._s, prow, crow, child_id)
        self._take_row(child_id, crow, self._extra[prow])

    def free(self, seq_id: int) -> None:
        """Drop the sequence; its blocks are released in reverse logical order."""
        row = self._rows.get(seq_id)
        if row is None:
            if seq_id in self._freed:
                raise DoubleFreeError(seq_id)
            raise UnknownSequenceError(seq_id)
        K.free_kernel(self._s, row, seq_id)
        self._drop_row(seq_id, row)
        self._freed.add(seq_id)

    def swap_out(self, seq_id: int) -> list[tuple[int, int]]:
        """Move a resident sequence to the CPU pool; return ``(gpu, cpu)`` pairs to copy."""
        row = self._resident(seq_id, "swap_out")
        need = self._nblocks(row)
        if need > self.num_free_cpu_blocks:
            raise SwapOutError(need, self.num_free_cpu_blocks)
        mapping = K.swap_out_kernel(self._s, row)  # [nb, 2]
        return [(int(g), int(c)) for g, c in mapping.tolist()]

    def swap_in(self, seq_id: int) -> list[tuple[int, int]]:
        """Move a swapped-out sequence back; return ``(cpu, gpu)`` pairs to copy."""
        row = self._get(seq_id)
        if not self._a.swapped[row]:
            raise SequenceStateError(seq_id, False, "swap_in")
        need, free = self._nblocks(row), self.num_free_gpu_blocks
        if free - need < self._wm:
            raise SwapInError(need, free, self._wm)
        mapping = K.swap_in_kernel(self._s, row)  # [nb, 2]
        return [(int(c), int(g)) for c, g in mapping.tolist()]

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block whose refcount is 0 from the index; True if it is empty."""
        if not self._caching:
            return True
        return int(K.reset_cache_kernel(self._s)) == 0

    def gather(
        self, seq_ids: Sequence[int] | NDArray[np.int64]
    ) -> tuple[NDArray[np.int32], NDArray[np.int32]]:
        """Block tables ``[B, W]`` (int32, zero padded) and lengths ``[B]`` for a GPU step."""
        sids = self._ids_array(seq_ids, "gather")
        lens = np.empty(sids.shape[0], dtype=np.int32)  # [B]
        tables = K.gather_kernel(self._s, sids, lens)
        if tables is None:
            raise UnknownSequenceError(next(s for s in sids.tolist() if s not in self._rows))
        return tables, lens

    # ------------------------------------------------------------------ invariants
    def check_integrity(self) -> None:
        """Raise AssertionError unless every invariant of the arrays holds."""
        check_integrity(self._a, self._rows, self._freed, self._extra, self._hash_fn)
