"""Each named property catches the mutant planted for its bug class, at CI's own budget and seed.

The budget is ``PROFILES["ci"].property_examples`` (what ``pytest --pyargs conformance`` and
``python -m conformance`` run) and the seed is CI's (``conformance.runner.ci_seed``, derived
from the commit): a mutant that escapes this test would escape CI. docs/conformance.md records
how many examples each mutant takes to be caught over many seeds.
"""

from __future__ import annotations

import pytest
from block_mutants import MUTANTS, mutant_factory
from hypothesis import Phase, settings

from conformance.lockstep import ConformanceError
from conformance.presets import preset
from conformance.properties import PROPERTIES
from conformance.runner import PROFILES, ci_seed, run_machine

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


# The general state machine finds these mutants too, on the CI budget of one preset. Not the
# other two: hash collisions are only planted by their named property, and a stale index entry
# only bites when an evicted block's old prompt comes back while the block holds other tokens,
# which the tiny-pool churn of ``evicted_block_not_in_hash_index`` reaches quickly.
MACHINE_CATCHES = {
    "touch_before_allocate": "prefix_swap",
    "fork_free_refcounts_under_beam_search": "prefix_swap",
    "swap_in_reserves_append_capacity": "prefix_swap",
    "no_blocks_leaked_on_abort": "prefix_swap",
}


@pytest.mark.parametrize("name", sorted(MACHINE_CATCHES))
def test_mutant_is_caught_by_the_state_machine_too(name: str) -> None:
    with pytest.raises(ConformanceError):
        run_machine(
            mutant_factory(name), preset(MACHINE_CATCHES[name]), CI, shrink=False, seed=ci_seed()
        )


# That the same searches find nothing on the real implementations is conformance/test_properties.py
# (same budget, same seed).
