"""The fast block manager: the spec's policy, with its state in numpy arrays and numba kernels.

Observably identical to :class:`spec.block_manager.BlockManager` (same block ids, copy-on-write
pairs, swap maps, evictions and exceptions; unchanged state after an error), which
``python -m conformance --impl fast`` checks. The layout of the arrays is described in
:mod:`fast.blocks.kernels`; this module validates arguments in the spec's order, maps external
sequence ids to rows, grows the arrays by doubling, and computes block hashes (in Python, only
when a block fills) for the prefix cache.

>>> from fast.blocks.manager import BlockManager, BlockManagerConfig
>>> bm = BlockManager(BlockManagerConfig(block_size=4, num_gpu_blocks=8))
>>> bm.allocate(0, [10, 11, 12, 13, 14])
0
>>> bm.block_table(0), bm.slot_mapping(0, 0, 5)
([0, 1], [0, 1, 2, 3, 4])
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fast.blocks import kernels as K
from fast.blocks.hash import chain_hashes_nb, scratch_for
from fast.blocks.prefix_ids import PrefixIds, intern_chain
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
# per-row arrays read only below the row's token / full-block count: grown without zeroing
# (zeroing megabytes of fresh pages was most of a first batch's cost)
_UNREAD_PAST_END = ("_toks", "_bhash", "_bpid")


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
        raise InvalidArgumentError(name, token, "token ids must be ints in [0, 2**63)")
    return value


def _tokens_array(token_ids: Sequence[int] | NDArray[Any], name: str) -> NDArray[np.int64]:
    """``token_ids`` as int64 ``[n]``, validated as the spec does (first bad token raises)."""
    if isinstance(token_ids, np.ndarray) and token_ids.dtype == np.int64 and token_ids.ndim == 1:
        if token_ids.size and token_ids.min() < 0:
            bad = np.flatnonzero(token_ids < 0)
            raise InvalidArgumentError(
                name, int(token_ids[bad[0]]), "token ids must be ints in [0, 2**63)"
            )
        return token_ids
    return np.array([_check_token(t, name) for t in token_ids], dtype=np.int64)


class BlockManager:
    """Array-backed block manager, a drop-in for ``spec.block_manager.BlockManager``.

    ``hash_fn`` (keyword only) is the block content hash, as in the spec (tests plant
    collisions with it). Besides the spec's operations it offers :meth:`gather` (the int32
    block tables and lengths a GPU kernel takes) and :meth:`allocate_batch`.
    """

    def __init__(self, config: BlockManagerConfig, *, hash_fn: HashFn = hash_block_tokens) -> None:
        if not isinstance(config, BlockManagerConfig):
            raise InvalidArgumentError("config", config, "must be a BlockManagerConfig")
        self.config = config
        self._bs = bs = config.block_size
        self._wm = config.watermark_blocks
        self._caching = config.enable_prefix_caching
        self._hash_fn = hash_fn
        self._nb_hash = hash_fn is hash_block_tokens  # hash in numba, bit for bit the same
        g, c = config.num_gpu_blocks, config.num_cpu_blocks
        self._gpool = self._new_pool(g)  # [3, G]: refcount, next, prev
        self._cpool = self._new_pool(c)  # [3, C]
        self._meta = np.array([0, g - 1, g, 0 if c else -1, c - 1, c], dtype=np.int64)
        self._ent = np.full((2, g), -1, dtype=np.int64)  # [2, G]: hash, prefix id
        cap = _pow2_at_least(2 * g + 1)
        self._ikeys = np.full(cap, -1, dtype=np.int64)  # hash index
        self._ivals = np.full(cap, -1, dtype=np.int32)
        self._drop = np.zeros(g, dtype=np.int32)  # scratch for append_kernel
        # live prefix ids are at most the cached blocks plus the live full blocks (<= g + c):
        # start at that bound (up to 2**16 nodes) so that serving rarely collects or grows
        self._pids = PrefixIds(bs, _pow2_at_least(min(g + c, 1 << 16)) if self._caching else 8)
        self._xids: dict[str, int] = {}  # extra key -> id; UTF-8 bytes in _xbytes[_xoff[id]:]
        self._xbytes = np.zeros(0, dtype=np.uint8)
        self._xoff = np.zeros(1, dtype=np.int64)
        self._hscratch = scratch_for(bs, 0)
        # per-row state; grown by doubling
        rows, width = 8, 4
        self._tables = np.zeros((rows, width), dtype=np.int32)  # [R, W] block ids
        self._toks = np.zeros((rows, width * bs), dtype=np.int64)  # [R, T] token ids
        self._bhash = np.zeros((rows, width), dtype=np.int64)  # [R, W] full-block hashes
        self._bpid = np.zeros((rows, width), dtype=np.int64)  # [R, W] full-block prefix ids
        self._ntok = np.zeros(rows, dtype=np.int64)  # [R]
        self._swapped = np.zeros(rows, dtype=np.uint8)  # [R]
        self._xid = np.full(rows, -1, dtype=np.int64)  # [R] extra key id, -1 = none
        self._rstamp = np.zeros(rows, dtype=np.int32)  # scratch for append_kernel
        self._extra: list[str | None] = [None] * rows
        self._free_rows = list(range(rows - 1, -1, -1))
        self._skeys = np.full(16, -1, dtype=np.int64)  # seq id -> row
        self._svals = np.full(16, -1, dtype=np.int32)
        self._rows: dict[int, int] = {}
        self._freed: set[int] = set()
        self._info = np.zeros(4, dtype=np.int64)

    @staticmethod
    def _new_pool(n: int) -> NDArray[np.int32]:
        pool = np.zeros((3, n), dtype=np.int32)
        pool[1] = np.arange(1, n + 1, dtype=np.int32)
        if n:
            pool[1, n - 1] = -1
        pool[2] = np.arange(-1, n - 1, dtype=np.int32)
        return pool

    # ------------------------------------------------------------------ growth
    def _ensure_width(self, blocks: int) -> None:
        """Room for ``blocks`` blocks (and their tokens) in every row."""
        w = self._tables.shape[1]
        if blocks <= w:
            return
        while w < blocks:
            w *= 2
        r = self._tables.shape[0]
        for name, cols in (("_tables", w), ("_bhash", w), ("_bpid", w), ("_toks", w * self._bs)):
            old = getattr(self, name)
            new = (np.empty if name in _UNREAD_PAST_END else np.zeros)((r, cols), dtype=old.dtype)
            new[:, : old.shape[1]] = old
            setattr(self, name, new)

    def _new_row(self, seq_id: int) -> int:
        """A free row for ``seq_id``, registered in both id maps."""
        if not self._free_rows:
            self._grow_rows()
        row = self._free_rows.pop()
        if 2 * (len(self._rows) + 1) > len(self._skeys):
            self._rehash_ids(2 * len(self._skeys))
        K.oa_insert(self._skeys, self._svals, seq_id, row)
        self._rows[seq_id] = row
        return row

    def _grow_rows(self, free_needed: int = 1) -> None:
        """Double the number of rows until ``free_needed`` rows are free, in one copy (the new
        rows are free and used last)."""
        r = new_r = self._tables.shape[0]
        while new_r - r + len(self._free_rows) < free_needed:
            new_r *= 2
        names = ("_tables", "_toks", "_bhash", "_bpid", "_ntok", "_swapped", "_rstamp", "_xid")
        for name in names:
            old = getattr(self, name)
            new = np.empty((new_r,) + old.shape[1:], dtype=old.dtype)
            new[:r] = old
            if name not in _UNREAD_PAST_END:
                new[r:] = -1 if name == "_xid" else 0
            setattr(self, name, new)
        self._extra.extend([None] * (new_r - r))
        self._free_rows = list(range(new_r - 1, r - 1, -1)) + self._free_rows

    def _drop_row(self, seq_id: int, row: int) -> None:
        K.oa_delete(self._skeys, self._svals, seq_id)
        del self._rows[seq_id]
        self._extra[row] = None
        self._xid[row] = -1
        self._free_rows.append(row)

    def _rehash_ids(self, cap: int) -> None:
        self._skeys = np.full(cap, -1, dtype=np.int64)
        self._svals = np.full(cap, -1, dtype=np.int32)
        for seq_id, row in self._rows.items():
            K.oa_insert(self._skeys, self._svals, seq_id, row)

    # ------------------------------------------------------------------ queries
    @property
    def num_free_gpu_blocks(self) -> int:
        """GPU blocks in the free queue (including cached blocks with refcount 0)."""
        return int(self._meta[K.G_FREE])

    @property
    def num_free_cpu_blocks(self) -> int:
        """CPU blocks not holding a swapped-out sequence."""
        return int(self._meta[K.C_FREE])

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
        if self._swapped[row]:
            raise SequenceStateError(seq_id, True, operation)
        return row

    def _nblocks(self, row: int) -> int:
        return -(-int(self._ntok[row]) // self._bs)

    def num_tokens(self, seq_id: int) -> int:
        """Tokens held by the sequence. Raises UnknownSequenceError."""
        return int(self._ntok[self._get(seq_id)])

    def token_ids(self, seq_id: int) -> list[int]:
        """A copy of the sequence's token ids. Raises UnknownSequenceError."""
        row = self._get(seq_id)
        return list(self._toks[row, : self._ntok[row]].tolist())

    def block_table(self, seq_id: int) -> list[int]:
        """Physical block ids in logical order (CPU ids while swapped out)."""
        row = self._get(seq_id)
        return list(self._tables[row, : self._nblocks(row)].tolist())

    def slot_mapping(self, seq_id: int, start: int, end: int) -> list[int]:
        """Slots ``block * bs + offset`` of tokens ``start..end-1`` of a resident sequence."""
        row = self._resident(seq_id, "slot_mapping")
        n = int(self._ntok[row])
        if not (_is_int(start) and _is_int(end) and 0 <= start <= end <= n):
            raise InvalidArgumentError("start, end", (start, end), f"need 0 <= start <= end <= {n}")
        t = np.arange(start, end, dtype=np.int64)  # [end - start]
        slots = self._tables[row, t // self._bs].astype(np.int64) * self._bs + t % self._bs
        return list(slots.tolist())

    def is_swapped(self, seq_id: int) -> bool:
        """True when the sequence lives in the CPU pool. Raises UnknownSequenceError."""
        return bool(self._swapped[self._get(seq_id)])

    def refcount(self, block: int) -> int:
        """How many live resident sequences reference GPU ``block``."""
        return int(self._gpool[0, block])

    def free_block_order(self) -> list[int]:
        """The GPU free queue, head (next block to be taken) first."""
        out: list[int] = []
        b = int(self._meta[K.G_HEAD])
        while b >= 0:
            out.append(b)
            b = int(self._gpool[1, b])
        return out

    def cached_blocks(self) -> list[int]:
        """GPU blocks registered in the prefix cache, ascending."""
        return list(np.flatnonzero(self._ent[1] >= 0).tolist())

    def sequence_ids(self) -> list[int]:
        """Live sequence ids, ascending."""
        return sorted(self._rows)

    def can_allocate(self, token_ids: Sequence[int], extra_key: str | None = None) -> bool:
        """Whether ``allocate`` of this prompt would succeed now (with the watermark)."""
        tokens = self._check_prompt(token_ids)
        self._check_extra_key(extra_key)
        hashes, pids = self._chain(tokens, extra_key, create=False)
        status = self._allocate_call(0, tokens, hashes, pids, mutate=False)
        return status == K.OK

    def can_append(self, seq_ids: Sequence[int]) -> bool:
        """Whether ``append_batch`` of one token to each of ``seq_ids`` would succeed now."""
        sids = self._ids_array(seq_ids, "can_append")
        empty = np.zeros(0, dtype=np.int64)
        status = self._append_call(sids, empty, -1, empty, False, mutate=False)
        if status not in (K.OK, K.NO_BLOCKS):
            self._raise_batch(status, seq_ids, "can_append")
        return status == K.OK

    def can_swap_in(self, seq_id: int, num_new_tokens: int = 1) -> bool:
        """Whether the swapped-out sequence fits back with ``num_new_tokens`` more tokens."""
        row = self._get(seq_id)
        if not self._swapped[row]:
            raise SequenceStateError(seq_id, False, "can_swap_in")
        if not _is_int(num_new_tokens) or num_new_tokens < 0:
            raise InvalidArgumentError("num_new_tokens", num_new_tokens, "must be an int >= 0")
        need = -(-(int(self._ntok[row]) + num_new_tokens) // self._bs)
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
        """The id of an extra key (-1 for None), adding its bytes to the arena if new."""
        if extra_key is None:
            return -1
        x = self._xids.get(extra_key)
        if x is None:
            data = np.frombuffer(extra_key.encode("utf-8"), dtype=np.uint8)
            x = len(self._xids)
            self._xids[extra_key] = x
            self._xbytes = np.concatenate([self._xbytes, data])
            self._xoff = np.append(self._xoff, self._xbytes.shape[0])
            self._hscratch = scratch_for(self._bs, int(np.diff(self._xoff).max()))
        return x

    def _key_bytes(self, x: int) -> NDArray[np.uint8]:
        return self._xbytes[self._xoff[x] : self._xoff[x + 1]] if x >= 0 else self._xbytes[:0]

    def _live_pids(self) -> NDArray[np.int64]:
        """Prefix ids referenced by cached blocks and by the full blocks of live rows."""
        if not self._caching:
            return np.zeros(0, dtype=np.int64)
        cols = np.arange(self._bpid.shape[1])[None, :]  # [1, W]
        mask = cols < (self._ntok // self._bs)[:, None]  # [R, W]
        return np.concatenate([self._ent[1][self._ent[1] >= 0], self._bpid[mask]])

    def _chain(
        self, tokens: NDArray[np.int64], extra_key: str | None, create: bool
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Hashes and prefix ids ``[n // bs]`` of the full blocks (empty with caching off)."""
        if not self._caching:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        bs = self._bs
        x = self._extra_id(extra_key)
        if self._nb_hash:
            hashes = chain_hashes_nb(tokens, bs, self._key_bytes(x), x >= 0)
        else:
            hashes = np.array(
                chain_hashes(tokens.tolist(), bs, extra_key, self._hash_fn), dtype=np.int64
            )
        if create:
            self._pids.reserve(hashes.shape[0], self._live_pids)
        pids = intern_chain(tokens, bs, hashes, x, create, *self._pids.args())
        return hashes, pids

    def _ids_array(
        self, seq_ids: Sequence[int] | NDArray[Any], operation: str
    ) -> NDArray[np.int64]:
        """``seq_ids`` as int64 ``[N]``; ids no row can have are reported in the spec's order."""
        if isinstance(seq_ids, np.ndarray) and seq_ids.dtype == np.int64:
            return seq_ids
        if all(isinstance(s, int) and -(1 << 63) <= s <= _INT64_MAX for s in seq_ids):
            return np.array(seq_ids, dtype=np.int64).reshape(-1)
        if len(set(seq_ids)) != len(seq_ids):
            raise InvalidArgumentError("seq_ids", list(seq_ids), "a sequence appears twice")
        for seq_id in seq_ids:
            self._resident(seq_id, operation)
        raise AssertionError("unreachable: an id that is no int64 cannot be live")

    # ------------------------------------------------------------------ kernel calls
    def _allocate_call(
        self,
        row: int,
        tokens: NDArray[np.int64],
        hashes: NDArray[np.int64],
        pids: NDArray[np.int64],
        mutate: bool,
    ) -> int:
        hits = np.empty(hashes.shape[0], dtype=np.int32)
        return int(
            K.allocate_kernel(
                self._bs, self._wm, row, tokens, hashes, pids, mutate,
                self._gpool, self._meta, self._ent, self._ikeys, self._ivals,
                self._tables, self._ntok, self._toks, self._bhash, self._bpid, hits, self._info,
            )
        )  # fmt: skip

    def _append_call(
        self,
        sids: NDArray[np.int64],
        toks: NDArray[np.int64],
        bad_token: int,
        fill_hash: NDArray[np.int64],
        nb_hash: bool,
        mutate: bool,
        slots: NDArray[np.int64] | None = None,
        pairs: NDArray[np.int64] | None = None,
    ) -> int:
        n = sids.shape[0]
        self._arows = rows = np.empty(n, dtype=np.int32)
        self._afills = fills = np.empty(n, dtype=np.int32)
        if slots is None or pairs is None:
            slots = np.empty(0, dtype=np.int64)
            pairs = np.empty((0, 2), dtype=np.int64)
        return int(
            K.append_kernel(
                self._bs, mutate, sids, toks, bad_token, fill_hash, nb_hash, self._xid,
                self._xbytes, self._xoff, self._hscratch, *self._pids.args(), self._gpool,
                self._meta, self._ent, self._ikeys, self._ivals,
                self._skeys, self._svals, self._tables, self._ntok, self._toks, self._swapped,
                self._bhash, self._bpid, self._caching, rows, fills, self._rstamp, self._drop,
                slots, pairs, self._info,
            )
        )  # fmt: skip

    def _raise_batch(
        self, status: int, seq_ids: Sequence[int] | NDArray[np.int64], operation: str
    ) -> None:
        info = self._info
        if status == K.DUPLICATE:
            raise InvalidArgumentError("seq_ids", list(seq_ids), "a sequence appears twice")
        if status == K.UNKNOWN:
            raise UnknownSequenceError(int(info[0]))
        if status == K.SWAPPED:
            raise SequenceStateError(int(info[0]), True, operation)
        if status == K.NO_BLOCKS:
            raise OutOfBlocksError(int(info[0]), int(info[1]))
        raise AssertionError(f"unexpected kernel status {status}")

    # ------------------------------------------------------------------ operations
    def allocate(
        self,
        seq_id: int,
        token_ids: Sequence[int] | NDArray[np.int64],
        extra_key: str | None = None,
    ) -> int:
        """Give a new sequence blocks for its whole prompt; return its cached-token count.

        Same checks, order and policy as ``spec.block_manager.BlockManager.allocate``. An
        int64 numpy array is taken as it is (the fast path); a list is validated token by token.
        """
        return self.allocate_batch([seq_id], [token_ids], [extra_key])[0]

    def allocate_batch(
        self,
        seq_ids: Sequence[int],
        prompts: Sequence[Sequence[int] | NDArray[np.int64]],
        extra_keys: Sequence[str | None] | None = None,
    ) -> list[int]:
        """``allocate`` each prompt in order, in one kernel call; returns the cached-token counts.

        Equivalent to the calls one by one: on an error the earlier ones stay done and the
        error is the one that call would raise.
        """
        keys: list[str | None] = (
            list(extra_keys) if extra_keys is not None else [None] * len(prompts)
        )
        arrays: list[NDArray[np.int64]] = []
        error: Exception | None = None
        for seq_id, prompt, key in zip(seq_ids, prompts, keys):
            try:  # the spec's order: id, tokens, extra key (then exists, then blocks)
                self._check_new_id(seq_id)
                if (
                    isinstance(prompt, np.ndarray)
                    and prompt.dtype == np.int64
                    and prompt.ndim == 1
                    and prompt.shape[0] > 0
                ):
                    tokens = prompt  # negative tokens are reported by the kernel
                else:
                    tokens = self._check_prompt(prompt)
                if key is not None and not isinstance(key, str):
                    self._check_prompt(prompt)  # a bad token is reported first
                    self._check_extra_key(key)
            except InvalidArgumentError as exc:
                error = exc  # raised after the prompts before it are allocated
                break
            arrays.append(tokens)
        b = len(arrays)
        done = self._allocate_run(list(seq_ids[:b]), arrays, keys[:b])
        if error is not None:
            raise error
        return done

    def _allocate_run(
        self, seq_ids: list[int], arrays: list[NDArray[np.int64]], keys: list[str | None]
    ) -> list[int]:
        b = len(arrays)
        if b == 0:
            return []
        bs = self._bs
        lens = np.fromiter((a.shape[0] for a in arrays), dtype=np.int64, count=b)
        offs = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(lens, out=offs[1:])
        flat = np.concatenate(arrays) if b > 1 else arrays[0]
        xreq = np.fromiter((self._extra_id(k) for k in keys), dtype=np.int64, count=b)
        sids = np.array(seq_ids, dtype=np.int64)
        # capacity for the whole batch: widths, rows, id map, prefix-id nodes
        self._ensure_width(int(-(-lens.max() // bs)))
        if len(self._free_rows) < b:
            self._grow_rows(b)
        if 2 * (len(self._rows) + b) > len(self._skeys):
            cap = len(self._skeys)
            while 2 * (len(self._rows) + b) > cap:
                cap *= 2
            self._rehash_ids(cap)
        precomputed = self._caching and not self._nb_hash
        empty = np.zeros(0, dtype=np.int64)
        hin = pin = empty
        hoffs = np.zeros(b + 1, dtype=np.int64)
        if self._caching:
            np.cumsum(lens // bs, out=hoffs[1:])
            self._pids.reserve(int(hoffs[-1]), self._live_pids)
            if precomputed:
                chains = [self._chain(a, k, create=True) for a, k in zip(arrays, keys)]
                hin = np.concatenate([c[0] for c in chains])
                pin = np.concatenate([c[1] for c in chains])
        rows_avail = np.array(self._free_rows[::-1][:b], dtype=np.int32)
        cached = np.zeros(b, dtype=np.int64)
        status = K.allocate_batch_kernel(
            bs, self._wm, self._caching, precomputed, sids, flat, offs, xreq, hin, pin, hoffs,
            self._xbytes, self._xoff, self._hscratch, *self._pids.args(), self._gpool,
            self._meta, self._ent, self._ikeys, self._ivals, self._skeys, self._svals,
            self._tables, self._ntok, self._toks, self._bhash, self._bpid, self._xid,
            rows_avail, cached, self._info,
        )  # fmt: skip
        m = int(self._info[3])
        if m:
            del self._free_rows[len(self._free_rows) - m :]
        for k in range(m):
            row = int(rows_avail[k])
            self._rows[seq_ids[k]] = row
            self._extra[row] = keys[k]
            self._freed.discard(seq_ids[k])
        if status == K.EXISTS:
            raise SequenceExistsError(seq_ids[m])
        if status == K.BAD_TOKEN:
            bad = int(flat[int(self._info[0])])
            raise InvalidArgumentError("token_ids", bad, "token ids must be ints in [0, 2**63)")
        if status == K.NO_BLOCKS:
            raise OutOfBlocksError(int(self._info[0]), int(self._info[1]), self._wm)
        return list(cached.tolist())

    def append(self, seq_id: int, token_id: int) -> tuple[int, int] | None:
        """Append one token; return ``(src, dst)`` when it forced a copy-on-write."""
        self._resident(seq_id, "append")
        token = _check_token(token_id, "token_id")
        sids = np.array([seq_id], dtype=np.int64)
        toks = np.array([token], dtype=np.int64)
        _, pairs = self._append(sids, toks, -1, [seq_id], "append", single=True)
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
        return self._append(sids, toks, bad, token_ids, "append_batch", seq_ids=seq_ids)

    def _append(
        self,
        sids: NDArray[np.int64],
        toks: NDArray[np.int64],
        bad: int,
        token_ids: Sequence[int] | NDArray[np.int64],
        operation: str,
        single: bool = False,
        seq_ids: Sequence[int] | NDArray[np.int64] | None = None,
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        n = sids.shape[0]
        slots = np.empty(n, dtype=np.int64)  # [N]
        pairs = np.empty((n, 2), dtype=np.int64)  # [N, 2], first info[3] rows used
        fill_hash = np.zeros(0, dtype=np.int64)
        if self._caching:
            self._pids.reserve(n, self._live_pids)  # every append may fill a block
        while True:
            if self._caching and not self._nb_hash:  # a Python hash: hash the fills first
                status = self._append_call(sids, toks, bad, fill_hash, False, False)
                if status == K.OK:
                    fill_hash = self._fill_hashes(toks)
                    status = self._append_call(
                        sids, toks, bad, fill_hash, False, True, slots, pairs
                    )
            else:
                status = self._append_call(sids, toks, bad, fill_hash, True, True, slots, pairs)
            if status != K.GROW:
                break
            self._ensure_width(2 * self._tables.shape[1])
        if status == K.OK:
            return slots, pairs[: int(self._info[3])]
        if status == K.BAD_TOKEN:
            t = token_ids[int(self._info[0])]
            _check_token(t, "token_id" if single else "token_ids")
            raise InvalidArgumentError("token_ids", t, "token ids must be ints in [0, 2**63)")
        self._raise_batch(status, list(seq_ids if seq_ids is not None else sids), operation)
        raise AssertionError("unreachable")

    def _fill_hashes(self, toks: NDArray[np.int64]) -> NDArray[np.int64]:
        """Hashes (by the Python ``hash_fn``) of the blocks the validated batch will fill."""
        nfill = int(self._info[2])
        fill_hash = np.empty(nfill, dtype=np.int64)
        bs = self._bs
        for f in range(nfill):
            k = int(self._afills[f])
            row = int(self._arows[k])
            t = int(self._ntok[row])
            i = t // bs
            block = tuple(self._toks[row, i * bs : t].tolist()) + (int(toks[k]),)
            parent = int(self._bhash[row, i - 1]) if i > 0 else ROOT_PARENT_HASH
            fill_hash[f] = self._hash_fn(parent, block, self._extra[row])
        return fill_hash

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (each refcount rises by one)."""
        self._check_new_id(child_id)
        prow = self._resident(parent_id, "fork")
        if child_id in self._rows:
            raise SequenceExistsError(child_id)
        crow = self._new_row(child_id)
        K.fork_kernel(
            self._bs, prow, crow, self._gpool, self._tables, self._ntok, self._toks,
            self._swapped, self._bhash, self._bpid,
        )  # fmt: skip
        self._extra[crow] = self._extra[prow]
        self._xid[crow] = self._xid[prow]
        self._freed.discard(child_id)

    def free(self, seq_id: int) -> None:
        """Drop the sequence; its blocks are released in reverse logical order."""
        row = self._rows.get(seq_id)
        if row is None:
            if seq_id in self._freed:
                raise DoubleFreeError(seq_id)
            raise UnknownSequenceError(seq_id)
        K.free_kernel(
            self._bs, row, self._gpool, self._cpool, self._meta, self._tables, self._ntok,
            self._swapped,
        )  # fmt: skip
        self._drop_row(seq_id, row)
        self._freed.add(seq_id)

    def free_batch(self, seq_ids: Sequence[int] | NDArray[np.int64]) -> None:
        """``free`` each sequence in order, in one kernel call; on an error (unknown id or
        double free) the earlier ones stay freed and the error is the one ``free`` raises."""
        ids = [int(s) for s in seq_ids] if isinstance(seq_ids, np.ndarray) else list(seq_ids)
        if not all(_is_int(s) for s in ids):
            for s in ids:  # the slow path: exactly the single calls
                self.free(s)
            return
        sids = np.array(ids, dtype=np.int64)
        rows = np.empty(len(ids), dtype=np.int32)
        m = int(
            K.free_batch_kernel(
                self._bs, sids, self._gpool, self._cpool, self._meta, self._skeys, self._svals,
                self._tables, self._ntok, self._swapped, self._xid, rows,
            )
        )  # fmt: skip
        for k in range(m):
            row = self._rows.pop(ids[k])
            self._extra[row] = None
            self._free_rows.append(row)
            self._freed.add(ids[k])
        if m < len(ids):
            self.free(ids[m])  # raises DoubleFreeError or UnknownSequenceError
            raise AssertionError("unreachable: the id is unknown")

    def fork_batch(self, parent_ids: Sequence[int], child_ids: Sequence[int]) -> None:
        """``fork`` each ``(parent, child)`` in order, in one kernel call; on an error the
        earlier forks stay done and the error is the one ``fork`` raises."""
        b = 0
        for child in child_ids:
            if not (_is_int(child) and 0 <= child <= _INT64_MAX):
                break
            b += 1
        if not all(_is_int(p) for p in parent_ids[:b]):
            for p, c in zip(parent_ids, child_ids):  # the slow path: exactly the single calls
                self.fork(p, c)
            return
        if len(self._free_rows) < b:
            self._grow_rows(b)
        if 2 * (len(self._rows) + b) > len(self._skeys):
            cap = len(self._skeys)
            while 2 * (len(self._rows) + b) > cap:
                cap *= 2
            self._rehash_ids(cap)
        parents = np.array(parent_ids[:b], dtype=np.int64)
        children = np.array(child_ids[:b], dtype=np.int64)
        rows_avail = np.array(self._free_rows[::-1][:b], dtype=np.int32)
        status = K.fork_batch_kernel(
            self._bs, parents, children, self._gpool, self._skeys, self._svals, self._tables,
            self._ntok, self._toks, self._swapped, self._bhash, self._bpid, self._xid,
            rows_avail, self._info,
        )  # fmt: skip
        m = int(self._info[3]) if b else 0
        if m:
            del self._free_rows[len(self._free_rows) - m :]
        for k in range(m):
            row = int(rows_avail[k])
            self._rows[child_ids[k]] = row
            self._extra[row] = self._extra[self._rows[parent_ids[k]]]
            self._freed.discard(child_ids[k])
        if status != K.OK or m < len(child_ids):
            self.fork(parent_ids[m], child_ids[m])  # raises the error of the single call
            raise AssertionError("unreachable: the fork above must fail")

    def swap_out(self, seq_id: int) -> list[tuple[int, int]]:
        """Move a resident sequence to the CPU pool; return ``(gpu, cpu)`` pairs to copy."""
        row = self._resident(seq_id, "swap_out")
        need = self._nblocks(row)
        if need > self.num_free_cpu_blocks:
            raise SwapOutError(need, self.num_free_cpu_blocks)
        mapping = np.empty((need, 2), dtype=np.int64)  # [nb, 2]
        K.swap_out_kernel(
            self._bs, row, self._gpool, self._cpool, self._meta, self._tables, self._ntok,
            self._swapped, mapping,
        )  # fmt: skip
        return [(int(g), int(c)) for g, c in mapping.tolist()]

    def swap_in(self, seq_id: int) -> list[tuple[int, int]]:
        """Move a swapped-out sequence back; return ``(cpu, gpu)`` pairs to copy."""
        row = self._get(seq_id)
        if not self._swapped[row]:
            raise SequenceStateError(seq_id, False, "swap_in")
        need, free = self._nblocks(row), self.num_free_gpu_blocks
        if free - need < self._wm:
            raise SwapInError(need, free, self._wm)
        mapping = np.empty((need, 2), dtype=np.int64)  # [nb, 2]
        K.swap_in_kernel(
            self._bs, row, self._caching, self._gpool, self._cpool, self._meta, self._ent,
            self._ikeys, self._ivals, self._tables, self._ntok, self._swapped, self._bhash,
            self._bpid, mapping,
        )  # fmt: skip
        return [(int(c), int(g)) for c, g in mapping.tolist()]

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block whose refcount is 0 from the index; True if it is empty."""
        if not self._caching:
            return True
        return int(K.reset_cache_kernel(self._gpool, self._ent, self._ikeys, self._ivals)) == 0

    def gather(
        self, seq_ids: Sequence[int] | NDArray[np.int64]
    ) -> tuple[NDArray[np.int32], NDArray[np.int32]]:
        """Block tables ``[B, W]`` (int32, zero padded) and lengths ``[B]`` for a GPU step."""
        sids = self._ids_array(seq_ids, "gather")
        bad, tables, lens = K.gather_kernel(
            self._bs, self._skeys, self._svals, sids, self._tables, self._ntok
        )
        if bad >= 0:
            raise UnknownSequenceError(int(sids[bad]))
        return tables, lens

    def decode_step(
        self, seq_ids: NDArray[np.int64], token_ids: NDArray[np.int64]
    ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int32], NDArray[np.int32]]:
        """``append_batch`` then ``gather``: slots ``[N]``, CoW pairs ``[M, 2]``, block tables
        ``[N, W]`` and lengths ``[N]`` for the GPU step; one kernel call when both arguments are
        int64 arrays and the hash is the spec's default. Same results and errors as the two
        calls."""
        fast_path = (
            (self._nb_hash or not self._caching)
            and isinstance(seq_ids, np.ndarray)
            and seq_ids.dtype == np.int64
            and isinstance(token_ids, np.ndarray)
            and token_ids.dtype == np.int64
            and seq_ids.shape == token_ids.shape
        )
        if fast_path:
            n = seq_ids.shape[0]
            if self._caching:
                self._pids.reserve(n, self._live_pids)  # every append may fill a block
            while True:
                slots = np.empty(n, dtype=np.int64)  # [N]
                pairs = np.empty((n, 2), dtype=np.int64)  # [N, 2]
                status, tables, lens = K.decode_kernel(
                    self._bs, seq_ids, token_ids, self._caching, self._xid, self._xbytes,
                    self._xoff, self._hscratch, *self._pids.args(), self._gpool, self._meta,
                    self._ent,
                    self._ikeys, self._ivals, self._skeys, self._svals, self._tables, self._ntok,
                    self._toks, self._swapped, self._bhash, self._bpid, np.empty(n, np.int32),
                    self._rstamp, self._drop, slots, pairs, self._info,
                )  # fmt: skip
                if status != K.GROW:
                    break
                self._ensure_width(2 * self._tables.shape[1])
            if status == K.OK:
                return slots, pairs[: int(self._info[3])], tables, lens
        slots, pairs = self.append_batch(seq_ids, token_ids)  # raises the error, if any
        tables, lens = self.gather(seq_ids)
        return slots, pairs, tables, lens

    # ------------------------------------------------------------------ invariants
    def check_integrity(self) -> None:
        """Raise AssertionError unless every invariant of the arrays holds."""
        from fast.blocks.integrity import check_integrity

        check_integrity(self)
