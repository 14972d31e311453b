"""Run the attention conformance suite against a registered implementation, outside pytest.

``run_attention_suite("triton", device="cuda")`` draws decode and prefill cases with hypothesis
(small shapes on CPU, larger with pools past 2^31 elements on a GPU), runs each with a poisoned
``out``, and compares with the float64 spec. Hypothesis shrinks a failure to a small case, which
the result reports with its error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed

from conformance.attention.cases import (
    CPU_LIMITS,
    GPU_LIMITS,
    GPU_PREFILL_LIMITS,
    AttentionCase,
    attention_cases,
    build_case,
    fp8_attention_cases,
)
from conformance.attention.impl import AttentionImpl, attention_impl, check_decode, check_prefill
from conformance.report import counterexample_of

__all__ = ["AttentionSuiteResult", "run_attention_suite"]


@dataclass
class AttentionSuiteResult:
    """Cases run per operation, the largest error seen per dtype, and failures (as text).

    ``counterexamples[i]`` is the shrunk case of ``failures[i]``, as hypothesis printed it.
    ``skipped`` is what the implementation declared it cannot express, with the reason.
    """

    impl: str
    cases: dict[str, int] = field(default_factory=dict)
    max_error: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    counterexamples: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every case met its tolerance."""
        return not self.failures


def run_attention_suite(
    name: str | AttentionImpl,
    *,
    device: str = "cpu",
    max_examples: int = 30,
    derandomize: bool = True,
    seed: int | None = None,
    fp8: bool = False,
) -> AttentionSuiteResult:
    """Decode and prefill of implementation ``name`` (or an object) against the spec.

    An implementation that cannot express every case narrows what is drawn with an optional
    ``case_limits(limits, device=..., prefill=...)`` method and names what it left out in an
    optional ``not_expressible`` mapping (what -> why), copied to the result's ``skipped``.

    With ``fp8`` the cases read an fp8 KV cache (:func:`~conformance.attention.cases.
    fp8_attention_cases`): the implementation takes ``k_scale``/``v_scale`` and is held to the
    spec over the dequantized cache and to the error bound over the unquantized K/V.

    >>> r = run_attention_suite("torch", max_examples=3)
    >>> r.ok, r.cases
    (True, {'paged_decode': 3, 'paged_prefill': 3})
    >>> run_attention_suite("torch", max_examples=2, fp8=True).ok
    True
    """
    impl = attention_impl(name) if isinstance(name, str) else name
    result = AttentionSuiteResult(impl=impl.name)
    start = time.perf_counter()
    gpu = device != "cpu"
    plans = (
        ("paged_decode", GPU_LIMITS if gpu else CPU_LIMITS, False, check_decode),
        ("paged_prefill", GPU_PREFILL_LIMITS if gpu else CPU_LIMITS, True, check_prefill),
    )
    narrow = getattr(impl, "case_limits", None)
    for op, limits, prefill, check in plans:
        result.cases[op] = 0
        if narrow is not None:
            limits = narrow(limits, device=device, prefill=prefill)

        @settings(
            max_examples=max_examples,
            derandomize=derandomize and seed is None,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=(fp8_attention_cases if fp8 else attention_cases)(limits, prefill=prefill))
        def run(case: AttentionCase) -> None:
            err = check(impl, build_case(case, device))  # raises AssertionError beyond bound
            result.cases[op] += 1
            result.max_error[case.dtype] = max(result.max_error.get(case.dtype, 0.0), err)

        test = run if seed is None else hypothesis_seed(seed)(run)
        try:
            test()
        except AssertionError as e:
            result.failures.append(f"{op}: {e}")
            result.counterexamples.append(counterexample_of(e, ()))
    result.skipped = dict(getattr(impl, "not_expressible", {}))
    result.seconds = time.perf_counter() - start
    return result
