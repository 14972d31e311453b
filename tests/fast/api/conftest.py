"""Fixtures of the API tests: the tiny character-level checkpoint and a random tokenizer-less
model (both from ``tests/fast/engine/test_llm_model.py``'s helpers; no download)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))

from test_llm_model import make_char_model  # noqa: E402


@pytest.fixture(scope="session")
def char_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face directory: 2-layer Llama, one token per character, a chat template."""
    return make_char_model(tmp_path_factory.mktemp("api") / "char")


@pytest.fixture(scope="session")
def tiny() -> object:
    """Random weights and no tokenizer: prompts are token ids."""
    import torch

    from fast.loader import random_model
    from fast.model.config import ModelConfig

    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
    )
    return random_model(config, seed=0, dtype=torch.float32)
