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
  (:func:`with_generation_config`), whatever the mode: a chat model whose generation config
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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fast.loader import LoadedModel

__all__ = [
    "FILE",
    "SAMPLING_FIELDS",
    "GenerationConfig",
    "GenerationConfigError",
    "read_generation_config",
    "resolve_generation_config",
    "with_generation_config",
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


def with_generation_config(loaded: LoadedModel, config: GenerationConfig) -> LoadedModel:
    """``loaded`` with ``config`` attached and its end-of-sequence ids added to the model's."""
    extra = config.eos_token_ids()
    model_cfg = loaded.config
    if extra:
        eos = model_cfg.eos_token_id
        have = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        merged = have + tuple(i for i in extra if i not in have)
        model_cfg = dataclasses.replace(
            model_cfg, eos_token_id=merged[0] if len(merged) == 1 else merged
        )
    return dataclasses.replace(loaded, config=model_cfg, generation_config=config)


def resolve_generation_config(
    loaded: LoadedModel,
    mode: str | Path = "auto",
    override: Mapping[str, Any] | None = None,
) -> tuple[LoadedModel, dict[str, Any]]:
    """(the model with the generation config in use, the default SamplingParams kwargs).

    ``mode`` is vLLM's ``generation_config``: ``"auto"`` (the model's own file, read by the
    loader), ``"vllm"`` (no sampling defaults; the model's end tokens still count) or the
    path of a directory holding a ``generation_config.json``. ``override`` replaces fields.
    A sampling field out of its domain raises :class:`GenerationConfigError` naming the file.
    """
    from fast.engine.sampling_params import InvalidSamplingParamsError, SamplingParams

    if override is not None and not isinstance(override, Mapping):
        raise GenerationConfigError(
            f"override_generation_config must be a dict, not {type(override).__name__}"
        )
    if mode in ("auto", "vllm"):
        config = loaded.generation_config
    else:
        directory = Path(mode).expanduser()
        if not (directory / FILE).is_file():
            raise GenerationConfigError(
                f"generation_config={str(mode)!r}: no {FILE} in {directory} "
                "(pass 'auto', 'vllm' or a directory holding the file)"
            )
        config = read_generation_config(directory)
        loaded = with_generation_config(loaded, config)
    if override:
        config = config.replaced(override)
        loaded = with_generation_config(loaded, config)
    defaults = {} if mode == "vllm" else config.sampling_defaults()
    if mode == "vllm" and override:  # vLLM applies the override over its own defaults
        defaults = GenerationConfig(override).sampling_defaults()
    try:
        SamplingParams(**defaults)
    except InvalidSamplingParamsError as e:
        source = config.path or "override_generation_config"
        raise GenerationConfigError(f"{source}: {e}") from e
    return loaded, defaults
