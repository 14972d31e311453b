"""vLLM's ``LLM(...)`` keyword arguments, sorted into what pagedkv honours, ignores and refuses.

Code written for vLLM passes arguments that mean nothing here (``trust_remote_code=True``) or
that ask for what pagedkv cannot do (``pipeline_parallel_size=4``). :func:`engine_kwargs` turns
``LLM``'s keyword arguments into :class:`~fast.engine.config.EngineConfig` fields:

* honoured: every ``EngineConfig`` field, ``num_gpu_blocks_override`` (vLLM's name of
  ``num_gpu_blocks``), ``seed=None`` (a fresh random seed), and ``max_logprobs`` (checked by
  ``LLM`` on each request); ``LLM`` itself takes ``generation_config``,
  ``override_generation_config`` and ``revision`` (:mod:`fast.loader.generation_config`,
  :mod:`fast.loader.hf_files`);
* ignored: the arguments of :data:`IGNORED`; a value other than the one matching what pagedkv
  does anyway gives an :class:`~fast.api.errors.IgnoredArgumentWarning` saying why it has no
  effect;
* refused: a value outside the accepted ones of :data:`REFUSED` raises
  :class:`~fast.api.errors.UnsupportedArgumentError`;
* anything else raises :class:`~fast.api.errors.UnknownArgumentError` with the close matches.

>>> engine_kwargs(None, {"pipeline_parallel_size": 1, "num_gpu_blocks_override": 64})
({'num_gpu_blocks': 64}, None)
>>> engine_kwargs(None, {"pipeline_parallel_size": 2})
Traceback (most recent call last):
...
fast.api.errors.UnsupportedArgumentError: invalid pipeline_parallel_size=2: ...
>>> engine_kwargs(None, {"max_num_seq": 8})
Traceback (most recent call last):
...
fast.api.errors.UnknownArgumentError: LLM() got an unknown keyword argument 'max_num_seq'; \
did you mean max_num_seqs?
"""

from __future__ import annotations

import dataclasses
import difflib
import random
import warnings
from pathlib import Path
from typing import Any

from fast.api.errors import IgnoredArgumentWarning, UnknownArgumentError, UnsupportedArgumentError
from fast.engine.config import EngineConfig

__all__ = ["IGNORED", "REFUSED", "ALIASES", "engine_kwargs", "known_arguments"]

_ONE_DEVICE = "pagedkv splits a model by tensor parallelism only (tensor_parallel_size)"

#: name -> (accepted values, why others are refused). Checked before :data:`IGNORED`.
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "pipeline_parallel_size": ((1,), _ONE_DEVICE),
    "data_parallel_size": ((1,), _ONE_DEVICE),
    "quantization": (
        (None, "gguf"),
        "the only quantized weights pagedkv reads are GGUF files, dequantized at load time",
    ),
    "cpu_offload_gb": ((0, 0.0), "weights are not offloaded to the CPU"),
    "enable_lora": ((False,), "LoRA adapters are not supported"),
    "speculative_config": ((None,), "speculative decoding is not supported"),
    "task": (("auto", "generate"), "pagedkv only generates text"),
    "runner": (("auto", "generate"), "pagedkv only generates text"),
    "tokenizer_mode": (("auto", "slow"), "the tokenizer is the model's own (`tokenizers`) one"),
    "load_format": (
        ("auto", "gguf", "safetensors"),
        "models load from a .gguf file or a safetensors directory",
    ),
    "scheduling_policy": (("fcfs",), "the scheduler serves requests first come, first served"),
    "hf_overrides": ((None, {}), "the model's config is read as stored"),
}

_LOCAL = "models are local paths or already in the local Hugging Face cache; nothing is downloaded"

