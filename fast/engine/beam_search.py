"""Beam search on shared blocks, driven on the engine's model, KV caches and block manager.

``run_beam_search(engine, prompts, params)`` (what ``LLM.beam_search`` calls) searches every
prompt's ``beam_width`` best continuations with transformers' definition of beam search (see
``docs/beam-search.md``), with the KV of the beams in shared paged blocks:

* each prompt is allocated once through the block manager (so prefix-cache hits apply) and
  prefilled once, all prompts of a group in one batch;
* every step runs one batched decode over the live beams of all prompts, takes
  ``log_softmax`` of the logits, and picks each prompt's best continuations;
* the bookkeeping of a step is the block manager's own operations, in this order: ``free`` the
  beams chosen zero times (dropped) and the beams of prompts whose search ended, ``fork`` a beam
  once per extra time it was chosen (the first continuation keeps the beam's id), then one
  ``append_batch`` of every live beam's new token. A beam that shares a partly filled last
  block copies it on write: ``append_batch`` returns the ``(src, dst)`` pairs and the KV is
  copied with ``kernels.copy_blocks`` before the step writes.

The engine must be idle: a call while other requests are unfinished raises
:class:`~fast.engine.beam_params.EngineBusyError` (nothing queues behind it). The call is one
transaction on the journaled block manager: if anything raises (the model, a
``KeyboardInterrupt``, an impossible allocation), the manager is rolled back to its state
before the call and the KV of prefix-cache blocks the call overwrote is put back.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import kernels
from fast.engine.batch import HostBatch, HostStaging
from fast.engine.beam_params import (
    BeamBlockStats,
    BeamSearchOutput,
    BeamSearchParams,
    BeamSearchSequence,
    EngineBusyError,
    beam_score,
    normalized_length,
)
from fast.engine.inputs import InvalidPromptError, ParsedPrompt
from fast.engine.journal import JournaledBlockManager, restore_kv_blocks, save_kv_blocks
from fast.engine.outputs import Logprob
from spec.errors import InvalidArgumentError

__all__ = ["run_beam_search", "worst_case_blocks", "BeamSearchCapacityError"]


class BeamSearchCapacityError(InvalidArgumentError):
    """One prompt's beams could need more device blocks than the pool has (checked before
    anything runs). Attributes: ``index`` (the prompt), ``needed``, ``available``."""

    def __init__(self, index: int, needed: int, available: int, beam_width: int) -> None:
        self.index, self.needed, self.available = index, needed, available
        super().__init__(
            "beam_width",
            beam_width,
            f"prompt {index}: {beam_width} beams may need {needed} blocks, "
            f"the pool has {available} free",
        )


def worst_case_blocks(prompt_len: int, max_new: int, beam_width: int, block_size: int) -> int:
    """The most device blocks one prompt's search can hold at once: the prompt's full blocks
    (never copied, shared by every beam) plus, per beam, the rest of a table of
    ``prompt_len + max_new - 1`` tokens (the last token is never appended).

    >>> worst_case_blocks(8, 3, 2, 4)  # 2 shared + 2 beams x (3 - 2)
    4
    >>> worst_case_blocks(6, 3, 2, 4)  # 1 shared + 2 beams x (2 - 1)
    3
    """
    shared = prompt_len // block_size
    longest = -(-(prompt_len + max_new - 1) // block_size)
    return shared + beam_width * (longest - shared)


@dataclass
class _Beam:
    """A live beam: its sequence id in the block manager and what it generated."""

    seq_id: int
    tokens: list[int]  # generated tokens
    cum: float  # float32 sum of their log-probabilities (transformers' running score)
    logprobs: list[tuple[int, float, int]]  # (token, logprob, rank) per generated token


@dataclass
class _Finished:
    tokens: list[int]
    cum: float
    logprobs: list[tuple[int, float, int]]
    score: float
    eos: bool


@dataclass
class _Search:
    """One prompt's search."""

    index: int
    prompt: ParsedPrompt
    max_new: int
    beams: list[_Beam] = field(default_factory=list)
    finished: list[_Finished] = field(default_factory=list)  # best first, at most k
    generated: int = 0  # tokens each live beam has generated
    num_cached: int = 0  # prompt tokens found in the prefix cache
    done: bool = False
    stats: dict[str, int] = field(default_factory=dict)


