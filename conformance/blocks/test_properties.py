"""The named bug-class properties against every registered implementation (CI profile)."""

from __future__ import annotations

import pytest

from conformance.blocks.properties import PROPERTIES
from conformance.blocks.runner import PROFILES, ci_seed, run_property
from conformance.registry import block_manager_factory, block_manager_names


@pytest.mark.parametrize("name", sorted(PROPERTIES))
@pytest.mark.parametrize("impl", block_manager_names())
def test_property(impl: str, name: str) -> None:
    run_property(name, block_manager_factory(impl), PROFILES["ci"], seed=ci_seed())
