"""LLM's prompt normalisation: one prompt or many; a mix of ids and prompts is an error."""

from __future__ import annotations

import pytest

from fast.api.llm import LLM
from fast.engine.engine import PromptType
from spec.errors import InvalidArgumentError


def test_one_prompt_or_many() -> None:
    assert LLM._as_list("hi") == ["hi"]
    assert LLM._as_list({"prompt": "hi"}) == [{"prompt": "hi"}]
    assert LLM._as_list([5, 6]) == [[5, 6]]
    many: list[PromptType] = ["a", [5, 6], {"prompt_token_ids": [7]}]
    assert LLM._as_list(many) == many


def test_ids_mixed_with_prompts_raise_instead_of_being_dropped() -> None:
    with pytest.raises(InvalidArgumentError, match="mixes token ids"):
        LLM._as_list(["a", 5])  # type: ignore[arg-type]
