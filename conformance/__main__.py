"""``python -m conformance --impl NAME|module:factory [--suite S] [--steps N] [--seed S]``.

Checks an implementation against the spec and prints one report per suite. ``--impl`` is a
built-in name (``fast``, ``spec``; ``torch``, ``triton`` for attention; anything registered;
other libraries' caches: ``transformers-cb`` and ``torch-paged`` for blocks in the semantic mode,
``torch-flex`` for attention, see ``conformance.adapters``) or
``package.module:attribute``, any importable factory (its suite defaults to ``blocks``; pick
another with ``--suite``). ``fast`` means the numba block manager, the engine's scheduler, and
for attention the Triton kernels on a GPU or their torch fallback without one.

Exit status: 0 when every suite ran and passed; 1 when one differs from the spec; 2 for a usage
error (unknown implementation, an attribute that cannot be imported, hypothesis missing); 3 when
nothing differed but a suite could not run for this implementation (not run is not a pass).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

SUITES = ("blocks", "scheduler", "attention")
EXIT_PASSED, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUN = 0, 1, 2, 3
INSTALL_HINT = "pip install pagedkv[conformance]"


class UsageError(Exception):
    """A command-line problem: printed, exit status 2."""


def _builtin_names() -> dict[str, list[str]]:
    """Built-in implementation names per suite (attention: ``fast``/``spec`` pick the default)."""
    from conformance.adapters import ATTENTION_ADAPTERS, semantic_adapter_names
    from conformance.attention.impl import attention_names
    from conformance.registry import block_manager_names
    from conformance.scheduler.protocol import scheduler_names

    return {
        "blocks": sorted({*block_manager_names(), *semantic_adapter_names()}),
        "scheduler": scheduler_names(),
        "attention": sorted({*attention_names(), *ATTENTION_ADAPTERS, "fast", "spec"}),
    }


def _load(target: str) -> Any:
    """The object named by ``package.module:attribute`` (dots allowed in the attribute)."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--impl {target!r}: expected package.module:attribute")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--impl {target!r}: cannot import {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"--impl {target!r}: {module_name} has no {attr!r}") from None
    return obj


def _attention_object(obj: Any) -> Any:
    """An attention implementation: the object itself, or what a zero-argument factory returns."""
    if hasattr(obj, "paged_decode") and hasattr(obj, "paged_prefill"):
        return obj
    if callable(obj):
        return obj()
    raise UsageError(f"{obj!r} is neither an attention implementation nor a factory of one")


def _run(suite: str, impl: str, target: Any, args: argparse.Namespace) -> Any:
    """The report of ``suite`` for ``impl`` (``target`` is the loaded object, or None)."""
    from conformance.api import check_attention, check_block_manager, check_scheduler
    from conformance.report import Report

    seed, steps = args.seed, args.steps
    log: Callable[[str], None] = print if args.verbose else (lambda line: None)
    if suite == "blocks":
        from conformance.adapters import check_semantic_adapter, semantic_adapter_names
        from conformance.registry import block_manager_factory, block_manager_names

        if target is None and impl in semantic_adapter_names():
            programs = steps or (3000 if args.profile == "deep" else 300)
            return check_semantic_adapter(
                impl, programs=programs, shrink_seconds=args.shrink_seconds, log=log
            )
        if target is None and impl not in block_manager_names():
            return Report(suite, impl, "not run", reason="no block manager of that name")
        factory = target if target is not None else block_manager_factory(impl)
        return check_block_manager(
            factory,
            steps=steps,
            seed=seed,
            profile=args.profile,
            properties=not args.no_properties,
            name=impl,
            shrink_seconds=args.shrink_seconds,
            log=log,
        )
    if suite == "scheduler":
        from conformance.scheduler.protocol import scheduler_factory, scheduler_names
        from conformance.scheduler.run import SCHEDULER_CI_EXAMPLES

        if target is None and impl not in scheduler_names():
            return Report(suite, impl, "not run", reason="no scheduler of that name")
        factory = target if target is not None else scheduler_factory(impl)
        deep = SCHEDULER_CI_EXAMPLES * 10
        examples = steps or (deep if args.profile == "deep" else None)
        return check_scheduler(
            factory,
            examples=examples,
            seed=seed,
            name=impl,
            shrink_seconds=args.shrink_seconds,
            log=log,
        )
    from conformance.adapters import ATTENTION_ADAPTERS, attention_adapter
    from conformance.attention.impl import KernelsAttention, attention_names

    if target is not None:
        obj = _attention_object(target)
    elif impl in ATTENTION_ADAPTERS:
        obj = attention_adapter(impl)
    elif impl in ("fast", "spec"):
        obj = KernelsAttention("auto")  # Triton on a GPU, the torch fallback without one
    elif impl in attention_names():
        from conformance.attention.impl import attention_impl

        obj = attention_impl(impl)
    else:
        return Report(suite, impl, "not run", reason="no attention implementation of that name")
    examples = steps or (30 if args.profile == "ci" else 300)
    return check_attention(obj, examples=examples, seed=seed, name=impl)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m conformance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--impl", default="fast", help="built-in name or package.module:factory")
    parser.add_argument(
        "--suite",
        choices=(*SUITES, "all"),
        default=None,
        help="default: all for a built-in name, blocks for package.module:factory",
    )
    parser.add_argument("--profile", default="ci", choices=("ci", "deep"))
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="blocks: at least N state-machine steps (semantic mode: N programs); scheduler: N "
        "request streams per property; attention: N cases per operation",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: profile)")
    parser.add_argument(
        "--no-properties", action="store_true", help="blocks: the state machine only"
    )
    parser.add_argument(
        "--shrink-seconds",
        type=float,
        default=20.0,
        help="most time spent shrinking one failure to a short script (default 20)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per check")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the chosen suites, print their reports; see the exit statuses."""
    args = _parser().parse_args(argv)
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        print(f"the conformance suite needs hypothesis: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_USAGE
    try:
        names = _builtin_names()
        custom = ":" in args.impl
        if custom:
            target = _load(args.impl)
        elif any(args.impl in n for n in names.values()):
            target = None
        else:
            choices = sorted({n for ns in names.values() for n in ns})
            raise UsageError(
                f"unknown implementation {args.impl!r}; choose one of {', '.join(choices)}, "
                "or give package.module:factory"
            )
        suite = args.suite or ("blocks" if custom else "all")
        chosen = SUITES if suite == "all" else (suite,)
        reports = [_run(s, args.impl, target, args) for s in chosen]
    except UsageError as exc:
        print(f"python -m conformance: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for report in reports:
        print(report.summary())
    if any(r.status == "failed" for r in reports):
        print("FAILED: the implementation differs from the spec")
        return EXIT_FAILED
    if any(r.status == "not run" for r in reports):
        skipped = ", ".join(r.suite for r in reports if r.status == "not run")
        print(f"INCOMPLETE: not run: {skipped} (nothing differed in what ran)")
        return EXIT_NOT_RUN
    if any(r.backend.startswith("semantic mode") for r in reports):
        print("PASSED: every invariant checked holds (semantic mode: policies are not compared)")
    else:
        print("PASSED: observably identical to the spec")
    return EXIT_PASSED


if __name__ == "__main__":
    sys.exit(main())
