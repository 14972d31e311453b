"""Examples-to-catch of every planted mutant, over several seeds (run by hand, not by pytest).

``python tests/conformance/measure_catch.py [blocks|machine|scheduler] [--seeds N] [--max M]``
prints, per mutant, the number of examples (programs or request streams) the search ran up to
and including the one that exposed the mutant, for hypothesis seeds ``0..N-1``; ``>M`` means
it was not caught within ``M`` examples. docs/conformance.md records the results.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))


def _count(factory: Callable[..., Any], counter: list[int]) -> Callable[..., Any]:
    def build(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return factory(*args, **kwargs)

    return build


def _no_shrink(max_examples: int) -> Any:
    from hypothesis import Phase, settings

    from conformance.blocks.properties import default_settings

    return settings(
        default_settings(max_examples), phases=[Phase.explicit, Phase.reuse, Phase.generate]
    )


def blocks(seeds: int, max_examples: int) -> dict[str, list[int | None]]:
    from block_mutants import MUTANTS, mutant_factory

    from conformance.blocks.properties import PROPERTIES

    out: dict[str, list[int | None]] = {}
    for name in MUTANTS:
        out[name] = []
        for seed in range(seeds):
            counter = [0]
            try:
                PROPERTIES[name](
                    _count(mutant_factory(name), counter), _no_shrink(max_examples), seed=seed
                )
                out[name].append(None)
            except AssertionError:
                out[name].append(counter[0] - 1)  # minus hypothesis' replay of the failure
    return out


def scheduler(seeds: int, max_examples: int) -> dict[str, list[int | None]]:
    """Per mutant and seed: examples of the first property (in order) that catches it.

    ``caught_by`` records which property that was.
    """
    from scheduler_mutants import SCHEDULER_MUTANTS

    from conformance.scheduler.run import (
        SCHEDULER_PROPERTIES,
        SchedulerConformanceError,
        check_scheduler,
    )
    from spec.errors import PagedKVError

    out: dict[str, list[int | None]] = {}
    for name, factory in SCHEDULER_MUTANTS.items():
        out[name] = []
        for seed in range(seeds):
            result: int | None = None
            for prop, focus in SCHEDULER_PROPERTIES.items():
                counter = [0]
                try:
                    check_scheduler(
                        _count(factory, counter),
                        max_examples=max_examples,
                        shrink=False,
                        seed=seed,
                        focus=focus,
                    )
                except (SchedulerConformanceError, PagedKVError):
                    result = counter[0] - 1  # minus hypothesis' replay of the failure
                    caught_by.setdefault(name, set()).add(prop)
                    break
            out[name].append(result)
    return out


caught_by: dict[str, set[str]] = {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["blocks", "scheduler"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max", type=int, default=1000)
    parser.add_argument("--only", default=None)
    args = parser.parse_args()
    t0 = time.perf_counter()
    result = {"blocks": blocks, "scheduler": scheduler}[args.what](args.seeds, args.max)
    for name, counts in result.items():
        shown = [str(c) if c is not None else f">{args.max}" for c in counts]
        done = sorted(c for c in counts if c is not None)
        stats = f"median {done[len(done) // 2]} max {done[-1]}" if done else ""
        by = ",".join(sorted(caught_by.get(name, ())))
        print(f"{name:40s} {stats:20s} {by:30s} {' '.join(shown)}")
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
