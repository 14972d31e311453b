"""How many key splits a decode launch uses (flash-decoding).

One program handles one (sequence, KV head, split). With few sequences the grid
``B * Hkv`` leaves most of the GPU's multiprocessors idle, so the keys are cut into
``num_splits`` ranges whose partial results are merged by their log-sum-exp. More splits fill
the machine but each adds a partial ``[D]`` vector to write and merge, and a split shorter than
a tile or two wastes its setup. The rule, fitted to a sweep on an H200 (132 SMs; Hq 32, Hkv 8,
D 128, bf16; see docs/kernels.md): no split once ``B * Hkv`` reaches ``2 * num_sms`` programs;
below that, aim for ``4 * num_sms`` programs, rounded down to a power of two, with at least
``min_tokens`` keys per split and at most ``max_splits`` splits.
"""

from __future__ import annotations

__all__ = ["H200_SMS", "choose_num_splits"]

#: Multiprocessors of an H200 (SXM), the target the defaults were tuned for.
H200_SMS = 132


def choose_num_splits(
    batch: int,
    num_kv_heads: int,
    max_len: int,
    *,
    num_sms: int = H200_SMS,
    min_tokens: int = 128,
    max_splits: int = 64,
) -> int:
    """Split factor for ``batch * num_kv_heads`` programs over up to ``max_len`` keys.

    >>> choose_num_splits(1, 8, 4096)      # 8 programs: 32 splits of 128 keys
    32
    >>> choose_num_splits(16, 8, 2048)     # 128 programs: 4 splits
    4
    >>> choose_num_splits(64, 8, 4096)     # 512 programs already fill the GPU
    1
    >>> choose_num_splits(1, 8, 100)       # too short to split
    1
    """
    programs = max(1, batch * num_kv_heads)
    if programs >= 2 * num_sms:
        return 1
    want = -(-4 * num_sms // programs)  # ceil
    want = 1 << (want.bit_length() - 1)  # round down to a power of two
    by_length = max(1, max_len // min_tokens)
    return max(1, min(want, by_length, max_splits))
