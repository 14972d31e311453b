"""transformers as the peer of the engine benchmarks: static batches and continuous batching.

Used by benchmarks/bench_engine_cpu.py and benchmarks/gpu_engine.py, so the peers' figures come
from the run that reports them. Both sides get the same requests (prompt token ids and an exact
number of new tokens each, EOS disabled) and are timed on the wall clock.

* :func:`static` -- ``generate`` on batches of ``batch`` requests (all at once when ``None``),
  left-padded, every request of a batch running to the batch's longest output (that padding is
  what a continuous-batching engine saves).
* :func:`continuous` -- transformers' continuous batching (``continuous_batching_context_manager``
  and its paged cache): every request added at once with its own ``max_new_tokens``, results
  collected as they finish.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["static", "continuous", "random_llama"]


def static(
    model: Any, prompts: list[list[int]], n_out: list[int], batch: int | None = None
) -> tuple[float, list[list[int]]]:
    """Seconds and new tokens per request of ``generate`` over batches of ``batch`` requests."""
    step = batch or len(prompts)
    device = next(model.parameters()).device
    tokens: list[list[int]] = []
    t0 = time.perf_counter()
    for lo in range(0, len(prompts), step):
        chunk, outs = prompts[lo : lo + step], n_out[lo : lo + step]
        width = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)  # [b, width], left padding
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            out = model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max(outs),
                min_new_tokens=max(outs),
                pad_token_id=0,
                eos_token_id=None,
            )
        out = out.cpu()
        tokens += [out[i, width : width + k].tolist() for i, k in enumerate(outs)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, tokens


def continuous(
    model: Any, prompts: list[list[int]], n_out: list[int]
) -> tuple[float, list[list[int]]]:
    """Seconds and new tokens per request of transformers' continuous batching."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=max(n_out)
    )
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    with model.continuous_batching_context_manager(
        generation_config=config, block=True, timeout=5, warmup=False
    ) as manager:
        for i, (p, k) in enumerate(zip(prompts, n_out, strict=True)):
            manager.add_request(p, request_id=str(i), max_new_tokens=k)
        while len(results) < len(prompts):
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                results[r.request_id] = r
            elif r is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching stopped early")
    return time.perf_counter() - t0, [
        list(results[str(i)].generated_tokens) for i in range(len(prompts))
    ]


def random_llama(config: Any, dtype: torch.dtype, device: str) -> Any:
    """transformers' ``LlamaForCausalLM`` with random weights in the shape of ``config`` (a
    :class:`fast.model.config.ModelConfig`), built directly on ``device`` (SDPA attention)."""
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            hf_config, dtype=dtype, attn_implementation="sdpa"
        )
    return model.eval()
