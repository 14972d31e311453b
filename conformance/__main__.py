"""``python -m conformance --impl fast [--steps N] [--seed S] [--profile ci|deep]``.

Runs the block-management suite against a registered implementation and exits non-zero when
anything differs from the spec.
"""

from __future__ import annotations

import argparse
import sys

from conformance.registry import block_manager_factory, block_manager_names
from conformance.runner import PROFILES, run_suite


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the suite, print a summary; 0 when everything passed."""
    parser = argparse.ArgumentParser(prog="python -m conformance", description=__doc__)
    parser.add_argument("--impl", default="fast", choices=block_manager_names())
    parser.add_argument("--profile", default="ci", choices=sorted(PROFILES))
    parser.add_argument("--steps", type=int, default=None, help="run at least this many steps")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: profile)")
    parser.add_argument("--no-properties", action="store_true", help="state machine only")
    args = parser.parse_args(argv)
    result = run_suite(
        args.impl,
        block_manager_factory(args.impl),
        PROFILES[args.profile],
        steps=args.steps,
        seed=args.seed,
        properties=not args.no_properties,
    )
    ops = ", ".join(f"{k} {v}" for k, v in sorted(result.counter.ops.items()))
    print(
        f"\n{args.impl} vs spec, profile {args.profile}: {result.counter.steps} steps in "
        f"{result.counter.runs} runs, {result.seconds:.1f} s\n  operations: {ops}"
    )
    if result.ok:
        print("PASSED: observably identical to the spec")
        return 0
    print(f"FAILED ({len(result.failures)}):")
    for failure in result.failures:
        print(f"  {failure}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