def run_beam_search(engine: Any, prompts: Any, params: BeamSearchParams) -> list[BeamSearchOutput]:
    """Beam search every prompt on ``engine`` (an idle :class:`~fast.engine.engine.LLMEngine`);
    one :class:`BeamSearchOutput` per prompt, in input order, its beams best first."""
    if not isinstance(params, BeamSearchParams):
        raise InvalidArgumentError(
            "params", params, f"a {type(params).__name__}, not a BeamSearchParams"
        )
    if engine.has_unfinished_requests():
        sched = engine.scheduler
        raise EngineBusyError(len(sched.waiting) + len(sched.running) + len(sched.swapped))
    parsed = engine.parse_prompts(prompts)
    groups = _plan(engine, parsed, params)
    run = _Run(engine, params)
    bm = engine.block_manager
    journaled = isinstance(bm, JournaledBlockManager)
    if journaled:
        bm.begin()
    results: dict[int, BeamSearchOutput] = {}
    try:
        with torch.inference_mode():
            for group in groups:
                results.update(run.search([(i, parsed[i]) for i in group]))
    except BaseException as exc:
        run.undo(journaled)
        note = getattr(exc, "add_note", None)
        if note is not None:
            note("pagedkv: beam search was rolled back (block manager and cached KV as before)")
        raise
    if journaled:
        bm.commit()
    return [results[i] for i in range(len(parsed))]


def _plan(engine: Any, parsed: list[ParsedPrompt], params: BeamSearchParams) -> list[list[int]]:
    """Prompts in groups that run together: each group's worst case fits the free blocks and
    its beams fit ``max_num_seqs`` (a prompt alone may have more beams than that)."""
    bs, k = engine.config.block_size, params.beam_width
    free = int(engine.block_manager.num_free_gpu_blocks)
    limit = max(engine.scheduler_config.max_num_seqs, k)
    groups: list[list[int]] = []
    used = free + 1
    for i, p in enumerate(parsed):
        n = len(p.token_ids)
        max_new = min(params.max_tokens, engine.max_model_len - n)
        if max_new < 1:
            raise InvalidPromptError(
                i,
                p.token_ids,
                f"{n} tokens leave no room under max_model_len {engine.max_model_len}",
            )
        need = worst_case_blocks(n, max_new, k, bs)
        if need > free:
            raise BeamSearchCapacityError(i, need, free, k)
        if used + need > free or (len(groups[-1]) + 1) * k > limit:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += need
    return groups


