"""Load a Hugging Face model directory: config.json, *.safetensors (sharded or not), tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fast.loader.hf_files import check_index_covers, check_shard, read_weight_map
from fast.loader.weights import check_complete, empty_model
from fast.model import LlamaForCausalLM
from fast.model.config import ModelConfig
from fast.model.registry import config_from_hf
from fast.tokenizer.tokenizer import Tokenizer


class UnsupportedModelError(ValueError):
    """The checkpoint is not a Llama-family model this engine implements."""


def safetensors_files(root: Path) -> list[Path]:
    """The weight files of a directory: the shards of the index, or every ``*.safetensors``.

    An index naming a shard that is not there raises
    :class:`~fast.loader.hf_files.ShardedCheckpointError`.
    """
    weight_map = read_weight_map(root)
    if weight_map is not None:
        return [root / name for name in sorted(set(weight_map.values()))]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {root}")
    return files


def load_hf_weights(model: LlamaForCausalLM, root: Path, dtype: torch.dtype) -> None:
    """Copy every tensor of the directory's safetensors files into ``model``.

    With a shard index, every weight the model needs must be in its ``weight_map`` (checked
    before any tensor is read) and each shard must hold the tensors the index places in it
    (:class:`~fast.loader.hf_files.ShardedCheckpointError` otherwise).
    """
    weight_map = read_weight_map(root)
    if weight_map is not None:
        check_index_covers(root, weight_map, model.expected_weight_names())
    loaded: list[str] = []
    for file in safetensors_files(root):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                if weight_map is not None:
                    check_shard(root, weight_map, file.name, f.keys())
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