#: name -> (values matching what pagedkv does anyway, why the argument has no effect).
IGNORED: dict[str, tuple[tuple[Any, ...], str]] = {
    "trust_remote_code": ((False,), "pagedkv runs its own model code, never a repository's"),
    "tokenizer_mode": (("auto",), "there is one tokenizer implementation (`tokenizers`)"),
    "skip_tokenizer_init": (
        (False,),
        "the tokenizer is part of the model file and is always loaded; prompts of token ids work",
    ),
    "tokenizer_revision": ((None,), _LOCAL),
    "code_revision": ((None,), _LOCAL),
    "download_dir": ((None,), _LOCAL),
    "hf_token": ((None,), _LOCAL),
    "allowed_local_media_path": (("",), "inputs are text only"),
    "allowed_media_domains": ((None,), "inputs are text only"),
    "mm_processor_kwargs": ((None,), "inputs are text only"),
    "max_seq_len_to_capture": (
        (8192,),
        "CUDA graphs capture decode batches of cuda_graph_batch_sizes, whatever their length",
    ),
    "disable_custom_all_reduce": (
        (False,),
        "tensor-parallel all-reduces are torch.distributed's (NCCL or gloo), never custom",
    ),
    "distributed_executor_backend": (
        (None, "mp"),
        "tensor-parallel workers are always spawned processes on this machine",
    ),
    "max_parallel_loading_workers": ((None,), "weights load in one process"),
    "disable_async_output_proc": ((False,), "outputs are processed in the step that made them"),
    "disable_log_stats": (
        (True,),
        "the engine logs no statistics; read llm.llm_engine.stats instead",
    ),
    "compilation_config": ((None, 0), "the model is not compiled; CUDA graphs: enforce_eager"),
    "disable_sliding_window": ((False,), "Llama models have no sliding window"),
    "use_v2_block_manager": ((True,), "there is one block manager"),
    "override_pooler_config": ((None,), "pagedkv only generates text"),
}

#: vLLM's name -> the EngineConfig field it sets.
ALIASES = {"num_gpu_blocks_override": "num_gpu_blocks"}

# handled by engine_kwargs / LLM itself
_HONOURED_HERE = (
    "tokenizer",
    "max_logprobs",
    "generation_config",
    "override_generation_config",
    "revision",
)


def known_arguments() -> list[str]:
    """Every keyword argument ``LLM(...)`` accepts (honoured, ignored or value-checked)."""
    fields = [f.name for f in dataclasses.fields(EngineConfig)]
    return sorted({*fields, *REFUSED, *IGNORED, *ALIASES, *_HONOURED_HERE})


def engine_kwargs(model: object, kwargs: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """(EngineConfig keyword arguments, ``max_logprobs`` or None) for ``LLM(model, **kwargs)``.

    Warns once per ignored argument whose value asks for something pagedkv does not do; raises
    before anything is loaded on an unknown argument or a value that cannot be honoured.
    """
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    out: dict[str, Any] = {}
    max_logprobs = None
    for name, value in kwargs.items():
        if name in fields:
            out[name] = value
        elif name in ALIASES:
            if value is not None:
                out[ALIASES[name]] = value
        elif name == "max_logprobs":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UnsupportedArgumentError(name, value, "must be an int >= 0")
            max_logprobs = value
        elif name == "tokenizer":
            _check_tokenizer(model, value)
        elif name in REFUSED or name in IGNORED:
            _check_vllm_only(name, value)
        else:
            close = difflib.get_close_matches(name, known_arguments(), n=3, cutoff=0.6)
            raise UnknownArgumentError("LLM", name, close)
    if "seed" in out and out["seed"] is None:  # vLLM: no seed, sampling differs run to run
        out["seed"] = random.SystemRandom().randrange(2**63)
    return out, max_logprobs


def _check_vllm_only(name: str, value: Any) -> None:
    if name in REFUSED:
        accepted, why = REFUSED[name]
        if not any(_same(value, a) for a in accepted):
            shown = ", ".join(repr(a) for a in accepted)
            raise UnsupportedArgumentError(name, value, f"{why} (accepted: {shown})")
    if name in IGNORED:
        fine, why = IGNORED[name]
        if not any(_same(value, f) for f in fine):
            warnings.warn(
                f"LLM({name}={value!r}) has no effect in pagedkv: {why}",
                IgnoredArgumentWarning,
                stacklevel=4,
            )


def _same(value: Any, accepted: Any) -> bool:
    """Equal and of the same kind (``True`` is not ``1``; ``1.0`` is ``1``)."""
    if isinstance(value, bool) != isinstance(accepted, bool):
        return False
    try:
        return bool(value == accepted)
    except Exception:  # noqa: BLE001 - an exotic __eq__ is simply "not equal"
        return False


def _check_tokenizer(model: object, tokenizer: object) -> None:
    """vLLM's separate tokenizer path: only None or the model's own path can be honoured."""
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, Path)) and isinstance(model, (str, Path)):
        if Path(tokenizer).expanduser().resolve() == Path(model).expanduser().resolve():
            return
    raise UnsupportedArgumentError(
        "tokenizer",
        tokenizer,
        "the tokenizer is read from the model's own file or directory; pass None",
    )
