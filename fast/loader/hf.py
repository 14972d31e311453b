"""Load a Hugging Face model directory: config.json, *.safetensors (sharded or not), tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fast.loader.weights import check_complete, empty_model
from fast.model import LlamaForCausalLM
from fast.model.config import ModelConfig
from fast.model.registry import config_from_hf
from fast.tokenizer.tokenizer import Tokenizer


class UnsupportedModelError(ValueError):
    """The checkpoint is not a Llama-family model this engine implements."""


def safetensors_files(root: Path) -> list[Path]:
    """The weight files of a directory: the shards of the index, or every ``*.safetensors``."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [root / name for name in sorted(set(weight_map.values()))]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {root}")
    return files


def load_hf_weights(model: LlamaForCausalLM, root: Path, dtype: torch.dtype) -> None:
    """Copy every tensor of the directory's safetensors files into ``model``."""
    loaded: list[str] = []
    for file in safetensors_files(root):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    model.load_weight(name, f.get_tensor(name).to(dtype))
                    loaded.append(name)
        except SafetensorError as e:  # truncated or not a safetensors file
            raise UnsupportedModelError(f"{file} is not a readable safetensors file ({e})") from e
    check_complete(model, loaded)


def load_hf_dir(
    path: str | Path, *, dtype: torch.dtype, device: torch.device | str
) -> tuple[LlamaForCausalLM, Tokenizer | None, ModelConfig]:
    """(model, tokenizer or None when the directory has no tokenizer.json, config)."""
    root = Path(path)
    try:
        raw = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnsupportedModelError(f"{root / 'config.json'} is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise UnsupportedModelError(f"{root / 'config.json'} is not a JSON object")
    config = config_from_hf(raw)  # UnsupportedArchitectureError names the supported ones
    model = empty_model(config, dtype, device)
    load_hf_weights(model, root, dtype)
    tokenizer = Tokenizer.from_hf_dir(root) if (root / "tokenizer.json").is_file() else None
    return model, tokenizer, config
