"""``python -m conformance [--suite blocks|attention|scheduler|all] [--impl NAME] ...``.

Runs the conformance suites against a registered implementation and exits non-zero when anything
differs from the spec. ``--impl fast`` (the default) means the numba block manager, the engine's
scheduler, and for attention the Triton kernels on a GPU or their torch fallbacks on a CPU.
"""

from __future__ import annotations

import argparse
import sys

from conformance.registry import block_manager_factory, block_manager_names
from conformance.runner import PROFILES, run_suite

SUITES = ("blocks", "attention", "scheduler")


def _blocks(args: argparse.Namespace) -> bool:
    if args.impl not in block_manager_names():
        print(f"blocks: no block manager registered as {args.impl!r}; skipped")
        return True
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
        f"blocks: {args.impl} vs spec, profile {args.profile}: {result.counter.steps} steps in "
        f"{result.counter.runs} runs, {result.seconds:.1f} s\n  operations: {ops}"
    )
    for failure in result.failures:
        print(f"  FAILED: {failure}")
    return result.ok


def _attention(args: argparse.Namespace) -> bool:
    import torch

    from conformance.attention_impl import attention_names
    from conformance.attention_suite import run_attention_suite

    gpu = torch.cuda.is_available()
    name = ("triton" if gpu else "torch") if args.impl in ("fast", "spec") else args.impl
    if name not in attention_names():
        print(f"attention: no implementation registered as {name!r}; skipped")
        return True
    examples = 30 if args.profile == "ci" else 300
    result = run_attention_suite(name, device="cuda" if gpu else "cpu", max_examples=examples)
    errors = ", ".join(f"{k} {v:.1e}" for k, v in sorted(result.max_error.items()))
    print(
        f"attention: {name} vs spec: cases {result.cases}, largest error per dtype: {errors}, "
        f"{result.seconds:.1f} s"
    )
    for failure in result.failures:
        print(f"  FAILED: {failure}")
    return result.ok


def _scheduler(args: argparse.Namespace) -> bool:
    from conformance.scheduler_protocol import scheduler_factory, scheduler_names
    from conformance.scheduler_run import check_scheduler

    if args.impl not in scheduler_names():
        print(f"scheduler: no scheduler registered as {args.impl!r}; skipped")
        return True
    examples = 100 if args.profile == "ci" else 2000
    try:
        check_scheduler(scheduler_factory(args.impl), max_examples=examples)
    except AssertionError as e:
        print(f"scheduler: {args.impl} vs spec FAILED:\n  {e}")
        return False
    print(f"scheduler: {args.impl} vs spec: {examples} random request streams, same decisions")
    return True


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the chosen suites, print a summary; 0 when everything passed."""
    parser = argparse.ArgumentParser(prog="python -m conformance", description=__doc__)
    parser.add_argument("--suite", default="all", choices=(*SUITES, "all"))
    parser.add_argument(
        "--impl",
        default="fast",
        help=f"implementation name (block managers: {block_manager_names()}; "
        "attention: torch, triton; schedulers: fast, spec)",
    )
    parser.add_argument("--profile", default="ci", choices=sorted(PROFILES))
    parser.add_argument(
        "--steps", type=int, default=None, help="block suite: run at least this many steps"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: profile)")
    parser.add_argument(
        "--no-properties", action="store_true", help="block suite: state machine only"
    )
    args = parser.parse_args(argv)
    runners = {"blocks": _blocks, "attention": _attention, "scheduler": _scheduler}
    chosen = SUITES if args.suite == "all" else (args.suite,)
    ok = True
    for suite in chosen:
        ok = runners[suite](args) and ok
    print("PASSED: observably identical to the spec" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
