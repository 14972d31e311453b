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


def reference_margin(hf: Any, batch: list[list[int]], want: list[list[int]]) -> float:
    """The smallest gap between transformers' best and second-best logit over the reference
    ``want`` (a near-tie there could flip under another summation order)."""
    gaps = []
    with torch.no_grad():
        for p, w in zip(batch, want, strict=True):
            logits = hf(torch.tensor([p + w])).logits[0, len(p) - 1 : -1]  # [len(w), V]
            top = logits.topk(2, dim=-1).values
            gaps.append(float((top[:, 0] - top[:, 1]).min()))
    return min(gaps)


def save_with_reference(
    model: Any, path: Path, prompts: list[list[int]], max_tokens: int
) -> Checkpoint:
    """Save ``model`` to ``path`` and record exactly ``max_tokens`` greedy tokens per prompt."""
    model.save_pretrained(path)
    return Checkpoint(path, prompts, greedy_reference(model, prompts, max_tokens))
