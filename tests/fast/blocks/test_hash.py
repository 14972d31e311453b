"""fast.blocks.hash reproduces the spec's block content hash bit for bit."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fast.blocks import hash as fast_hash
from spec.prefix_cache import chain_hashes, hash_block_tokens


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    parent=st.integers(-1, 2**63 - 1),
    tokens=st.lists(st.integers(0, 2**63 - 1), max_size=40),
    key=st.one_of(st.none(), st.text(max_size=40)),
)
def test_block_hash_equals_the_spec(parent: int, tokens: list[int], key: str | None) -> None:
    key_bytes = np.frombuffer((key or "").encode("utf-8"), dtype=np.uint8)
    got = fast_hash.hash_block_tokens(
        parent, np.array(tokens, dtype=np.int64), key_bytes, key is not None
    )
    assert got == hash_block_tokens(parent, tokens, key)


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(
    tokens=st.lists(st.integers(0, 50000), max_size=200),
    bs=st.sampled_from([1, 2, 16, 17, 32]),
    key=st.one_of(st.none(), st.sampled_from(["lora-a", "ü"])),
)
def test_chain_equals_the_spec(tokens: list[int], bs: int, key: str | None) -> None:
    key_bytes = np.frombuffer((key or "").encode("utf-8"), dtype=np.uint8)
    got = fast_hash.chain_hashes(np.array(tokens, dtype=np.int64), bs, key_bytes, key is not None)
    assert got.tolist() == chain_hashes(tokens, bs, key, hash_block_tokens)