class _Run:
    """The state of one ``run_beam_search`` call (what undoing it needs)."""

    def __init__(self, engine: Any, params: BeamSearchParams) -> None:
        self.engine = engine
        self.params = params
        self.bm = engine.block_manager
        self.bs = int(engine.config.block_size)
        self.model = engine.model
        self.eos = frozenset() if params.ignore_eos else engine._stop.eos_token_ids
        # transformers keeps (1 + number of EOS ids) * k candidates, at least 2k: enough that
        # k of them continue even when every beam's best tokens are EOS
        self.num_candidates = max(2, 1 + len(engine._stop.eos_token_ids)) * params.beam_width
        self.staging = HostStaging(engine.device)
        self.live: set[int] = set()  # sequence ids this call holds in the block manager
        self.caching = bool(engine.config.enable_prefix_caching)
        self.cached_before = set(self.bm.cached_blocks()) if self.caching else set()
        self.saved: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # block -> K/V

    # -- one group of prompts -------------------------------------------------------------
    def search(self, group: list[tuple[int, ParsedPrompt]]) -> dict[int, BeamSearchOutput]:
        searches = [
            _Search(
                i,
                p,
                min(self.params.max_tokens, self.engine.max_model_len - len(p.token_ids)),
                stats=dict.fromkeys(_STATS, 0),
            )
            for i, p in group
        ]
        logprobs = self._prefill(searches)  # [G, V]
        rows = [[g] for g in range(len(searches))]
        while True:
            plans = []
            for s, r in zip(searches, rows):
                plans.append(self._select(s, logprobs[r]) if not s.done and r else [])
            # bookkeeping: frees first (dropped and ended beams), then forks, then appends
            for s, plan in zip(searches, plans):
                chosen = {p for p, *_ in plan}
                for j, beam in enumerate(s.beams):
                    if s.done or j not in chosen:
                        self._free(beam.seq_id)
                        s.stats["frees"] += 1
            for s, plan in zip(searches, plans):
                s.beams = [] if s.done else self._continue(s, plan)
            live = [b for s in searches for b in s.beams]
            if not live:
                break
            ids = np.fromiter((b.seq_id for b in live), np.int64, len(live))  # [N]
            toks = np.fromiter((b.tokens[-1] for b in live), np.int64, len(live))  # [N]
            slots, pairs = self.bm.append_batch(ids, toks)
            pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)  # [M, 2]
            if len(pairs):
                self._save_kv(pairs[:, 1].tolist())
                pairs_t = torch.from_numpy(pairs).to(self.engine.device)  # [M, 2]
                for kc, vc in self.engine.kv_caches:
                    kernels.copy_blocks(kc, vc, pairs_t)
            tables = self.engine._tables(ids)  # [N, W] int32
            lens = [len(s.prompt.token_ids) + s.generated for s in searches for _ in s.beams]
            self._record_blocks(searches, tables, lens, set(pairs[:, 1].tolist()))
            positions = np.asarray(lens, dtype=np.int64) - 1  # [N]
            batch = HostBatch(
                toks,
                positions,
                np.asarray(slots, dtype=np.int64),
                tables,
                np.asarray(lens, dtype=np.int32),
                np.arange(len(live) + 1, dtype=np.int32),
                1,
                True,
                np.arange(len(live), dtype=np.int64),
            )
            logprobs = self._forward(batch, [b.seq_id for b in live], lens)  # [N, V]
            at = itertools.count()
            rows = [[next(at) for _ in s.beams] for s in searches]
        return {s.index: self._output(s) for s in searches}

    def _prefill(self, searches: list[_Search]) -> torch.Tensor:
        """Allocate and prefill every prompt of the group; log-probs of each last position."""
        ids, starts, nums, tokens = [], [], [], []
        for s in searches:
            sid = next(self.engine._seq_ids)
            prompt = s.prompt.token_ids
            cached = s.num_cached = int(self.bm.allocate(sid, prompt))
            self.live.add(sid)
            s.beams = [_Beam(sid, [], 0.0, [])]
            ids.append(sid)
            starts.append(cached)
            nums.append(len(prompt) - cached)
            tokens.extend(prompt[cached:])
        n = len(ids)
        sid_arr = np.asarray(ids, dtype=np.int64)  # [G]
        start = np.asarray(starts, dtype=np.int64)  # [G]
        num = np.asarray(nums, dtype=np.int64)  # [G]
        cu = np.zeros(n + 1, dtype=np.int64)  # [G + 1]
        np.cumsum(num, out=cu[1:])
        total = int(cu[-1])
        positions = np.arange(total) - np.repeat(cu[:-1] - start, num)  # [T]
        row = np.repeat(np.arange(n), num)  # [T]
        tables = self.engine._tables(sid_arr)  # [G, W] int32
        slots = tables[row, positions // self.bs].astype(np.int64) * self.bs + positions % self.bs
        lens = (start + num).tolist()
        self._record_blocks(searches, tables, lens)
        batch = HostBatch(
            np.asarray(tokens, dtype=np.int64),
            positions,
            slots,
            tables,
            (start + num).astype(np.int32),
            cu.astype(np.int32),
            int(num.max()),
            total == n,
            cu[1:] - 1,
        )
        return self._forward(batch, ids, lens)

    def _forward(self, batch: HostBatch, ids: Sequence[int], lens: Sequence[int]) -> torch.Tensor:
        """Run the model on ``batch``; log-probs [N, V] of its sampled rows. Then the KV of
        every beam's tokens is computed: tell the block manager (``mark_computed_batch``)."""
        self._save_kv(np.unique(batch.slots // self.bs).tolist())
        input_ids, positions, ctx, rows = self.staging.upload(batch)
        hidden = self.model(input_ids, positions, ctx, self.engine.kv_caches)  # [T, H]
        if hidden.shape[0] != rows.shape[0]:
            hidden = hidden.index_select(0, rows)  # [N, H]
        logits = self.model.compute_logits(hidden).float()  # [N, V]
        t = self.params.temperature
        if t > 0 and t != 1:
            logits = logits / t
        self.bm.mark_computed_batch(
            np.asarray(ids, dtype=np.int64), np.asarray(lens, dtype=np.int64)
        )  # the step wrote the KV of every beam's tokens: full blocks may enter the cache
        return torch.log_softmax(logits, dim=-1)  # [N, V]

    # -- the search -----------------------------------------------------------------------
    def _select(self, s: _Search, lp: torch.Tensor) -> list[tuple[int, int, float, float, int]]:
        """transformers' step for one prompt, from its live beams' log-probs ``lp`` [b, V]:
        the top ``num_candidates`` (beam, token) pairs by cumulative log-probability; those
        that end (EOS, or the last allowed token) among the first ``k`` join the finished
        hypotheses; the first ``k`` that do not end continue. Returns the continuations as
        (beam index, token, cumulative, logprob, rank), best first, and updates ``s.done``."""
        params, k = self.params, self.params.beam_width
        b, vocab = lp.shape
        cum = torch.tensor([beam.cum for beam in s.beams], dtype=torch.float32, device=lp.device)
        scores = lp + cum[:, None]  # [b, V] float32, as transformers adds them
        top, idx = torch.topk(scores.reshape(-1), min(self.num_candidates, b * vocab))  # [K]
        parents = idx // vocab  # [K]
        tokens = idx % vocab  # [K]
        token_lp = lp[parents, tokens]  # [K]
        ranks = (lp[parents] > token_lp[:, None]).sum(-1) + 1  # [K]
        s.generated += 1
        n = s.generated
        plen = len(s.prompt.token_ids)
        keep: list[tuple[int, int, float, float, int]] = []
        ended: list[_Finished] = []
        for r, (c, p, t, tl, rk) in enumerate(
            zip(top.tolist(), parents.tolist(), tokens.tolist(), token_lp.tolist(), ranks.tolist())
        ):
            eos = t in self.eos
            if eos or n >= s.max_new:
                if r < k:
                    beam = s.beams[p]
                    score = beam_score(
                        c, num_generated=n, prompt_len=plen, ends_with_eos=eos, params=params
                    )
                    ended.append(
                        _Finished(beam.tokens + [t], c, beam.logprobs + [(t, tl, rk)], score, eos)
                    )
            elif len(keep) < k:
                keep.append((p, t, c, tl, rk))
        if ended:
            s.finished = sorted(s.finished + ended, key=lambda f: f.score, reverse=True)[:k]
        s.done = n >= s.max_new or not keep or self._cannot_improve(s, keep[0][2])
        return keep

    def _cannot_improve(self, s: _Search, best_running: float) -> bool:
        """transformers' end of a prompt's search before ``max_tokens``: ``k`` finished
        hypotheses and (``early_stopping=True``) nothing more, or the best live beam's best
        possible score no better than the worst finished one (``False``: at its current
        length; ``"never"``: at the length that bounds it, so only when nothing can change)."""
        params, k = self.params, self.params.beam_width
        if len(s.finished) < k:
            return False
        if params.early_stopping is True:
            return True
        lp = params.length_penalty
        n = s.max_new if params.early_stopping == "never" and lp > 0 else s.generated
        length = normalized_length(n, len(s.prompt.token_ids), False, params)
        return bool(best_running / length**lp <= s.finished[-1].score)

    def _continue(self, s: _Search, plan: list[tuple[int, int, float, float, int]]) -> list[_Beam]:
        """The next live beams: the first continuation of a beam keeps its sequence id, each
        further one is a ``fork`` (before any append, so it shares the beam's blocks)."""
        out = []
        kept: set[int] = set()
        for p, t, c, tl, rk in plan:
            parent = s.beams[p]
            if p in kept:
                sid = next(self.engine._seq_ids)
                self.bm.fork(parent.seq_id, sid)
                self.live.add(sid)
                s.stats["forks"] += 1
            else:
                sid = parent.seq_id
                kept.add(p)
            out.append(_Beam(sid, parent.tokens + [t], c, parent.logprobs + [(t, tl, rk)]))
        return out

    def _free(self, seq_id: int) -> None:
        self.bm.free(seq_id)
        self.live.discard(seq_id)

    # -- figures and outputs --------------------------------------------------------------
    def _record_blocks(
        self,
        searches: list[_Search],
        tables: np.ndarray,
        lens: list[int],
        copies: set[int] | None = None,
    ) -> None:
        """Physical vs unshared blocks of each prompt's live beams (tables [N, W]), and the
        copy-on-write copies (``copies``: the step's ``dst`` blocks, each now in one table)."""
        at = 0
        for s in searches:
            held: list[np.ndarray] = []
            for _ in s.beams:
                held.append(tables[at, : -(-lens[at] // self.bs)])  # [blocks of beam]
                at += 1
            if not held:
                continue
            if copies:
                s.stats["copied_blocks"] += sum(int(np.isin(h, list(copies)).sum()) for h in held)
            physical = int(np.unique(np.concatenate(held)).shape[0])
            unshared = sum(int(h.shape[0]) for h in held)
            st = s.stats
            st["peak_physical_blocks"] = max(st["peak_physical_blocks"], physical)
            st["peak_unshared_blocks"] = max(st["peak_unshared_blocks"], unshared)
            st["physical_block_steps"] += physical
            st["unshared_block_steps"] += unshared

    def _output(self, s: _Search) -> BeamSearchOutput:
        tok = self.engine.tokenizer
        prompt = s.prompt.token_ids
        seqs = []
        for f in s.finished:
            text = None
            if tok is not None:
                body = f.tokens[:-1] if f.eos else f.tokens
                text = tok.decode(body, skip_special_tokens=True)
                if f.eos and self.params.include_stop_str_in_output:
                    text += tok.decode(f.tokens[-1:], skip_special_tokens=False)
            lps = [
                {t: Logprob(lp, rk, None if tok is None else tok.decode([t]))}
                for t, lp, rk in f.logprobs
            ]
            seqs.append(
                BeamSearchSequence(
                    tokens=list(prompt) + f.tokens,
                    logprobs=lps,
                    cum_logprob=f.cum,
                    text=text,
                    finish_reason="stop" if f.eos else "length",
                    stop_reason=None,
                    score=f.score,
                    num_prompt_tokens=len(prompt),
                )
            )
        return BeamSearchOutput(seqs, BeamBlockStats(**s.stats), s.num_cached)

    # -- undo -----------------------------------------------------------------------------
    def _save_kv(self, blocks: list[int]) -> None:
        """Before the call writes ``blocks``: keep the KV of those the prefix cache held when
        the call began (a rollback restores the cache's index, so its content must match)."""
        if not self.caching:
            return
        new = [b for b in blocks if b in self.cached_before and b not in self.saved]
        if not new:
            return
        saved = save_kv_blocks(self.engine.kv_caches, new, self.engine.device)
        assert saved is not None  # new is not empty
        kv = saved[1]
        for j, b in enumerate(new):
            self.saved[b] = [(k[j : j + 1], v[j : j + 1]) for k, v in kv]

    def undo(self, journaled: bool) -> None:
        """Leave the engine as it was before the call (see the module docstring)."""
        if journaled:
            self.bm.rollback()
        else:  # a plain manager: give back every block this call holds
            for sid in sorted(self.live):
                self.bm.free(sid)
        self.live.clear()
        if self.saved:
            blocks = sorted(self.saved)
            index = torch.tensor(blocks, dtype=torch.int64, device=self.engine.device)
            layers = [
                (
                    torch.cat([self.saved[b][layer][0] for b in blocks]),
                    torch.cat([self.saved[b][layer][1] for b in blocks]),
                )
                for layer in range(len(self.engine.kv_caches))
            ]
            restore_kv_blocks(self.engine.kv_caches, (index, layers))


_STATS = tuple(
    name
    for name in BeamBlockStats.__dataclass_fields__  # the counters, all ints starting at 0
)
