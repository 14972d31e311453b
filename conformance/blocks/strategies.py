"""Hypothesis strategies for block-manager inputs: prompts that share prefixes, sequence ids.

Most draws are legal (a live id, a non-empty prompt) and about one in ten is not, so that
programs both go deep (pools fill up, blocks get shared) and exercise every error path. Each
choice shrinks towards the legal branch.
"""

from __future__ import annotations

from hypothesis import strategies as st

from conformance.blocks.presets import Preset

__all__ = ["legal", "prompts", "filling_prompts", "extra_keys", "any_seq_id", "seq_id_from"]


def legal(one_in: int = 10) -> st.SearchStrategy[bool]:
    """True except about once in ``one_in`` draws (shrinks to True)."""
    return st.sampled_from([True] * (one_in - 1) + [False])


def _bases(p: Preset) -> list[list[int]]:
    """Three fixed long token streams; prompts are their prefixes plus a random tail."""
    n = p.max_prompt_len
    return [[(b * 5 + i * (b + 1)) % p.vocab for i in range(n)] for b in range(3)]


@st.composite
def prompts(draw: st.DrawFn, p: Preset, *, allow_empty: bool = False) -> list[int]:
    """A prompt: a prefix of one of three base streams (so cached prefixes recur) + a tail."""
    if allow_empty and not draw(legal(20), label="nonempty"):
        return []
    base = draw(st.sampled_from(_bases(p)))
    head = draw(st.integers(0, len(base)))
    tail = draw(st.lists(st.integers(0, p.vocab - 1), max_size=p.block_size + 1))
    tokens = base[:head] + tail
    if not tokens:
        tokens = [draw(st.integers(0, p.vocab - 1))]
    return tokens


@st.composite
def filling_prompts(draw: st.DrawFn, p: Preset) -> list[int]:
    """A prompt that starts like one of the base streams and fills the last block or two of
    the device pool (so an allocation of it needs nearly every free block)."""
    base = draw(st.sampled_from(_bases(p)))
    size = p.num_gpu_blocks * p.block_size
    length = draw(st.integers(size - 2 * p.block_size + 1, size), label="length")
    head = draw(st.integers(p.block_size, min(len(base), length)), label="shared prefix")
    tail = draw(
        st.lists(st.integers(0, p.vocab - 1), min_size=length - head, max_size=length - head)
    )
    return base[:head] + tail


def extra_keys() -> st.SearchStrategy[str | None]:
    """Mostly no extra key; sometimes one of two (a LoRA or multimodal salt)."""
    return st.sampled_from([None, None, None, "a", "b"])


def any_seq_id(p: Preset) -> st.SearchStrategy[int]:
    """Any id of the universe, live or not (illegal calls are part of the suite)."""
    return st.integers(0, p.num_seq_ids - 1)


@st.composite
def seq_id_from(draw: st.DrawFn, ids: list[int], p: Preset) -> int:
    """Mostly one of ``ids``; about one in ten draws any id of the universe."""
    ok: bool = draw(legal(), label="legal")
    if ids and ok:
        return draw(st.sampled_from(ids))
    return draw(any_seq_id(p))
