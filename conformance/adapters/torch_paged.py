"""Adapters: PyTorch's experimental ``PagedAttention`` (block tables) and FlexAttention over it.

Two implementations live in ``torch.nn.attention.experimental._paged_attention.PagedAttention``
and ``torch.nn.attention.flex_attention``; both are imported lazily (inside the adapters), so
importing this module imports neither torch's experimental code nor triton.

:class:`TorchPagedAdapter` (the block suite, semantic mode)
    ``reserve`` gives a batch slot room for a prompt or one more token, ``assign`` writes K/V
    through the page table, ``erase`` frees the slot. The KV is read back the way FlexAttention
    sees it: through ``get_score_mod``, the conversion from physical KV index to logical index
    that the paged block mask and score_mod use (``physical_to_logical``), and it must also
    agree with the page table ``assign`` wrote through. PagedAttention has no reference counts,
    prefix cache, fork, copy-on-write or swap: those checks are skipped and listed.

:class:`TorchFlexAttention` (the attention suite)
    For each call, a fresh ``PagedAttention`` lays the batch out in its own pages (``reserve`` +
    ``assign`` of each sequence's K/V, read from pagedkv's block tables), a logical block mask
    (causal after the prefix, the sequence's length, the sliding window) is built with
    ``create_block_mask`` and converted with ``convert_logical_block_mask``, the soft-cap is a
    score_mod converted with ``get_score_mod``, and ``flex_attention`` runs on the physical
    cache with ``enable_gqa``: eager on the CPU, ``torch.compile``d on CUDA.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from conformance.adapters.semantic import Capabilities, Defect, NoRoom
from conformance.attention.cases import CaseLimits

__all__ = [
    "TorchPagedAdapter",
    "TorchFlexAttention",
    "versions",
    "make_factory",
    "STALE_MAPPING",
]

#: The defect the block suite finds in torch's PagedAttention (see docs/conformance-others.md).
STALE_MAPPING = "physical_to_logical"


def versions() -> dict[str, str]:
    """The exact versions the adapters run against."""
    return {"torch": torch.__version__}


def _paged_attention_class() -> Any:
    from torch.nn.attention.experimental._paged_attention import PagedAttention

    return PagedAttention


def _bounded(method: Any, *args: Any, kv_len: torch.Tensor) -> Any:
    """``method(*args, kv_len)`` where this torch's ``PagedAttention`` takes the KV lengths.

    Releases differ: 2.13 passes ``kv_len`` to ``convert_logical_block_mask`` /
    ``get_mask_mod`` / ``get_score_mod``; some earlier ones bound by the ``seq_lens`` that
    ``reserve`` records, and the first ones did not bound at all. The logical masks built here
    bound by length themselves, so every variant sees the same visible keys.
    """
    if "kv_len" in inspect.signature(method).parameters:
        return method(*args, kv_len=kv_len)
    return method(*args)


class TorchPagedAdapter:
    """One ``PagedAttention`` (``max_batch_size`` slots; a sequence id is its batch slot).

    ``clear_stale_mapping`` applies the workaround for the defect this suite finds (``erase``
    leaves the erased slot's ``physical_to_logical`` row in place): the adapter clears the row
    itself after ``erase``, so the other properties can be checked past the defect.
    """

    def __init__(
        self,
        page_size: int = 2,
        n_pages: int = 8,
        max_batch_size: int = 4,
        clear_stale_mapping: bool = False,
    ) -> None:
        self.pa: Any = _paged_attention_class()(n_pages, page_size, max_batch_size, device="cpu")
        slots = n_pages * page_size
        # one KV head of dimension 1: a token's K is one float, its V the negation
        self.k_cache = torch.zeros(1, 1, slots, 1, dtype=torch.float32)
        self.v_cache = torch.zeros(1, 1, slots, 1, dtype=torch.float32)
        self.page_size = page_size
        self.n_pages = n_pages
        self.clear_stale_mapping = clear_stale_mapping
        self.lengths: dict[int, int] = {}
        policies = (
            "free pages are a stack: erase pushes a slot's pages in page-table order and "
            "reserve pops from the top (the spec: a FIFO starting at block 0)",
            "a sequence is a batch slot (0..max_batch_size-1) that owns a full-width page-table "
            "row; ids are slots, not free-form",
            "erase takes a batch index of shape (1) as documented; a 0-dim index raises "
            "IndexError after the page table was already changed",
            "no prefix caching, no fork, no reference counts, no swap: a page has one owner",
        )
        self.capabilities = Capabilities(
            name="torch.PagedAttention" + (" (stale mapping cleared)" * clear_stale_mapping),
            block_size=page_size,
            num_blocks=n_pages,
            prefix_caching=False,
            fork=False,
            refcounts=False,
            cached_blocks=False,
            swap=False,
            copy_on_write=False,
            policies=policies,
        )

    def _slot(self, seq_id: int) -> torch.Tensor:
        return torch.tensor([seq_id])

    def _reserve(self, seq_id: int, length: int) -> None:
        capacity = int(self.pa.capacity[seq_id])
        needed = max(0, -(-(length - capacity) // self.page_size))
        if needed > len(self.pa.empty_pages):
            raise NoRoom
        self.pa.reserve(self._slot(seq_id), torch.tensor([length]))
        self.lengths[seq_id] = length

    # -- the adapter surface -----------------------------------------------------------------
    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int:
        self._reserve(seq_id, len(token_ids))
        return 0  # no prefix cache

    def write(self, seq_id: int, start: int, values: Sequence[float]) -> None:
        n = len(values)
        k = torch.tensor(values, dtype=torch.float32).view(1, 1, n, 1)
        pos = torch.arange(start, start + n).view(1, n)
        self.pa.assign(self._slot(seq_id), pos, k, -k, self.k_cache, self.v_cache)

    def read(self, seq_id: int, num_tokens: int) -> list[float]:
        """The KV of positions ``0..num_tokens`` as FlexAttention's paged score_mod maps them.

        Every physical slot goes through ``get_score_mod`` with a logical score_mod that returns
        the logical KV index: a slot maps to logical index ``i`` when the converted score is
        ``i`` and is invisible when it is ``-inf``. Each logical position must be mapped from
        exactly one slot, the one the page table (what ``assign`` wrote through) names.
        """
        slots = self.n_pages * self.page_size
        kv_len = torch.zeros(self.pa.page_table.shape[0], dtype=torch.int64)
        kv_len[seq_id] = num_tokens

        def logical_index(score: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
            return kv.to(score.dtype)

        convert = _bounded(self.pa.get_score_mod, logical_index, kv_len=kv_len)
        phys = torch.arange(slots)
        zero = torch.zeros((), dtype=torch.int64)
        seen = convert(
            torch.zeros(slots, dtype=torch.float64), torch.tensor(seq_id), zero, zero, phys
        )
        table = self.pa.page_table[seq_id]
        out: list[float] = []
        for i in range(num_tokens):
            mapped = torch.nonzero(seen == i).flatten().tolist()
            page = int(table[i // self.page_size])
            written = page * self.page_size + i % self.page_size
            if mapped != [written]:
                owners = {
                    s // self.page_size: int(
                        self.pa.physical_to_logical[seq_id, s // self.page_size]
                    )
                    for s in mapped
                }
                raise Defect(
                    "readback",
                    f"seq {seq_id} position {i}: the paged score_mod maps physical slots "
                    f"{mapped} to it (pages -> logical block, from {STALE_MAPPING}: {owners}); "
                    f"the page table wrote it to slot {written} (page {page})",
                )
            key = float(self.k_cache[0, 0, written, 0])
            value = float(self.v_cache[0, 0, written, 0])
            out.append(key if value == -key else float("nan"))
        return out

    def append(self, seq_id: int, token_id: int) -> None:
        self._reserve(seq_id, self.lengths[seq_id] + 1)

    def fork(self, parent_id: int, child_id: int) -> None:  # pragma: no cover - fork=False
        raise NotImplementedError("PagedAttention has no fork")

    def free(self, seq_id: int) -> None:
        self.pa.erase(self._slot(seq_id))
        if self.clear_stale_mapping:
            self.pa.physical_to_logical[seq_id] = -1
        del self.lengths[seq_id]

    def block_table(self, seq_id: int) -> list[int]:
        return [int(p) for p in self.pa.page_table[seq_id].tolist() if p >= 0]

    def refcount(self, block: int) -> int:
        held = bool((self.pa.page_table == block).any())
        return 1 if held else 0

    def num_free_blocks(self) -> int:
        return len(self.pa.empty_pages)

    def num_cached_blocks(self) -> int:
        return 0

    def evict_all(self) -> None:
        return None


def make_factory(**kwargs: Any) -> Any:
    """A zero-argument factory of fresh adapters (what ``check_semantic`` takes)."""
    return lambda: TorchPagedAdapter(**kwargs)


#: Page sizes torch's own FlexAttention paged tests compile on CUDA (test_flex_decoding.py).
COMPILED_PAGE_SIZES = (64, 128, 256)


def _configure_recompiles() -> None:
    """Every case has other shapes and closures: allow that many recompiles, never eager."""
    import torch._dynamo

    config: Any = torch._dynamo.config
    limits = ("recompile_limit", "cache_size_limit")  # per function; renamed across releases
    accumulated = ("accumulated_recompile_limit", "accumulated_cache_size_limit")
    for knob in (*limits, *accumulated):
        if hasattr(config, knob):
            setattr(config, knob, max(int(getattr(config, knob)), 4096))


class TorchFlexAttention:
    """pagedkv's attention protocol implemented with ``PagedAttention`` + ``flex_attention``.

    ``compiled`` None compiles on CUDA and runs eagerly elsewhere. ``fill`` is what the pages'
    unwritten slots hold: 0.0 as torch's own tests allocate them (``torch.zeros``); NaN to
    reproduce the documented difference that eager FlexAttention reads every slot of the cache.
    """

    name = "torch-flex"

    def __init__(self, compiled: bool | None = None, fill: float = 0.0) -> None:
        self.compiled = compiled
        self.fill = fill
        self._compiled_fn: Any = None
        self.not_expressible: dict[str, str] = {
            "NaN poison in unwritten KV slots": (
                "the pages are laid out in a fresh cache filled with "
                f"{fill}: eager FlexAttention scores every slot of the cache, so a NaN anywhere "
                "reaches every output (a documented difference, tested separately)"
            ),
            "fp8 KV caches (run_attention_suite(fp8=True))": (
                "FlexAttention takes no per-head K/V dequantization scales; the adapter "
                "declines k_scale/v_scale"
            ),
            "block ids past 2^31 elements": (
                "PagedAttention lays the KV out in its own compact pages (n_pages of them); "
                "pagedkv's pool is only read to fill them"
            ),
        }

    # -- what the suite may draw -------------------------------------------------------------
    def case_limits(self, limits: CaseLimits, *, device: str, prefill: bool) -> CaseLimits:
        """The suite's limits narrowed to what this implementation expresses on ``device``."""
        narrowed = replace(limits, high_ids=False)
        if self._compile_on(device):
            sizes = tuple(s for s in limits.block_sizes if s in COMPILED_PAGE_SIZES)
            narrowed = replace(narrowed, block_sizes=sizes or COMPILED_PAGE_SIZES)
            self.not_expressible["page sizes below 64 when compiled"] = (
                "torch's own compiled paged tests cover page sizes 64, 128 and 256 only "
                "(the page is FlexAttention's KV sparse block)"
            )
        return narrowed

    def backend_on(self, device: str) -> str:
        """What runs on ``device``: eager or compiled FlexAttention, and torch's version."""
        how = "torch.compile'd" if self._compile_on(device) else "eager"
        return (
            f"{how} FlexAttention over PagedAttention pages on {device} (torch {torch.__version__})"
        )

    def _compile_on(self, device: str | torch.device) -> bool:
        if self.compiled is not None:
            return self.compiled
        return str(device).startswith("cuda")

    def _flex(self, device: torch.device) -> Any:
        from torch.nn.attention.flex_attention import flex_attention

        if not self._compile_on(device):
            return flex_attention
        if self._compiled_fn is None:
            _configure_recompiles()
            self._compiled_fn = torch.compile(flex_attention, dynamic=False)
        return self._compiled_fn

    # -- the shared path ---------------------------------------------------------------------
    def _attend(
        self,
        q_rows: list[torch.Tensor],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: list[int],
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
    ) -> list[torch.Tensor]:
        """Attention of each sequence's queries ``q_rows[b]`` [q_len, Hq, D] (the last q_len
        positions of its ``seq_lens[b]``); returns [q_len, Hq, D] per sequence."""
        from torch.nn.attention.flex_attention import create_block_mask

        device = k_cache.device
        batch = len(seq_lens)
        page = int(k_cache.shape[1])
        hkv, dim = int(k_cache.shape[2]), int(k_cache.shape[3])
        hq = int(q_rows[0].shape[1])
        pages_of = [-(-n // page) for n in seq_lens]
        n_pages = sum(pages_of) + 1  # one page no sequence reserves
        pa = _paged_attention_class()(n_pages, page, batch, device=str(device))
        shape = (1, hkv, n_pages * page, dim)
        kc = torch.full(shape, self.fill, dtype=k_cache.dtype, device=device)
        vc = torch.full(shape, self.fill, dtype=v_cache.dtype, device=device)
        for b, n in enumerate(seq_lens):
            if not n:
                continue
            slot = torch.tensor([b], device=device)
            pa.reserve(slot, torch.tensor([n], device=device))
            blocks = block_tables[b, : pages_of[b]].long()
            k = k_cache[blocks].reshape(-1, hkv, dim)[:n].permute(1, 0, 2).unsqueeze(0)
            v = v_cache[blocks].reshape(-1, hkv, dim)[:n].permute(1, 0, 2).unsqueeze(0)
            pos = torch.arange(n, device=device).unsqueeze(0)
            pa.assign(slot, pos, k.contiguous(), v.contiguous(), kc, vc)

        q_max = max(int(r.shape[0]) for r in q_rows)
        q = torch.zeros(batch, hq, q_max, dim, dtype=q_rows[0].dtype, device=device)
        for b, rows in enumerate(q_rows):
            q[b, :, : rows.shape[0]] = rows.transpose(0, 1)
        kv_len = torch.tensor(seq_lens, dtype=torch.int64, device=device)
        q_len = torch.tensor([int(r.shape[0]) for r in q_rows], dtype=torch.int64, device=device)
        first = kv_len - q_len  # logical position of each sequence's first query
        window = sliding_window

        def visible(b: Any, h: Any, qi: Any, kv: Any) -> Any:
            pos = first[b] + qi
            keep = (qi < q_len[b]) & (kv <= pos) & (kv < kv_len[b])
            if window is not None:
                keep = keep & (pos - kv < window)
            return keep

        cap = softcap

        def soft_cap(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
            if cap is None:
                return score
            return cap * torch.tanh(score / cap)

        kv_logical = max(1, max(pages_of)) * page
        logical = create_block_mask(
            visible, batch, None, q_max, kv_logical, device=device, BLOCK_SIZE=(128, page)
        )
        slots = torch.arange(batch, device=device)
        mask = _bounded(pa.convert_logical_block_mask, logical, slots, kv_len=kv_len)
        score_mod = _bounded(pa.get_score_mod, soft_cap, kv_len=kv_len)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex warns that it is not fused
            res = self._flex(device)(
                q, kc, vc, score_mod=score_mod, block_mask=mask, scale=scale, enable_gqa=True
            )
        return [res[b, :, : int(r.shape[0])].transpose(0, 1) for b, r in enumerate(q_rows)]

    # -- pagedkv's attention protocol --------------------------------------------------------
    def paged_decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        *,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """One query per sequence at position ``seq_lens[b] - 1``."""
        lens = [int(n) for n in seq_lens.tolist()]
        rows = [q[b : b + 1] for b in range(len(lens))]
        got = self._attend(
            rows, k_cache, v_cache, block_tables, lens, scale, sliding_window, softcap
        )
        for b, res in enumerate(got):
            out[b] = res[0]
        return out

    def paged_prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        seq_lens: torch.Tensor,
        *,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Each sequence's new tokens after its cached prefix, causal."""
        lens = [int(n) for n in seq_lens.tolist()]
        cu = [int(x) for x in cu_seqlens_q.tolist()]
        rows = [q[cu[b] : cu[b + 1]] for b in range(len(lens))]
        got = self._attend(
            rows, k_cache, v_cache, block_tables, lens, scale, sliding_window, softcap
        )
        for b, res in enumerate(got):
            out[cu[b] : cu[b + 1]] = res
        return out
