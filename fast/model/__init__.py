"""The Llama-family model that runs on the paged KV cache."""

from fast.model.llama import LlamaForCausalLM, WeightLoadError, allocate_kv_caches

__all__ = ["LlamaForCausalLM", "WeightLoadError", "allocate_kv_caches"]
