"""A model's ``generation_config.json``: default sampling parameters and extra end tokens.

What pagedkv takes from the file, following vLLM's ``generation_config`` engine argument:

* the sampling fields of :data:`SAMPLING_FIELDS` that the file sets (``temperature``,
  ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``, and ``max_new_tokens`` as
  ``max_tokens``) become the defaults of a request sent without
  :class:`~fast.engine.sampling_params.SamplingParams` (``LLM(generation_config="auto")``,
  the default); ``generation_config="vllm"`` keeps the library defaults, and a directory
  path reads that directory's file instead of the model's. ``override_generation_config``
  (a dict) replaces fields of whichever file is used, as in vLLM. Other fields (``do_sample``,
  ``max_length``, beam settings) are ignored.
* its ``eos_token_id`` (an int or a list) joins the model's end-of-sequence ids
  (:func:`merge_eos`), whatever the mode: a chat model whose generation config
  lists its end-of-turn token stops there.

A request with its own ``SamplingParams`` uses them as given; the file does not fill its
fields.

>>> cfg = GenerationConfig(
...     {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "eos_token_id": [2, 7]}
... )
>>> cfg.sampling_defaults()
{'temperature': 0.6, 'top_p': 0.9}
>>> cfg.eos_token_ids()
(2, 7)
>>> GenerationConfig({"max_new_tokens": 64, "top_k": 20}).sampling_defaults()
{'top_k': 20, 'max_tokens': 64}
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fast.model.config import ModelConfig

__all__ = [
    "FILE",
    "SAMPLING_FIELDS",
    "GenerationConfig",
    "GenerationConfigError",
    "choose_generation_config",
    "merge_eos",
    "read_generation_config",
]

FILE = "generation_config.json"
#: generation_config.json field -> SamplingParams field, for the fields used as defaults.
SAMPLING_FIELDS = {
    "repetition_penalty": "repetition_penalty",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "max_new_tokens": "max_tokens",
}


class GenerationConfigError(ValueError):
    """A generation config that cannot be used: unreadable, or a field out of its domain."""


@dataclass(frozen=True)
class GenerationConfig:
    """The fields of a ``generation_config.json`` (``path``: where they were read; None when
    they were given in code or there is no file)."""

    values: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def sampling_defaults(self) -> dict[str, Any]:
        """SamplingParams keyword arguments for the sampling fields the config sets."""
        return {
            ours: self.values[theirs]
            for theirs, ours in SAMPLING_FIELDS.items()
            if self.values.get(theirs) is not None
        }

    def eos_token_ids(self) -> tuple[int, ...]:
        """The config's end-of-sequence ids (an int or a list in the file)."""
        eos = self.values.get("eos_token_id")
        ids = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise GenerationConfigError(
                f"{self.path or 'generation config'}: eos_token_id={eos!r} is not a token id "
                "or a list of them"
            )
        return tuple(ids)

    def replaced(self, override: Mapping[str, Any]) -> GenerationConfig:
        """The config with ``override``'s fields replacing its own."""
        return GenerationConfig({**self.values, **override}, self.path)


def read_generation_config(directory: str | Path) -> GenerationConfig:
    """The ``generation_config.json`` of ``directory`` (empty when there is none).

    Raises :class:`GenerationConfigError` naming the file when it is not a JSON object.
    """
    path = Path(directory).expanduser() / FILE
    if not path.is_file():
        return GenerationConfig()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GenerationConfigError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise GenerationConfigError(f"{path} is not a JSON object")
    return GenerationConfig(raw, path)


def merge_eos(model: ModelConfig, config: GenerationConfig) -> ModelConfig:
    """``model`` with ``config``'s end-of-sequence ids added to its own."""
    extra = config.eos_token_ids()
    if not extra:
        return model
    eos = model.eos_token_id
    have = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    merged = have + tuple(i for i in extra if i not in have)
    return dataclasses.replace(model, eos_token_id=merged[0] if len(merged) == 1 else merged)


def choose_generation_config(
    own: GenerationConfig,
    mode: str | Path = "auto",
    override: Mapping[str, Any] | None = None,
) -> tuple[GenerationConfig, dict[str, Any]]:
    """(the generation config in use, the default SamplingParams keyword arguments).

    ``own`` is the model's file (read by the loader); ``mode`` is vLLM's
    ``generation_config``: ``"auto"`` (``own``), ``"vllm"`` (no sampling defaults; the end
    tokens of ``own`` still count) or the path of a directory holding a
    ``generation_config.json``. ``override`` replaces fields (over no defaults with
    ``"vllm"``). The values are not checked here: ``SamplingParams`` does that.

    >>> own = GenerationConfig({"temperature": 0.6, "eos_token_id": 9})
    >>> choose_generation_config(own)[1], choose_generation_config(own, "vllm")[1]
    ({'temperature': 0.6}, {})
    >>> choose_generation_config(own, "vllm", {"top_k": 4})[1]
    {'top_k': 4}
    """
    if override is not None and not isinstance(override, Mapping):
        raise GenerationConfigError(
            f"override_generation_config must be a dict, not {type(override).__name__}"
        )
    config = own
    if mode not in ("auto", "vllm"):
        directory = Path(mode).expanduser()
        if not (directory / FILE).is_file():
            raise GenerationConfigError(
                f"generation_config={str(mode)!r}: no {FILE} in {directory} "
                "(pass 'auto', 'vllm' or a directory holding the file)"
            )
        config = read_generation_config(directory)
    if override:
        config = config.replaced(override)
    if mode == "vllm":
        return config, GenerationConfig(override or {}).sampling_defaults()
    return config, config.sampling_defaults()
