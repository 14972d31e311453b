"""Tiny random models and the single-process references the tensor-parallel tests compare to.

Weights are N(0, 0.3^2) (not the loader's 0.02), so greedy decoding has clear winners: the
row-parallel all-reduce adds its partial sums in another order than one process does (float32
results differ in the last bits), so a test is only meaningful where no step of the reference
has a near-tie; :func:`reference_margin` measures it and the tests require at least
``MIN_MARGIN`` (as tests/fast/model/test_architectures.py does against transformers).
"""

from __future__ import annotations

from typing import Any

import torch

from fast.engine.outputs import RequestOutput
from fast.loader import LoadedModel
from fast.loader.random_init import random_weights
from fast.model.config import ModelConfig

MIN_MARGIN = 1e-3
VOCAB = 101  # odd: the second rank's vocabulary shard has a padding row
ENGINE = {"dtype": "float32", "device": "cpu", "block_size": 4, "seed": 0}


def tiny(
    heads: int,
    kv_heads: int,
    *,
    seed: int,
    tie: bool = False,
    bias: bool = False,
    qk_norm: bool = False,
) -> LoadedModel:
    """A 2-layer model: hidden 32, head_dim 8, intermediate 45 (split 22 / 23 over 2 ranks)."""
    config = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=45,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attention_bias=bias,
        qk_norm=qk_norm,
    )
    model = random_weights(config, seed=seed, dtype=torch.float32, device="cpu", std=0.3)
    if bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
    return LoadedModel(model, None, config)


def prompts(seed: int, lens: tuple[int, ...]) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(1, VOCAB, (n,), generator=g).tolist()} for n in lens]


def tokens(outs: list[RequestOutput]) -> list[list[list[int]]]:
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


def reference_margin(outs: list[RequestOutput]) -> float:
    """The smallest top-1 minus top-2 logprob (= logit) gap over every greedy step of
    ``outs`` (generated with ``logprobs=2``)."""
    gaps = []
    for o in outs:
        for c in o.outputs:
            for step in c.logprobs or []:
                top = sorted((lp.logprob for lp in step.values()), reverse=True)
                gaps.append(top[0] - top[1])
    return min(gaps)
