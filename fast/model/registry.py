"""Which model class and config reader serve each architecture.

An architecture is named by a Hugging Face config.json's ``architectures[0]`` (or, without
that key, by its ``model_type``) and by a GGUF file's ``general.architecture``. Each
:class:`Architecture` says which ``nn.Module`` class runs it and which function reads its
config.json into a :class:`~fast.model.config.ModelConfig`; the engine builds every model
through :func:`build_model`. An architecture not listed is refused by name
(:class:`UnsupportedArchitectureError`) with the list of supported ones.

>>> architecture("Qwen3ForCausalLM").gguf_names
('qwen3',)
>>> gguf_architecture("gemma2").name
'Gemma2ForCausalLM'
>>> try:
...     architecture("GPT2LMHeadModel")
... except UnsupportedArchitectureError as e:
...     print(e)
architecture 'GPT2LMHeadModel' is not supported; supported: Gemma2ForCausalLM, ...
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fast.model.config import InvalidModelConfigError, ModelConfig, hf_architecture
from fast.model.gemma import GemmaForCausalLM, gemma2_config, gemma3_config
from fast.model.llama import LlamaForCausalLM
from fast.model.phi3 import Phi3ForCausalLM, phi3_config
from fast.model.qwen3 import qwen3_config

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "UnsupportedArchitectureError",
    "architecture",
    "build_model",
    "config_from_hf",
    "gguf_architecture",
]


class UnsupportedArchitectureError(InvalidModelConfigError):
    """The checkpoint names an architecture this engine does not implement."""

    def __init__(self, name: str, kind: str = "architecture") -> None:
        supported = sorted(a.name for a in ARCHITECTURES)
        if kind == "GGUF architecture":
            supported = sorted(g for a in ARCHITECTURES for g in a.gguf_names)
        super().__init__(f"{kind} {name!r} is not supported; supported: {', '.join(supported)}")
        self.name = name
        self.supported = tuple(supported)


@dataclass(frozen=True)
class Architecture:
    """One supported architecture: its names, model class and config.json reader."""

    name: str  # Hugging Face ``architectures[0]``
    gguf_names: tuple[str, ...]  # GGUF ``general.architecture`` values
    model_class: type[LlamaForCausalLM]
    read_hf_config: Callable[[Mapping[str, Any]], ModelConfig]


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("LlamaForCausalLM", ("llama",), LlamaForCausalLM, ModelConfig.from_hf_config),
    Architecture("MistralForCausalLM", (), LlamaForCausalLM, ModelConfig.from_hf_config),
    Architecture("Qwen2ForCausalLM", ("qwen2",), LlamaForCausalLM, ModelConfig.from_hf_config),
    Architecture("Qwen3ForCausalLM", ("qwen3",), LlamaForCausalLM, qwen3_config),
    Architecture("Gemma2ForCausalLM", ("gemma2",), GemmaForCausalLM, gemma2_config),
    Architecture("Gemma3ForCausalLM", ("gemma3",), GemmaForCausalLM, gemma3_config),
    Architecture("Phi3ForCausalLM", ("phi3",), Phi3ForCausalLM, phi3_config),
)
"""Every supported architecture (Mistral and SmolLM2 GGUF files say ``llama``)."""


def architecture(name: str) -> Architecture:
    """The entry of Hugging Face architecture ``name``; raises
    :class:`UnsupportedArchitectureError` naming the supported ones."""
    for entry in ARCHITECTURES:
        if entry.name == name:
            return entry
    raise UnsupportedArchitectureError(name)


def gguf_architecture(name: str) -> Architecture:
    """The entry whose GGUF ``general.architecture`` is ``name``."""
    for entry in ARCHITECTURES:
        if name in entry.gguf_names:
            return entry
    raise UnsupportedArchitectureError(name, "GGUF architecture")


def config_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
    """A config.json dict -> :class:`ModelConfig`, read by its architecture's reader."""
    return architecture(hf_architecture(cfg)).read_hf_config(cfg)


def build_model(config: ModelConfig) -> LlamaForCausalLM:
    """An uninitialized model of ``config.architecture`` (call under ``torch.device("meta")``
    to skip allocation, as ``fast.loader.weights.empty_model`` does)."""
    return architecture(config.architecture).model_class(config)
