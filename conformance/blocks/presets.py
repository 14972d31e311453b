"""Tiny pool configurations that reach the edge cases (full pools, shared blocks) in few steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Preset", "PRESETS", "preset"]


@dataclass(frozen=True)
class Preset:
    """A ``BlockManagerConfig`` plus the sizes of the inputs the suite draws for it."""

    name: str
    block_size: int
    num_gpu_blocks: int
    num_cpu_blocks: int = 0
    watermark: float = 0.0
    enable_prefix_caching: bool = False
    num_seq_ids: int = 6  # sequence ids 0..num_seq_ids-1 are drawn
    vocab: int = 3  # token ids 0..vocab-1: few distinct blocks, so prefixes repeat

    @property
    def max_prompt_len(self) -> int:
        """Long enough to span a few blocks and, now and then, more than the pool holds."""
        return self.block_size * max(3, self.num_gpu_blocks // 3)

    def config(self) -> Any:
        """The ``spec.block_manager.BlockManagerConfig`` of this preset."""
        from spec.block_manager import BlockManagerConfig

        return BlockManagerConfig(
            block_size=self.block_size,
            num_gpu_blocks=self.num_gpu_blocks,
            num_cpu_blocks=self.num_cpu_blocks,
            watermark=self.watermark,
            enable_prefix_caching=self.enable_prefix_caching,
        )


PRESETS: tuple[Preset, ...] = (
    Preset("plain", block_size=2, num_gpu_blocks=12),
    Preset("swap", block_size=3, num_gpu_blocks=10, num_cpu_blocks=10),
    Preset("prefix", block_size=2, num_gpu_blocks=10, enable_prefix_caching=True),
    Preset(
        "prefix_swap",
        block_size=4,
        num_gpu_blocks=16,
        num_cpu_blocks=8,
        watermark=0.1,
        enable_prefix_caching=True,
    ),
    Preset("bs1", block_size=1, num_gpu_blocks=8, num_cpu_blocks=4, enable_prefix_caching=True),
)


def preset(name: str) -> Preset:
    """The preset called ``name``; raises ``KeyError`` listing the known names."""
    for p in PRESETS:
        if p.name == name:
            return p
    raise KeyError(f"no preset {name!r}; known: {[p.name for p in PRESETS]}")
