"""Host time per decode step of the server's engine process against ``LLM.generate``'s.

Run from the repository root::

    PYTHONPATH=. python benchmarks/bench_engine_process_host.py [--seqs 256] [--steps 300]

On a GPU whose decode steps are host-bound, every millisecond of Python the engine process
spends per step lengthens the step. Against offline ``LLM.generate`` (``step(finished_only=True)``:
an output only for a request that finished) the engine process (``fast.api.engine_process``) does
three things more per step: its engine builds one ``DELTA`` :class:`RequestOutput` per running
request, :class:`~fast.api.engine_process.DeltaEncoder` turns each into a tuple, and the step's
message is pickled for the pipe (by the sender thread, under the same interpreter lock). This
script times exactly those on ``benchmarks/bench_engine_host.py``'s stub model (the
Llama-3-8B-shaped engine whose model returns zeros, so a step is the engine's host work): five
engines with the same ``seqs`` running requests, stepped in turn, one step each per round, so a
noisy host slows them alike:

1. ``generate``: ``step(finished_only=True)``;
2. ``delta step``: ``step()`` with ``DELTA`` requests;
3. ``+ encode``: the same, each output encoded;
4. ``engine process``: the same, and the message pickled as ``_serve_commands`` sent it
   before compact reports;
5. ``compact``: what ``_serve_commands`` sends now (``step_deltas``: ``step_compact()``, a
   running request with one sequence and no logprobs reporting a plain tuple after its first
   output, the rest encoded), pickled.

The collector's startup heap is frozen first, as the engine process does (``fast.api.gc_policy``).
Prints the median milliseconds per step of each, and each one's excess over ``generate``.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.bench_engine_host import make_engine


def _engine(seqs: int, steps: int, kind: str) -> Any:
    """The stub engine with ``seqs`` requests prefilled and decoding (``kind`` outputs)."""
    from benchmarks.gpu_engine import sharegpt_trace
    from fast.engine.sampling_params import RequestOutputKind, SamplingParams

    engine = make_engine(seqs)
    prompts, _ = sharegpt_trace(seqs)
    for i, p in enumerate(prompts):
        params = SamplingParams(
            temperature=0.0,
            max_tokens=steps + 64,
            ignore_eos=True,
            output_kind=RequestOutputKind[kind],
        )
        engine.add_request(str(i), p, params)
    while engine.scheduler.waiting:  # prefill steps (not timed)
        engine.step()
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.running) == seqs
    return engine


def measure(seqs: int, steps: int) -> dict[str, float]:
    """Median ms per step of each arrangement (the module docstring's five)."""
    from multiprocessing.reduction import ForkingPickler

    from fast.api.engine_process import DeltaEncoder, engine_counts, step_deltas

    gen, delta, encoded, full, compact = (
        _engine(seqs, steps, k) for k in ("FINAL_ONLY",) + ("DELTA",) * 4
    )
    enc_a, enc_b, enc_c = DeltaEncoder(), DeltaEncoder(), DeltaEncoder()
    for engine, enc in ((encoded, enc_a), (full, enc_b), (compact, enc_c)):
        for rid in engine._sent:  # their first outputs (prefill steps) were not encoded
            enc._prompt_lps[rid] = -1

    def encode_only() -> None:
        [enc_a.encode_delta(o) for o in encoded.step()]

    def engine_process() -> None:
        deltas = [enc_b.encode_delta(o) for o in full.step()]
        ForkingPickler.dumps(("step", None, deltas, engine_counts(full)))

    def compact_step() -> None:
        ForkingPickler.dumps(("step", None, step_deltas(compact, enc_c), engine_counts(compact)))

    runs: dict[str, Callable[[], Any]] = {
        "generate": lambda: gen.step(finished_only=True),
        "delta step": delta.step,
        "+ encode": encode_only,
        "engine process": engine_process,
        "compact": compact_step,
    }
    gc.collect()
    gc.freeze()  # as the engine process does after building its engine
    try:
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(steps):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    finally:
        gc.unfreeze()
    return {name: round(float(np.median(t)) * 1000, 3) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ms = measure(args.seqs, args.steps)
    base = ms["generate"]
    for name, v in ms.items():
        print(f"{args.seqs} seqs, {name}: median {v:.3f} ms/step (+{v - base:.3f} over generate)")


if __name__ == "__main__":
    main()
