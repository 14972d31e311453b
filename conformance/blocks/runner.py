"""Run the block-management suite: the state machine on every preset, then the named properties.

Profiles: ``ci`` is bounded (about 20,000 state-machine steps per implementation) and
deterministic unless a seed is given (CI passes one derived from the commit, see
:func:`ci_seed`); ``deep`` draws fresh random programs, more and longer ones.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase
from hypothesis import seed as hypothesis_seed
from hypothesis import settings as Settings
from hypothesis.stateful import get_state_machine_test

from conformance.blocks.machine import StepCounter, make_block_machine
from conformance.blocks.presets import PRESETS, Preset
from conformance.blocks.properties import PROPERTIES
from conformance.protocols import BlockManagerFactory
from conformance.report import Failure, Report, counterexample_of

__all__ = [
    "Profile",
    "PROFILES",
    "SEED_ENV",
    "ci_seed",
    "shrink_time_limit",
    "run_machine",
    "run_property",
    "run_suite",
]


@dataclass(frozen=True)
class Profile:
    """How much to run: examples and steps per state-machine run, examples per property."""

    name: str
    max_examples: int
    step_count: int
    property_examples: int
    derandomize: bool

    def settings(self, max_examples: int | None = None, *, shrink: bool = True) -> Settings:
        """Hypothesis settings of this profile (no example database, no deadline)."""
        phases = list(Phase) if shrink else [Phase.explicit, Phase.reuse, Phase.generate]
        return Settings(
            max_examples=max_examples or self.max_examples,
            stateful_step_count=self.step_count,
            derandomize=self.derandomize,
            database=None,
            deadline=None,
            report_multiple_bugs=False,
            suppress_health_check=list(HealthCheck),
            phases=phases,
        )


PROFILES: dict[str, Profile] = {
    "ci": Profile("ci", max_examples=100, step_count=50, property_examples=60, derandomize=True),
    "deep": Profile(
        "deep", max_examples=1000, step_count=200, property_examples=2000, derandomize=False
    ),
}


#: The environment variable that carries CI's seed (set by the repository's conftest.py).
SEED_ENV = "PAGEDKV_CONFORMANCE_SEED"


@contextmanager
def shrink_time_limit(seconds: float) -> Iterator[None]:
    """Bound the time hypothesis spends shrinking one failure (its own limit is 5 minutes).

    Shrinking a 50-step program replays it thousands of times; the report needs a readable
    script, not the smallest one. Uses hypothesis' engine constant when it exists, else nothing.
    Hypothesis' own messages (its "shrinking stopped" warning) are dropped: the report carries
    the counterexample.
    """
    from hypothesis.internal.conjecture import engine
    from hypothesis.reporting import with_reporter

    old = getattr(engine, "MAX_SHRINKING_SECONDS", None)
    with with_reporter(lambda message: None):
        if old is None:
            yield
            return
        engine.MAX_SHRINKING_SECONDS = seconds  # type: ignore[assignment]
        try:
            yield
        finally:
            engine.MAX_SHRINKING_SECONDS = old


def ci_seed() -> int | None:
    """The seed CI runs under (``$PAGEDKV_CONFORMANCE_SEED``), or None: derandomized."""
    value = os.environ.get(SEED_ENV, "").strip()
    return int(value) if value else None


def run_machine(
    factory: BlockManagerFactory,
    p: Preset,
    profile: Profile,
    *,
    seed: int | None = None,
    counter: StepCounter | None = None,
    max_examples: int | None = None,
    shrink: bool = True,
) -> None:
    """Run the state machine on preset ``p``; raises on the first (shrunk) failure."""
    machine = make_block_machine(factory, p, counter)
    settings = profile.settings(max_examples, shrink=shrink)
    if seed is not None:
        settings = Settings(settings, derandomize=False)
    test = get_state_machine_test(machine, settings=settings)
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    test()


def run_property(
    name: str, factory: BlockManagerFactory, profile: Profile, *, seed: int | None = None
) -> None:
    """Run the named property ``name`` (see :mod:`conformance.blocks.properties`)."""
    PROPERTIES[name](factory, profile.settings(profile.property_examples), seed=seed)


def run_suite(
    impl: str,
    factory: BlockManagerFactory,
    profile: Profile,
    *,
    steps: int | None = None,
    seed: int | None = None,
    properties: bool | Sequence[str] = True,
    log: Callable[[str], None] = print,
) -> Report:
    """The machine on every preset (in rounds until ``steps`` steps ran), then the properties.

    ``seed`` None keeps the profile's own randomness (the ci profile is derandomized); with a
    seed, round ``r`` of the machine runs under ``seed + r`` and every property under ``seed``.
    """
    names = list(PROPERTIES) if properties is True else list(properties or [])
    unknown = [name for name in names if name not in PROPERTIES]
    if unknown:
        raise ValueError(f"no block-manager property {unknown}; known: {list(PROPERTIES)}")
    report = Report("blocks", impl, seed=seed)
    counter = StepCounter()
    start = time.perf_counter()
    examples = None  # the profile's; with ``steps``, rounds sized to reach it in a few rounds
    if steps is not None:
        per_round = len(PRESETS) * profile.step_count
        examples = max(1, min(profile.max_examples, -(-steps // per_round)))
    rnd = 0
    while True:
        for p in PRESETS:
            before = counter.steps
            t0 = time.perf_counter()
            run_seed = seed + rnd if seed is not None else (None if rnd == 0 else rnd)
            check = f"machine[{p.name}]"
            try:
                run_machine(
                    factory, p, profile, seed=run_seed, counter=counter, max_examples=examples
                )
                status = "ok"
            except Exception as exc:  # noqa: BLE001 - reported, then the suite fails
                status = f"FAILED: {type(exc).__name__}: {exc}"
                report.failures.append(Failure(check, _message(exc), counterexample_of(exc)))
            if check not in report.checked:
                report.checked.append(check)
            log(
                f"machine {p.name:12s} {counter.steps - before:7d} steps "
                f"{time.perf_counter() - t0:6.1f} s  {status}"
            )
            if report.failures:
                break  # one shrunk counterexample is the report; the other presets can wait
        rnd += 1
        if steps is None or counter.steps >= steps or report.failures:
            break
    for name in names:
        t0 = time.perf_counter()
        try:
            run_property(name, factory, profile, seed=seed)
            status = "ok"
        except Exception as exc:  # noqa: BLE001
            status = f"FAILED: {type(exc).__name__}: {exc}"
            report.failures.append(Failure(name, _message(exc), counterexample_of(exc)))
        report.checked.append(name)
        log(f"property {name:40s} {time.perf_counter() - t0:6.1f} s  {status}")
    report.steps, report.runs = counter.steps, counter.runs
    report.seconds = time.perf_counter() - start
    report.status = "failed" if report.failures else "passed"
    return report


def _message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"
