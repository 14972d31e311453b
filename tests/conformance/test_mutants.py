"""Each named property catches the mutant planted for its bug class, at CI's own budget and seed.

The budget is ``PROFILES["ci"].property_examples`` (what ``pytest --pyargs conformance`` and
``python -m conformance`` run) and the seed is CI's (``conformance.blocks.runner.ci_seed``, derived
from the commit): a mutant that escapes this test would escape CI. docs/conformance.md records
how many examples each mutant takes to be caught over many seeds.
"""

from __future__ import annotations

import pytest
from block_mutants import MUTANTS, mutant_factory
from hypothesis import Phase, settings

from conformance.blocks.lockstep import ConformanceError
from conformance.blocks.presets import preset
from conformance.blocks.properties import PROPERTIES
from conformance.blocks.runner import PROFILES, ci_seed, run_machine

CI = PROFILES["ci"]


def _ci_settings() -> settings:
    # CI's budget; no shrinking: finding the bug is what is tested here
    return settings(
        CI.settings(CI.property_examples), phases=[Phase.explicit, Phase.reuse, Phase.generate]
    )


def test_every_property_has_a_mutant() -> None:
    assert set(MUTANTS) == set(PROPERTIES)


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_property_catches_its_mutant_at_the_ci_budget(name: str) -> None:
    with pytest.raises(ConformanceError):
        PROPERTIES[name](mutant_factory(name), _ci_settings(), seed=ci_seed())


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_property_catches_its_mutant_derandomized(name: str) -> None:
    # the budget holds without a seed too (python -m conformance with no --seed)
    with pytest.raises(ConformanceError):
        PROPERTIES[name](mutant_factory(name), _ci_settings())


# The general state machine finds these two mutants too, within a few runs of one preset at CI's
# budget, whatever the seed. The other four need the focused programs of their property (the
# machine finds touch-after-allocate and swap-in capacity on some seeds only; hash collisions are
# only planted by their property; a stale index entry needs tiny-pool churn).
MACHINE_CATCHES = {
    "fork_free_refcounts_under_beam_search": "prefix_swap",
    "no_blocks_leaked_on_abort": "prefix_swap",
}


@pytest.mark.parametrize("name", sorted(MACHINE_CATCHES))
def test_mutant_is_caught_by_the_state_machine_too(name: str) -> None:
    with pytest.raises(ConformanceError):
        run_machine(
            mutant_factory(name), preset(MACHINE_CATCHES[name]), CI, shrink=False, seed=ci_seed()
        )


# That the same searches find nothing on the real implementations is
# conformance/blocks/test_properties.py (same budget, same seed).
