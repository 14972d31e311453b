"""The PagedAttention memory table on the CPU: KV utilization, batch size and sharing savings.

No model runs. Requests of the ShareGPT-like and Alpaca-like traces (``docs/workloads.md``) go
through the engine's scheduler (``fast.engine.scheduler.Scheduler``) over the numba block
manager (``fast.blocks.manager.BlockManager``, prefix caching off); each request generates
exactly its drawn output length, so the token ids do not matter, only the lengths. Three
measurements, all derived in ``docs/memory.md``:

* **Utilization.** Every step of a continuous-batching run (at most ``max_num_seqs`` sequences
  resident, a KV pool the size of the H200 budget below so that it never binds) records the
  token slots holding KV (the sum of the resident sequences' computed tokens) and the slots
  each layout holds for the same resident sequences: paged (blocks in use x block size),
  contiguous reservation of ``max_model_len`` per sequence, and an oracle that reserves each
  sequence's final KV length (prompt + output - 1: the last sampled token is never fed back).
  Utilization is tokens / slots, averaged over the steps in which requests were waiting (the
  batch is full; the drain at the end of a finite trace is left out).
* **Batch.** The KV budget of Llama-3-8B (bf16) on one H200 at 90% of 141 GB minus 16 GB of
  weights, in block-size-16 blocks, with no limit on the number of sequences: the paged
  scheduler admits requests while their prompts fit and preempts (recompute) the newest when a
  decode finds no block, and the number of resident requests is recorded every step. A
  contiguous allocator that reserves ``max_model_len`` slots per request holds
  ``budget // max_model_len`` requests, whatever the trace. The pool-limited run uses
  :func:`run_pool_limited`, the scheduler's policy with one batched call per step (the engine's
  scheduler makes one call per sequence on a step that preempts, too slow at 10,000 resident
  sequences); ``tests/benchmarks/test_memory_table.py`` checks that both make the same
  decisions.
* **Sharing.** Parallel sampling with n samples (the parent is forked n - 1 times when it
  samples its first token; the children copy-on-write the shared last block at their first
  append) and a simulated beam search of width k (see :func:`choose_parents`), both through the
  scheduler's ``fork`` and ``abort_request``. The saving is 1 - physical blocks in use / the
  blocks the same sequences would hold without sharing, averaged like utilization.

Run from the repository root: ``PYTHONPATH=. python benchmarks/bench_memory.py`` writes
``benchmarks/results/memory.json`` and the plots ``docs/_static/memory_*.png``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fast.blocks.manager import BlockManager, BlockManagerConfig
from fast.engine.scheduler import Scheduler
from fast.engine.sequence import Sequence as EngineSequence
from spec.scheduler import SchedulerConfig, StepOutcome

ROOT = Path(__file__).resolve().parents[1]
BLOCK_SIZES = (1, 8, 16, 32, 64, 128)
MAX_MODEL_LEN = 2048
TOKEN = 1  # every sampled and prompt token: with prefix caching off the content is never read

# The KV budget: Llama-3-8B in bf16 on one H200.
KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # (K, V) x layers x KV heads x head dim x bytes
GPU_BYTES = 141e9
GPU_FRACTION = 0.9
WEIGHT_BYTES = 16e9

# The vLLM paper's figures (Kwon et al., SOSP 2023), quoted, never measured here.
PAPER = {
    "source": (
        "Kwon et al., Efficient Memory Management for Large Language Model Serving with "
        "PagedAttention, SOSP 2023 (Fig. 2, Sec. 6.3)"
    ),
    "token_state_fraction_replaced_systems": [0.204, 0.382],
    "waste_vllm_below": 0.04,
    "parallel_saving": {"alpaca": [0.061, 0.098], "sharegpt": [0.162, 0.305]},
    "beam_saving": {"alpaca": [0.376, 0.552], "sharegpt": [0.443, 0.663]},
}


def kv_budget() -> dict[str, float | int]:
    """The KV pool of Llama-3-8B on one H200: bytes and token slots."""
    budget = GPU_FRACTION * GPU_BYTES - WEIGHT_BYTES
    return {
        "bytes_per_token": KV_BYTES_PER_TOKEN,
        "gpu_bytes": GPU_BYTES,
        "gpu_fraction": GPU_FRACTION,
        "weight_bytes": WEIGHT_BYTES,
        "budget_bytes": budget,
        "budget_tokens": int(budget // KV_BYTES_PER_TOKEN),
    }


# ----------------------------------------------------------------------------------- traces
@dataclass(frozen=True)
class TraceSpec:
    """Log-normal prompt and output lengths, rounded and clipped (``docs/workloads.md``)."""

    name: str
    prompt_mu: float
    output_mu: float
    sigma: float = 1.0
    low: int = 4
    high: int = 1024


SHAREGPT = TraceSpec("sharegpt", 4.68, 5.76)
ALPACA = TraceSpec("alpaca", 2.45, 3.56)
TRACES = {t.name: t for t in (SHAREGPT, ALPACA)}


@dataclass(frozen=True)
class Trace:
    """Prompt and output lengths of each request, in arrival order."""

    name: str
    prompt_lens: tuple[int, ...]
    output_lens: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt_lens)


def make_trace(spec: TraceSpec, n: int, seed: int = 0) -> Trace:
    """The first ``n`` requests of the trace: all prompt lengths are drawn first, then all
    output lengths (the draws of ``docs/workloads.md``; the token ids drawn after them there
    are not needed here)."""
    rng = np.random.default_rng(seed)
    n_in = np.clip(np.round(rng.lognormal(spec.prompt_mu, spec.sigma, n)), spec.low, spec.high)
    n_out = np.clip(np.round(rng.lognormal(spec.output_mu, spec.sigma, n)), spec.low, spec.high)
    return Trace(
        spec.name, tuple(int(x) for x in n_in.tolist()), tuple(int(x) for x in n_out.tolist())
    )


# ------------------------------------------------------------------------- the engine's run


@dataclass
class Samples:
    """One row per step, taken right after the scheduler's decisions (the step's KV is in the
    pool): resident sequences and requests, token slots holding KV, physical blocks in use,
    the blocks the same sequences would hold without sharing, the oracle's reservation, and
    whether requests were waiting."""

    block_size: int
    seqs: list[int] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    physical: list[int] = field(default_factory=list)
    logical: list[int] = field(default_factory=list)
    oracle: list[int] = field(default_factory=list)
    saturated: list[bool] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)

    def array(self, name: str) -> NDArray[np.float64]:
        return np.asarray(getattr(self, name), dtype=np.float64)

    def steady(self) -> NDArray[np.bool_]:
        """The steps averaged over: requests were waiting (every step when none ever was)."""
        mask = np.asarray(self.saturated, dtype=bool)
        return mask if mask.any() else np.ones_like(mask)


@dataclass
class _Request:
    prompt_len: int
    output_len: int
    seqs: list[EngineSequence] = field(default_factory=list)


def choose_parents(num_beams: int, width: int, decay: float, rng: random.Random) -> list[int]:
    """How many of the next step's ``width`` beams continue each of the ``num_beams`` current
    beams (ranked best first): each new beam picks its parent independently, rank r with
    probability proportional to ``decay ** r``.

    >>> choose_parents(1, 4, 0.5, random.Random(0))
    [4]
    >>> counts = choose_parents(3, 3, 0.5, random.Random(0))
    >>> len(counts), sum(counts)
    (3, 3)
    """
    if num_beams == 1:
        return [width]
    weights = [decay**r for r in range(num_beams)]
    counts = [0] * num_beams
    for parent in rng.choices(range(num_beams), weights=weights, k=width):
        counts[parent] += 1
    return counts


def run_engine(
    trace: Trace,
    *,
    block_size: int,
    num_blocks: int,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 4096,
    max_model_len: int = MAX_MODEL_LEN,
    width: int = 1,
    window: int = 64,
    check: bool = False,
) -> Samples:
    """Serve ``trace`` with the engine's scheduler and block manager; sample every step.

    Requests join the waiting queue in arrival order while fewer than ``window`` wait (a
    saturated server with a bounded queue). ``width > 1`` is parallel sampling: the parent is
    forked ``width - 1`` times in the step where it samples its first token (as
    ``LLMEngine`` does). ``check`` compares the scheduler's computed counts with the block
    manager's token counts every step.
    """
    bm = BlockManager(
        BlockManagerConfig(
            block_size=block_size, num_gpu_blocks=num_blocks, enable_prefix_caching=False
        )
    )
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
    )
    sched = Scheduler(config, bm)
    owner: dict[int, _Request] = {}
    next_id = 0
    next_req = 0
    out = Samples(block_size)
    bs = block_size

    def new_seq(req: _Request, arrival: int, token_ids: list[int]) -> EngineSequence:
        nonlocal next_id
        seq = EngineSequence(
            next_id, str(arrival), arrival, [TOKEN] * req.prompt_len, token_ids=token_ids
        )
        owner[next_id] = req
        next_id += 1
        return seq

    while next_req < len(trace) or sched.has_unfinished_requests():
        while next_req < len(trace) and len(sched.waiting) < window:
            req = _Request(trace.prompt_lens[next_req], trace.output_lens[next_req])
            seq = new_seq(req, next_req, [TOKEN] * req.prompt_len)
            req.seqs = [seq]
            sched.add_request(seq)
            next_req += 1
        step = sched.schedule()
        if step.is_empty:
            raise RuntimeError(f"no progress: {bm.num_free_gpu_blocks} free blocks")
        running = sched.running
        computed = [s.num_computed for s in running]
        if check:
            assert computed == [bm.num_tokens(s.seq_id) for s in running]
        out.seqs.append(len(running))
        out.requests.append(len({id(owner[s.seq_id]) for s in running}))
        out.tokens.append(sum(computed))
        out.physical.append(num_blocks - bm.num_free_gpu_blocks)
        out.logical.append(sum(-(-n // bs) for n in computed))
        out.oracle.append(
            sum(owner[s.seq_id].prompt_len + owner[s.seq_id].output_len - 1 for s in running)
        )
        out.saturated.append(bool(sched.waiting))
        out.preempted.append(len(step.preempted))

        sampled: dict[int, int] = {}
        finished: set[int] = set()
        forks: list[tuple[EngineSequence, EngineSequence]] = []
        sampling = [sched.seqs[s.seq_id] for s in step.scheduled if s.sample]
        for seq in sampling:
            req = owner[seq.seq_id]
            first = len(seq.token_ids) == req.prompt_len
            seq.token_ids.append(TOKEN)
            sampled[seq.seq_id] = TOKEN
            if len(seq.token_ids) - req.prompt_len >= req.output_len:
                finished.add(seq.seq_id)
            elif first and seq is req.seqs[0]:  # n > 1: the parent's first token
                for _ in range(width - 1):
                    child = new_seq(req, seq.arrival, [TOKEN] * (req.prompt_len + 1))
                    forks.append((seq, child))
                    req.seqs.append(child)
        for parent, child in forks:  # before update() frees a parent that finished
            sched.fork(parent, child)
        sched.update(StepOutcome(sampled, frozenset(finished)))
    return out


def run_beam(
    trace: Trace,
    *,
    width: int,
    block_size: int,
    num_blocks: int,
    max_num_seqs: int = 256,
    decay: float = 0.5,
    seed: int = 0,
    check: bool = False,
) -> Samples:
    """A simulated beam search of width ``width`` on every request, straight on the block
    manager's ``allocate``, ``fork``, ``append_batch`` and ``free``; sampled every step.

    Requests are admitted in arrival order while the live beams stay within ``max_num_seqs``
    (each request counts ``width``). A step appends every live beam's pending token in one
    ``append_batch`` (copy-on-write where a forked beam shares a partly filled last block),
    allocates the prompts of the requests admitted, and is sampled; then each request
    samples: one that has its output length frees its beams, the others pick the next beams
    with :func:`choose_parents`. A beam chosen c times continues itself and is forked c - 1
    times; a beam chosen zero times is freed at once. The next beams rank in the order of
    their parents' ranks (a parent, then its forks).
    """
    bm = BlockManager(
        BlockManagerConfig(
            block_size=block_size, num_gpu_blocks=num_blocks, enable_prefix_caching=False
        )
    )
    rng = random.Random(seed)
    bs = block_size
    out = Samples(block_size)
    live: list[tuple[int, list[int]]] = []  # (request, beam ids best first) with pending tokens
    generated = [0] * len(trace)
    next_req = 0
    next_id = 0
    while next_req < len(trace) or live:
        pending = [b for _, beams in live for b in beams]
        if pending:
            ids = np.asarray(pending, dtype=np.int64)
            bm.append_batch(ids, np.full(ids.shape[0], TOKEN, dtype=np.int64))
        while next_req < len(trace) and (len(live) + 1) * width <= max_num_seqs:
            bm.allocate(next_id, np.full(trace.prompt_lens[next_req], TOKEN, dtype=np.int64))
            live.append((next_req, [next_id]))
            next_req += 1
            next_id += 1
        lengths = [bm.num_tokens(b) for _, beams in live for b in beams]
        if check:
            bm.check_integrity()
        out.seqs.append(len(lengths))
        out.requests.append(len(live))
        out.tokens.append(sum(lengths))
        out.physical.append(num_blocks - bm.num_free_gpu_blocks)
        out.logical.append(sum(-(-n // bs) for n in lengths))
        out.saturated.append(next_req < len(trace))
        out.preempted.append(0)
        still: list[tuple[int, list[int]]] = []
        for req, beams in live:
            generated[req] += 1
            if generated[req] >= trace.output_lens[req]:
                for b in beams:
                    bm.free(b)
                continue
            survivors: list[int] = []
            counts = choose_parents(len(beams), width, decay, rng)
            for b, count in zip(beams, counts):
                if count == 0:
                    bm.free(b)
            for b, count in zip(beams, counts):
                if count:
                    survivors.append(b)
                for _ in range(count - 1):
                    bm.fork(b, next_id)
                    survivors.append(next_id)
                    next_id += 1
            still.append((req, survivors))
        live = still
    return out


# --------------------------------------------------------------------- the pool-limited run
@dataclass
class PoolRun:
    """Per step of :func:`run_pool_limited`: resident sequences (after the step's decisions),
    sequences preempted in the step, and whether requests were waiting."""

    running: list[int] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)
    saturated: list[bool] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)


def run_pool_limited(
    trace: Trace,
    *,
    block_size: int,
    num_blocks: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    window: int = 4096,
    steps: int | None = None,
) -> PoolRun:
    """The scheduler's policy (``spec.scheduler``, no chunked prefill, recompute preemption)
    with batched block-manager calls, for pools that hold thousands of sequences.

    Per step: every resident sequence appends its pending token; when the pool cannot take
    them all, the newest residents are preempted (freed, back to the waiting queue in arrival
    order) until it can; then, if nobody was preempted, waiting requests are admitted first
    come first served while ``max_num_seqs``, the token budget and ``can_allocate`` allow.
    Every scheduled sequence samples one token; one that reaches its output length is freed.
    Stops after ``steps`` steps when given.
    """
    bs = block_size
    bm = BlockManager(
        BlockManagerConfig(
            block_size=block_size, num_gpu_blocks=num_blocks, enable_prefix_caching=False
        )
    )
    n = len(trace)
    prompt = np.asarray(trace.prompt_lens, dtype=np.int64)  # [N]
    target = np.asarray(trace.output_lens, dtype=np.int64)  # [N]
    generated = np.zeros(n, dtype=np.int64)  # [N]
    in_pool = np.zeros(n, dtype=np.int64)  # [N] tokens held by the block manager
    running: list[int] = []  # sequence ids = arrival indices, ascending
    waiting: list[int] = []
    next_req = 0
    out = PoolRun()
    while (next_req < n or running or waiting) and (steps is None or len(out.running) < steps):
        while next_req < n and len(waiting) < window:
            waiting.append(next_req)
            next_req += 1
        budget = max_num_batched_tokens
        ids = np.asarray(running, dtype=np.int64)  # [R]
        need = in_pool[ids] % bs == 0  # [R] the pending token opens a new block
        free = bm.num_free_gpu_blocks
        total = int(need.sum())
        keep = len(running)
        victims: list[int] = []
        while total > free and keep:
            keep -= 1
            victim = running[keep]
            total -= int(need[keep])
            free += -(-int(in_pool[victim]) // bs)
            victims.append(victim)
        for victim in victims:  # newest first, as the scheduler preempts them
            bm.free(victim)
            in_pool[victim] = 0
            bisect.insort(waiting, victim)
        running = running[:keep]
        scheduled = ids[:keep]
        if keep:
            bm.append_batch(scheduled, np.full(keep, TOKEN, dtype=np.int64))
            in_pool[scheduled] += 1
            budget -= keep
        admitted: list[int] = []
        if not victims:
            while waiting and len(running) + len(admitted) < max_num_seqs and budget > 0:
                seq_id = waiting[0]
                length = int(prompt[seq_id] + generated[seq_id])
                if length > budget:
                    break
                tokens = np.full(length, TOKEN, dtype=np.int64)
                if not bm.can_allocate([TOKEN] * length):
                    break
                bm.allocate(seq_id, tokens)
                waiting.pop(0)
                in_pool[seq_id] = length
                budget -= length
                admitted.append(seq_id)
        for seq_id in admitted:
            bisect.insort(running, seq_id)
        out.running.append(len(running))
        out.preempted.append(len(victims))
        out.saturated.append(bool(waiting))
        out.tokens.append(int(in_pool[running].sum()) if running else 0)
        out.blocks.append(num_blocks - bm.num_free_gpu_blocks)
        step_ids = np.asarray(running, dtype=np.int64)
        generated[step_ids] += 1
        done = step_ids[generated[step_ids] >= target[step_ids]]
        for seq_id in done.tolist():
            bm.free(seq_id)
        if done.size:
            gone = set(done.tolist())
            running = [s for s in running if s not in gone]
    return out


# ------------------------------------------------------------------------------ the figures
def utilization(s: Samples, max_model_len: int = MAX_MODEL_LEN) -> dict[str, float]:
    """Mean over the steady steps of tokens / slots for the three layouts, the prediction of
    paged utilization from the last-block fragmentation (``(bs - 1) / 2`` slots per
    sequence), and the mean resident tokens per sequence."""
    m = s.steady()
    tokens, seqs = s.array("tokens")[m], s.array("seqs")[m]
    bs = s.block_size
    return {
        "paged": float(np.mean(tokens / (s.array("physical")[m] * bs))),
        "paged_predicted": float(np.mean(tokens / (tokens + seqs * (bs - 1) / 2))),
        "contiguous_max": float(np.mean(tokens / (seqs * max_model_len))),
        "oracle": float(np.mean(tokens / s.array("oracle")[m])),
        "paged_all_steps": float(np.mean(s.array("tokens") / (s.array("physical") * bs))),
        "mean_tokens_per_seq": float(np.mean(tokens / seqs)),
        "mean_seqs": float(np.mean(seqs)),
        "steps": len(s.tokens),
        "steady_steps": int(m.sum()),
    }


def sharing_saving(s: Samples) -> float:
    """Mean over the steady steps of 1 - physical blocks / blocks without sharing."""
    m = s.steady()
    return float(np.mean(1.0 - s.array("physical")[m] / s.array("logical")[m]))


def predicted_parallel_saving(trace: Trace, width: int, block_size: int) -> float:
    """The saving of parallel sampling if every step of every request weighed the same: in
    its first step a request holds its prompt alone; in its t-th step after, ``width``
    sequences of ``p + t`` tokens share only the prompt's full blocks (the partly filled last
    prompt block is copied on the first append)."""
    physical = logical = 0
    for p, o in zip(trace.prompt_lens, trace.output_lens):
        own = -(-(p + np.arange(1, o)) // block_size)  # [o - 1] blocks of each sequence
        shared = p // block_size
        logical += -(-p // block_size) + width * int(own.sum())
        physical += -(-p // block_size) + (o - 1) * shared + width * int((own - shared).sum())
    return 1.0 - physical / logical


def contiguous_batch(budget_tokens: int, max_model_len: int) -> int:
    """Requests a contiguous allocator reserving ``max_model_len`` slots each can hold."""
    return budget_tokens // max_model_len


def batch_stats(run: PoolRun, warmup: int) -> dict[str, float]:
    """Resident requests over the saturated steps after ``warmup`` steps."""
    steady = np.asarray(run.saturated, dtype=bool)
    steady[:warmup] = False
    r = np.asarray(run.running, dtype=np.float64)[steady]
    if r.size == 0:
        raise ValueError("no saturated step after the warm-up: use more requests")
    tok = np.asarray(run.tokens, dtype=np.float64)[steady]
    return {
        "mean": float(r.mean()),
        "min": float(r.min()),
        "max": float(r.max()),
        "mean_tokens_per_seq": float(np.mean(tok / r)),
        "steady_steps": int(steady.sum()),
        "steps": len(run.running),
        "preemptions": int(np.sum(run.preempted)),
    }


# ------------------------------------------------------------------------------ the command
def measure(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    """Every run of the table; ``progress`` is told the name of each run before it starts."""
    budget = int(kv_budget()["budget_tokens"])
    result: dict[str, Any] = {"traces": {}, "utilization": {}, "batch": {}, "sharing": {}}
    series: dict[str, Any] = {}
    for name in ("sharegpt", "alpaca"):
        spec = TRACES[name]
        trace = make_trace(spec, getattr(args, f"requests_{name}"), args.seed)
        result["traces"][name] = {
            "prompt": f"round(LogNormal({spec.prompt_mu}, {spec.sigma})) in [{spec.low}, "
            f"{spec.high}]",
            "output": f"round(LogNormal({spec.output_mu}, {spec.sigma})) in [{spec.low}, "
            f"{spec.high}]",
            "requests": len(trace),
            "mean_prompt": float(np.mean(trace.prompt_lens)),
            "mean_output": float(np.mean(trace.output_lens)),
        }
        per_bs: dict[str, Any] = {}
        schedule: list[int] | None = None
        for bs in args.block_sizes:
            progress(f"{name} utilization bs {bs}")
            s = run_engine(
                trace,
                block_size=bs,
                num_blocks=budget // bs,
                max_num_seqs=args.max_num_seqs,
                max_model_len=args.max_model_len,
            )
            if schedule is None:
                schedule = s.seqs
            elif s.seqs != schedule:  # the pool never binds: every block size runs alike
                raise AssertionError(f"block size {bs} changed the schedule")
            per_bs[str(bs)] = utilization(s, args.max_model_len)
        result["utilization"][name] = per_bs

        progress(f"{name} batch")
        bs = 16
        steps = getattr(args, f"batch_steps_{name}")
        pool = run_pool_limited(
            make_trace(spec, getattr(args, f"batch_requests_{name}"), args.seed),
            block_size=bs,
            num_blocks=budget // bs,
            max_num_seqs=1 << 30,
            max_num_batched_tokens=args.batch_token_budget,
            steps=steps,
        )
        stats = batch_stats(pool, warmup=steps // 3)
        contiguous = {
            str(n): contiguous_batch(budget, n) for n in sorted({args.max_model_len, 4096, 8192})
        }
        result["batch"][name] = {
            "block_size": bs,
            "num_blocks": budget // bs,
            "paged": stats,
            "paged_predicted": budget / (stats["mean_tokens_per_seq"] + (bs - 1) / 2),
            "contiguous": contiguous,
            "ratio": {n: stats["mean"] / c for n, c in contiguous.items()},
        }
        series[name] = pool.running

        share = make_trace(spec, getattr(args, f"sharing_requests_{name}"), args.seed)
        sharing: dict[str, Any] = {"requests": len(share), "parallel": {}, "beam": {}}
        for width in args.widths:
            progress(f"{name} parallel n={width}")
            s = run_engine(
                share,
                block_size=16,
                num_blocks=budget // 16,
                max_num_seqs=args.max_num_seqs,
                width=width,
            )
            sharing["parallel"][str(width)] = _sharing_entry(s)
            sharing["parallel"][str(width)]["predicted"] = predicted_parallel_saving(
                share, width, 16
            )
        for width in args.widths:
            progress(f"{name} beam k={width}")
            s = run_beam(
                share,
                width=width,
                block_size=16,
                num_blocks=budget // 16,
                max_num_seqs=args.max_num_seqs,
                decay=args.beam_decay,
                seed=args.seed,
            )
            sharing["beam"][str(width)] = _sharing_entry(s)
        result["sharing"][name] = sharing
    result["batch_series"] = series
    return result


def _sharing_entry(s: Samples) -> dict[str, Any]:
    m = s.steady()
    return {
        "saving": sharing_saving(s),
        "mean_seqs": float(np.mean(s.array("seqs")[m])),
        "mean_requests": float(np.mean(s.array("requests")[m])),
        "steady_steps": int(m.sum()),
    }


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Three PNGs: utilization by block size, resident batch over time, sharing savings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    names = list(result["utilization"])
    colors = {"sharegpt": "tab:blue", "alpaca": "tab:orange"}

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name in names:
        per_bs = result["utilization"][name]
        sizes = [int(b) for b in per_bs]
        ax.plot(
            sizes,
            [100 * per_bs[b]["paged"] for b in per_bs],
            "o-",
            color=colors.get(name),
            label=f"{name}: paged (measured)",
        )
        ax.plot(
            sizes,
            [100 * per_bs[b]["paged_predicted"] for b in per_bs],
            "x:",
            color=colors.get(name),
            label=f"{name}: paged (predicted)",
        )
        first = per_bs[str(sizes[0])]
        ax.axhline(100 * first["oracle"], color=colors.get(name), ls="--", lw=1)
        ax.axhline(100 * first["contiguous_max"], color=colors.get(name), ls="-.", lw=1)
        ax.annotate(
            f"{name} oracle",
            (sizes[-1], 100 * first["oracle"]),
            fontsize=7,
            ha="right",
            va="bottom",
        )
        ax.annotate(
            f"{name} max-length",
            (sizes[-1], 100 * first["contiguous_max"]),
            fontsize=7,
            ha="right",
            va="bottom",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size (tokens)")
    ax.set_ylabel("KV slots holding tokens (%)")
    ax.set_ylim(0, 102)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("KV utilization per step (measured, this repository)", fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "memory_utilization.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, series in result["batch_series"].items():
        batch = result["batch"][name]
        ax.plot(series, color=colors.get(name), lw=1, label=f"{name}: paged, bs 16")
        c = batch["contiguous"][str(min(int(k) for k in batch["contiguous"]))]
        ax.axhline(c, color="gray", ls="--", lw=1)
    ax.annotate("contiguous, max length 2048", (0, c), fontsize=7, va="bottom")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("resident requests")
    ax.legend(fontsize=7)
    ax.set_title("Requests resident in the Llama-3-8B / H200 KV budget (measured)", fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "memory_batch.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.4), sharey=True)
    for ax, kind in zip(axes, ("parallel", "beam")):
        width = 0.38
        for i, name in enumerate(names):
            per = result["sharing"][name][kind]
            ks = list(per)
            xs = np.arange(len(ks)) + (i - 0.5) * width
            ax.bar(
                xs,
                [100 * per[k]["saving"] for k in ks],
                width,
                color=colors.get(name),
                label=name,
            )
            ax.set_xticks(
                np.arange(len(ks)), [f"{'n' if kind == 'parallel' else 'k'}={k}" for k in ks]
            )
        ax.set_title(f"{kind} {'sampling' if kind == 'parallel' else 'search'}", fontsize=9)
    axes[0].set_ylabel("blocks saved by sharing (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Sharing savings, block size 16 (measured)", fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "memory_sharing.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="The PagedAttention memory table: KV utilization, batch, sharing savings."
    )
    p.add_argument("--requests-sharegpt", type=int, default=1000, help="utilization runs")
    p.add_argument("--requests-alpaca", type=int, default=4000, help="utilization runs")
    p.add_argument("--batch-requests-sharegpt", type=int, default=20000)
    p.add_argument("--batch-requests-alpaca", type=int, default=150000)
    p.add_argument("--sharing-requests-sharegpt", type=int, default=300)
    p.add_argument("--sharing-requests-alpaca", type=int, default=1000)
    p.add_argument("--block-sizes", type=int, nargs="+", default=list(BLOCK_SIZES))
    p.add_argument("--widths", type=int, nargs="+", default=[2, 4, 6], help="n and beam width")
    p.add_argument("--beam-decay", type=float, default=0.5, help="parent weight ratio by rank")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN)
    p.add_argument("--batch-steps-sharegpt", type=int, default=3000, help="batch run steps")
    p.add_argument("--batch-steps-alpaca", type=int, default=600, help="batch run steps")
    p.add_argument("--batch-token-budget", type=int, default=16384, help="tokens per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory.json")
    p.add_argument("--plots", type=Path, default=ROOT / "docs" / "_static")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import numba
    from provenance import git_describe
    from tqdm import tqdm

    args = parse_args(argv)
    runs = 2 * (len(args.block_sizes) + 1 + 2 * len(args.widths))
    start = time.perf_counter()
    with tqdm(total=runs, unit="run") as bar:

        def progress(what: str) -> None:
            if bar.desc:
                bar.update(1)
            bar.set_description(what)

        result = measure(args, progress)
        bar.update(1)
    record = {
        "benchmark": "memory",
        "git_describe": git_describe(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "numba": numba.__version__,
        },
        "wall_s": round(time.perf_counter() - start, 1),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "plots", "no_plots")},
        "kv_budget": kv_budget(),
        **result,
        "paper": PAPER,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out} in {record['wall_s']} s")
    if not args.no_plots:
        for path in plot(record, args.plots):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
