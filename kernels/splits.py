"""How many key splits a decode launch uses (flash-decoding).

One program handles one (sequence, KV head, split). With few sequences the grid
``B * Hkv`` leaves most of the GPU's multiprocessors idle, so the keys are cut into
``num_splits`` ranges whose partial results are merged by their log-sum-exp. More splits fill
the machine but each adds a partial ``[D]`` vector to write and merge, and a split shorter than
a few tiles wastes its setup. The rule: aim for ``waves`` programs per multiprocessor, never
give a split fewer than ``min_tokens`` keys, and never exceed ``max_splits``.
"""

from __future__ import annotations

__all__ = ["H200_SMS", "choose_num_splits"]

#: Multiprocessors of an H200 (SXM), the target the defaults were tuned for.
H200_SMS = 132


def choose_num_splits(
    batch: int, num_kv_heads: int, max_len: int, *, num_sms: int = H200_SMS,
    waves: int = 2, min_tokens: int = 256, max_splits: int = 64,
) -> int:
    """Split factor for ``batch * num_kv_heads`` programs over up to ``max_len`` keys.

    >>> choose_num_splits(1, 8, 4096)      # 8 programs: split to fill 132 SMs
    16
    >>> choose_num_splits(64, 8, 4096)     # 512 programs already fill the GPU
    1
    >>> choose_num_splits(1, 8, 100)       # too short to split
    1
    """
    programs = max(1, batch * num_kv_heads)
    want = -(-waves * num_sms // programs)  # ceil
    by_length = max(1, max_len // min_tokens)
    return max(1, min(want, by_length, max_splits))
