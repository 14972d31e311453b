"""The engine's settings, and how the KV pool is sized from them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from fast.model.config import ModelConfig
from kernels.fp8 import cache_dtype
from spec.errors import InvalidArgumentError
from spec.kv_quant import fp8_format

__all__ = ["EngineConfig", "resolve_device", "resolve_dtype", "kv_bytes_per_block", "pool_sizes"]

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "half": torch.float16,
    "float": torch.float32,
}


@dataclass(frozen=True)
class EngineConfig:
    """Everything ``LLM(...)`` / ``LLMEngine(...)`` accepts besides the model (vLLM's names).

    Prefix caching and chunked prefill are on by default, as in current vLLM. ``None`` means
    "derive it": ``max_model_len`` from the model, ``max_num_batched_tokens`` as 8192 with
    chunked prefill (vLLM's offline default on most GPUs) and ``max(max_model_len, 2048)``
    without, ``swap_space`` as 4 GiB on CUDA
    and 0.25 GiB on CPU when ``preemption_mode == "swap"`` (0 otherwise), the device pool from
    ``num_gpu_blocks``, else ``kv_cache_gb`` (CPU default 1 GiB), else
    ``gpu_memory_utilization`` of the GPU's memory, ``enforce_eager`` as True on CPU.

    ``kv_cache_dtype`` (vLLM's names): ``"auto"`` stores K/V in the model's dtype; ``"fp8"`` =
    ``"fp8_e4m3"`` and ``"fp8_e5m2"`` store one byte per element (twice the blocks per byte at
    bf16), quantized with per-layer scales: ``k_scale`` / ``v_scale`` when given (one number,
    or one per KV head), else, with ``calculate_kv_scales`` (the default here; vLLM's default is
    off, which means scale 1.0), calibrated per layer from the K/V absmax of the engine's first
    model step (prompt tokens), per tensor or per KV head (``kv_scale_granularity``), as
    ``max|x| * kv_scale_headroom / M`` (later values up to twice those seen fit by default), then
    frozen. docs/fp8.md.

    ``tensor_parallel_size`` > 1 runs the model on that many processes (one per GPU on CUDA,
    gloo on the CPU), each collective bounded by ``distributed_timeout_s``
    (docs/tensor-parallel.md).

    ``fused_ops`` runs each layer's rotary embedding + KV write, residual add + RMSNorm and
    gated activation as the fused kernels of ``kernels.fused`` (docs/kernels.md); None (the
    default) turns them on for a single CUDA device, where they take 0.5-1.1 ms off each decode
    step of the Llama-3-8B shape (benchmarks/results/step_floor_h200_b4af701.json), and off
    elsewhere (:meth:`resolved_fused_ops`); single-device for now.

    ``cuda_graph_batch_sizes`` are the decode steps captured whole; ``cuda_graph_token_sizes``
    the token counts at which steps with prefill tokens are captured piecewise, cut at each
    layer's attention (``fast.engine.cuda_graphs.MixedGraphs``): None takes powers of two from
    128 up to the token budget (at most 8192), ``()`` runs those steps eagerly. Neither is
    captured with ``enforce_eager``.

    ``async_scheduling`` (vLLM's name; off by default) overlaps the host's work with the
    device's: consecutive pure-decode steps over the same running sequences are scheduled and
    launched before the previous step's sampled tokens reach the host, its input ids read from
    that step's sampled-token tensor on the device; ``step()`` then returns the outputs of the
    step launched by the call before (one step of lag). Everything else drains to the
    synchronous step (docs/engine.md, "Overlapped scheduling"). Single-device for now.
    """

    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    num_gpu_blocks: int | None = None
    kv_cache_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    swap_space: float | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    preemption_mode: Literal["recompute", "swap"] = "recompute"
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    enforce_eager: bool | None = None
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    cuda_graph_token_sizes: tuple[int, ...] | None = None
    kv_cache_dtype: str = "auto"
    calculate_kv_scales: bool = True
    kv_scale_granularity: Literal["tensor", "head"] = "tensor"
    kv_scale_headroom: float = 2.0
    k_scale: float | tuple[float, ...] | None = None
    v_scale: float | tuple[float, ...] | None = None
    tensor_parallel_size: int = 1
    distributed_timeout_s: float = 300.0
    fused_ops: bool | None = None
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        self._check_kv_cache()
        self._check_tensor_parallel()
        if self.block_size < 1:
            raise InvalidArgumentError("block_size", self.block_size, "must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise InvalidArgumentError(
                "gpu_memory_utilization", self.gpu_memory_utilization, "must be in (0, 1]"
            )
        for name in ("kv_cache_gb", "swap_space"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidArgumentError(name, value, "must be >= 0")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise InvalidArgumentError("num_gpu_blocks", self.num_gpu_blocks, "must be >= 1")
        if self.fused_ops is not None and not isinstance(self.fused_ops, bool):
            raise InvalidArgumentError("fused_ops", self.fused_ops, "must be a bool or None")
        if not isinstance(self.async_scheduling, bool):
            raise InvalidArgumentError("async_scheduling", self.async_scheduling, "must be a bool")
        if self.async_scheduling and self.tensor_parallel_size > 1:
            raise InvalidArgumentError(
                "async_scheduling",
                self.async_scheduling,
                f"single-device for now; tensor_parallel_size is {self.tensor_parallel_size}",
            )
        if self.fused_ops and self.tensor_parallel_size > 1:
            raise InvalidArgumentError(
                "fused_ops",
                self.fused_ops,
                f"single-device for now; tensor_parallel_size is {self.tensor_parallel_size}",
            )
        for name in ("cuda_graph_batch_sizes", "cuda_graph_token_sizes"):
            sizes = getattr(self, name)
            if sizes is not None and (
                not isinstance(sizes, tuple)
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes)
            ):
                raise InvalidArgumentError(name, sizes, "must be a tuple of ints >= 1")
        if not self.cuda_graph_batch_sizes:
            raise InvalidArgumentError(
                "cuda_graph_batch_sizes", self.cuda_graph_batch_sizes, "must not be empty"
            )
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise InvalidArgumentError("dtype", self.dtype, f"one of auto, {sorted(_DTYPES)}")

    def resolved_max_num_batched_tokens(self, max_model_len: int) -> int:
        """The step's token budget: as given, or 8192 with chunked prefill and
        ``max(max_model_len, 2048)`` without.

        >>> EngineConfig().resolved_max_num_batched_tokens(4096)
        8192
        >>> EngineConfig(enable_chunked_prefill=False).resolved_max_num_batched_tokens(4096)
        4096
        """
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 8192 if self.enable_chunked_prefill else max(max_model_len, 2048)

    def resolved_graph_token_sizes(self, max_model_len: int) -> tuple[int, ...]:
        """The token counts steps with prefill tokens are captured at (sorted, distinct):
        ``cuda_graph_token_sizes`` as given, or powers of two from 128 up to the token budget
        (at most 8192).

        >>> EngineConfig(max_num_batched_tokens=300).resolved_graph_token_sizes(2048)
        (128, 256, 512)
        >>> EngineConfig().resolved_graph_token_sizes(2048)[-1]
        8192
        >>> EngineConfig(cuda_graph_token_sizes=(64, 16, 64)).resolved_graph_token_sizes(2048)
        (16, 64)
        """
        if self.cuda_graph_token_sizes is not None:
            return tuple(sorted(set(self.cuda_graph_token_sizes)))
        budget = self.resolved_max_num_batched_tokens(max_model_len)
        top = min(8192, 1 << max(7, (budget - 1).bit_length()))
        return tuple(1 << k for k in range(7, top.bit_length()))

    def resolved_fused_ops(self, device_type: str) -> bool:
        """``fused_ops`` for an engine on ``device_type``: as given, or None -> on for one CUDA
        device (the kernels' measured gain), off on the CPU (their torch fallbacks run the same
        operations) and with tensor parallelism (not supported yet).

        >>> EngineConfig().resolved_fused_ops("cuda"), EngineConfig().resolved_fused_ops("cpu")
        (True, False)
        >>> EngineConfig(fused_ops=False).resolved_fused_ops("cuda")
        False
        """
        if self.fused_ops is not None:
            return self.fused_ops
        return device_type == "cuda" and self.tensor_parallel_size == 1

    def _check_kv_cache(self) -> None:
        """kv_cache_dtype a known name; scales positive, both or neither, fp8 only."""
        fp8 = fp8_format(self.kv_cache_dtype) is not None  # unknown names raise, listing all
        if not (math.isfinite(self.kv_scale_headroom) and self.kv_scale_headroom > 0):
            raise InvalidArgumentError(
                "kv_scale_headroom", self.kv_scale_headroom, "must be finite and > 0"
            )
        if self.kv_scale_granularity not in ("tensor", "head"):
            raise InvalidArgumentError(
                "kv_scale_granularity", self.kv_scale_granularity, "one of tensor, head"
            )
        if self.kv_scale_granularity == "head" and not fp8:
            raise InvalidArgumentError(
                "kv_scale_granularity",
                self.kv_scale_granularity,
                f"scales apply to an fp8 KV cache, and kv_cache_dtype is {self.kv_cache_dtype!r}",
            )
        given = [s for s in (self.k_scale, self.v_scale) if s is not None]
        if given and not fp8:
            raise InvalidArgumentError(
                "k_scale" if self.k_scale is not None else "v_scale",
                given[0],
                f"scales apply to an fp8 KV cache, and kv_cache_dtype is {self.kv_cache_dtype!r}",
            )
        if len(given) == 1:
            raise InvalidArgumentError(
                "k_scale" if self.k_scale is None else "v_scale", None, "give both scales or none"
            )
        for name in ("k_scale", "v_scale"):
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else () if value is None else (value,)
            if isinstance(value, tuple) and not value:
                raise InvalidArgumentError(name, value, "per KV head: one value per KV head")
            if any(
                isinstance(x, bool)  # True is an int: a flag passed as a scale
                or not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0)
                for x in values
            ):
                raise InvalidArgumentError(
                    name, value, "must be finite and > 0 (per KV head: a tuple)"
                )

    def _check_tensor_parallel(self) -> None:
        """An int size >= 1 (docs/tensor-parallel.md); the model's heads and the machine's
        GPUs are checked when the engine starts. Scales calibrated per rank would differ, so
        an fp8 cache is single-device for now."""
        from fast.distributed.sharding import check_tensor_parallel_size

        check_tensor_parallel_size(self.tensor_parallel_size)
        t = self.distributed_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t < math.inf):
            raise InvalidArgumentError("distributed_timeout_s", t, "must be finite and > 0")
        if self.tensor_parallel_size > 1 and fp8_format(self.kv_cache_dtype) is not None:
            raise InvalidArgumentError(
                "kv_cache_dtype",
                self.kv_cache_dtype,
                f"an fp8 KV cache runs on one device; tensor_parallel_size is "
                f"{self.tensor_parallel_size}",
            )

    @property
    def kv_scales_given(self) -> bool:
        """Whether the user fixed the fp8 scales (no calibration)."""
        return self.k_scale is not None


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` is bfloat16 on CUDA and float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def kv_bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of one block over every layer: ``2 * L * bs * Hkv * D * itemsize``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (
        2
        * model.num_hidden_layers
        * block_size
        * model.num_key_value_heads
        * model.head_dim
        * itemsize
    )


def graph_activation_bytes(model: ModelConfig, dtype: torch.dtype, tokens: int) -> int:
    """What the piecewise graphs of steps with prefill tokens keep allocated for ``tokens``
    tokens, about: their static buffers (residual, output, queries, attention output) and the
    largest piece's intermediates (QKV projection, gate/up projection and activation, norm).

    >>> round(graph_activation_bytes(ModelConfig.llama3_8b(), torch.bfloat16, 8192) / 2**30, 2)
    1.12
    """
    h, f, d = model.hidden_size, model.intermediate_size, model.head_dim
    hq, hkv = model.num_attention_heads, model.num_key_value_heads
    per_token = 3 * h + 2 * hq * d + (hq + 2 * hkv) * d + 3 * f + h
    return tokens * per_token * torch.empty((), dtype=dtype).element_size()


def pool_sizes(
    cfg: EngineConfig,
    model: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
) -> tuple[int, int]:
    """(device blocks, host blocks) for this configuration.

    Blocks are sized in the cache's dtype (``kv_cache_dtype``; fp8: one byte per element), so
    an fp8 cache gets twice the blocks of a bf16 one from the same bytes.

    A derived device pool is capped at what ``max_num_seqs`` sequences of ``max_model_len``
    tokens can use; an explicit ``num_gpu_blocks`` is taken as is.
    """
    per_block = kv_bytes_per_block(model, cfg.block_size, cache_dtype(cfg.kv_cache_dtype, dtype))
    gib = 1 << 30
    if cfg.num_gpu_blocks is not None:
        gpu = cfg.num_gpu_blocks
    elif cfg.kv_cache_gb is not None or device.type != "cuda":
        gpu = int((cfg.kv_cache_gb if cfg.kv_cache_gb is not None else 1.0) * gib) // per_block
    else:
        free, total = torch.cuda.mem_get_info(device)
        reserve = 2 * gib  # activations and logits of the largest step
        sizes = () if cfg.enforce_eager else cfg.resolved_graph_token_sizes(max_model_len)
        if sizes:  # the piecewise graphs hold their activations for good (MixedGraphs)
            reserve += graph_activation_bytes(model, dtype, max(sizes))
        budget = free - (1.0 - cfg.gpu_memory_utilization) * total - reserve
        gpu = int(budget) // per_block
    if cfg.num_gpu_blocks is None:
        gpu = min(gpu, cfg.max_num_seqs * -(-max_model_len // cfg.block_size))
    swap = cfg.swap_space
    if swap is None:
        swap = 0.0 if cfg.preemption_mode != "swap" else (4.0 if device.type == "cuda" else 0.25)
    cpu = int(swap * gib) // per_block
    if gpu < 1:
        raise InvalidArgumentError("num_gpu_blocks", gpu, "no room for a single KV block")
    return gpu, cpu
