"""The three checks of the public API: block manager, scheduler, attention.

Each takes the implementation under test (a factory, or for attention an object), runs the
corresponding suite against the spec, and returns a :class:`~conformance.report.Report`; with
``raise_on_failure=True`` a report that did not pass raises
:class:`~conformance.report.ConformanceFailure` instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from conformance.report import Failure, Report, counterexample_of

__all__ = ["check_block_manager", "check_scheduler", "check_attention", "attention_backend"]


def _finish(report: Report, raise_on_failure: bool) -> Report:
    if raise_on_failure:
        report.raise_for_failure()
    return report


def _name(obj: Any) -> str:
    return str(getattr(obj, "name", None) or getattr(obj, "__name__", None) or type(obj).__name__)


def check_block_manager(
    factory: Callable[..., Any],
    *,
    steps: int | None = None,
    seed: int | None = None,
    profile: str = "ci",
    properties: bool | Sequence[str] = True,
    name: str | None = None,
    raise_on_failure: bool = False,
    shrink_seconds: float = 20.0,
    log: Callable[[str], None] = lambda line: None,
) -> Report:
    """Check a block manager against ``spec.block_manager.BlockManager``.

    ``factory(config, **kwargs)`` receives a ``spec.block_manager.BlockManagerConfig`` (and, for
    the hash-collision property, ``hash_fn=``) and returns a fresh object with the
    :class:`~conformance.protocols.BlockManagerImpl` surface. The state machine runs on every
    preset (``steps``: at least this many steps, in rounds), then the named properties
    (``properties``: all, none, or a list of names from
    ``conformance.blocks.properties.PROPERTIES``).
    ``seed`` None is the profile's own (``ci``: derandomized); a seed draws other programs,
    repeatably. ``log`` receives one line per preset and property as they finish. A failure is
    shrunk for at most ``shrink_seconds`` before it is reported.
    """
    from conformance.blocks.runner import PROFILES, run_suite, shrink_time_limit

    if profile not in PROFILES:
        raise ValueError(f"no profile {profile!r}; known: {sorted(PROFILES)}")
    with shrink_time_limit(shrink_seconds):
        report = run_suite(
            name or _name(factory),
            factory,
            PROFILES[profile],
            steps=steps,
            seed=seed,
            properties=properties,
            log=log,
        )
    return _finish(report, raise_on_failure)


def check_scheduler(
    factory: Callable[..., Any],
    *,
    examples: int | None = None,
    seed: int | None = None,
    properties: Sequence[str] | None = None,
    reference: Callable[..., Any] | None = None,
    name: str | None = None,
    raise_on_failure: bool = False,
    shrink_seconds: float = 20.0,
    log: Callable[[str], None] = lambda line: None,
) -> Report:
    """Check a scheduler against ``spec.scheduler.Scheduler``, step by step.

    ``factory(scheduler_config, block_manager_config)`` returns a fresh object with the
    :class:`~conformance.scheduler.protocol.SchedulerImpl` surface (its own block manager
    inside). Each named property of ``conformance.scheduler.run.SCHEDULER_PROPERTIES`` (or those
    in ``properties``) plays ``examples`` random request streams (default: CI's budget) against
    it and the spec, and requires equal decisions at every step, no block returned while a step
    in flight uses it, and no block leaked at the end.
    """
    from conformance.scheduler.run import (
        SCHEDULER_CI_EXAMPLES,
        SCHEDULER_PROPERTIES,
    )
    from conformance.scheduler.run import (
        check_scheduler as run_property,
    )

    chosen = list(SCHEDULER_PROPERTIES) if properties is None else list(properties)
    unknown = [p for p in chosen if p not in SCHEDULER_PROPERTIES]
    if unknown:
        raise ValueError(f"no scheduler property {unknown}; known: {list(SCHEDULER_PROPERTIES)}")
    from conformance.blocks.runner import shrink_time_limit

    budget = SCHEDULER_CI_EXAMPLES if examples is None else examples
    report = Report("scheduler", name or _name(factory), seed=seed)
    start = time.perf_counter()
    for prop in chosen:
        t0 = time.perf_counter()
        seen = [0]

        def count(_wl: Any, seen: list[int] = seen) -> None:
            seen[0] += 1

        try:
            with shrink_time_limit(shrink_seconds):
                run_property(
                    factory,
                    reference,
                    max_examples=budget,
                    seed=seed,
                    on_workload=count,
                    focus=SCHEDULER_PROPERTIES[prop],
                )
            status = "ok"
        except Exception as exc:  # noqa: BLE001 - reported
            status = f"FAILED: {type(exc).__name__}"
            first = (str(exc).strip().splitlines() or [""])[0]
            message = f"{type(exc).__name__}: {first}"
            report.failures.append(Failure(prop, message, counterexample_of(exc, ())))
        report.runs += seen[0]
        report.checked.append(prop)
        log(f"property {prop:40s} {time.perf_counter() - t0:6.1f} s  {status}")
    report.steps = report.runs  # one request stream is one example
    report.seconds = time.perf_counter() - start
    report.status = "failed" if report.failures else "passed"
    return _finish(report, raise_on_failure)


def attention_backend(impl: Any, device: str) -> tuple[str, str]:
    """(backend that will actually run, reason it cannot run or "") for ``impl`` on ``device``.

    For the built-in ``kernels`` adapters: ``"auto"`` is Triton on CUDA and the torch fallback
    elsewhere; ``"triton"`` off CUDA needs ``TRITON_INTERPRET=1``. Another implementation is
    reported by its ``backend_on(device)`` when it has one, else by its name, on ``device``.
    """
    from conformance.attention.impl import KernelsAttention

    if not isinstance(impl, KernelsAttention):
        describe = getattr(impl, "backend_on", None)
        if callable(describe):
            return str(describe(device)), ""
        return f"{_name(impl)} on {device}", ""
    from kernels.backend import interpreting

    cuda = device.startswith("cuda")
    if impl.backend == "torch":
        return f"torch fallback on {device}", ""
    if impl.backend == "auto":
        if cuda:
            return "triton on cuda", ""
        return (
            f"torch fallback on {device} (no CUDA device: the Triton kernels were not checked)",
            "",
        )
    if cuda:
        return "triton on cuda", ""
    if interpreting():
        return f"triton interpreter on {device} (TRITON_INTERPRET=1)", ""
    return "", "the triton backend needs a CUDA device or TRITON_INTERPRET=1"


def check_attention(
    impl: Any,
    *,
    device: str | None = None,
    examples: int = 30,
    seed: int | None = None,
    name: str | None = None,
    raise_on_failure: bool = False,
) -> Report:
    """Check paged decode and prefill against the float64 spec, within ``spec.tolerances``.

    ``impl`` is an object with the :class:`~conformance.attention.impl.AttentionImpl` surface
    (or a registered name such as ``"torch"`` or ``"triton"``). ``device`` defaults to CUDA when
    there is one. The report's ``backend`` says what actually ran; a backend that cannot run
    here makes the report ``"not run"``, never passed.
    """
    import torch

    from conformance.attention.impl import attention_impl
    from conformance.attention.suite import run_attention_suite

    obj = attention_impl(impl) if isinstance(impl, str) else impl
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend, reason = attention_backend(obj, dev)
    report = Report("attention", name or _name(obj), seed=seed, backend=backend)
    if reason:
        report.status, report.reason = "not run", reason
        return _finish(report, raise_on_failure)
    result = run_attention_suite(
        obj, device=dev, max_examples=examples, derandomize=seed is None, seed=seed
    )
    report.steps = report.runs = sum(result.cases.values())
    report.checked = [f"{op} ({n} cases)" for op, n in result.cases.items()]
    report.checked += [f"max error {k} {v:.1e}" for k, v in sorted(result.max_error.items())]
    report.failures = [
        Failure(text.split(":", 1)[0], text.split(":", 1)[1].strip(), case)
        for text, case in zip(result.failures, result.counterexamples)
    ]
    report.skipped = [f"{what} ({why})" for what, why in result.skipped.items()]
    report.seconds = result.seconds
    report.status = "failed" if report.failures else "passed"
    return _finish(report, raise_on_failure)
