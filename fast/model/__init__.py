"""The Llama-family models that run on the paged KV cache (``fast.model.registry`` lists them)."""

from fast.model.llama import LlamaForCausalLM, WeightLoadError, allocate_kv_caches

__all__ = ["LlamaForCausalLM", "WeightLoadError", "allocate_kv_caches"]
