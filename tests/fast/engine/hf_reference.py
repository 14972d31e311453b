"""Shared by the end-to-end tests: a saved tiny checkpoint and transformers' greedy
continuations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class Checkpoint:
    path: Path
    prompts: list[list[int]]
    reference: list[list[int]]  # transformers' greedy continuation of each prompt


def greedy_reference(model: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Exactly ``max_tokens`` greedy tokens per prompt from transformers' ``generate``."""
    reference = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                eos_token_id=None,
                pad_token_id=None,
            )
            reference.append(out[0, len(p) :].tolist())
    return reference


def save_with_reference(
    model: Any, path: Path, prompts: list[list[int]], max_tokens: int
) -> Checkpoint:
    """Save ``model`` to ``path`` and record exactly ``max_tokens`` greedy tokens per prompt."""
    model.save_pretrained(path)
    return Checkpoint(path, prompts, greedy_reference(model, prompts, max_tokens))
