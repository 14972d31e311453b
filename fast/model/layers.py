"""The building blocks of a Llama decoder layer: RMSNorm, paged attention, SwiGLU MLP.

The other architectures reuse them through ``ModelConfig`` switches: the norm's weight offset
(Gemma), per-head Q/K norms (Qwen3, Gemma 3), the MLP's activation (GeGLU), and per-layer
attention parameters (window, soft-cap, scale) handed on to the kernels.

Attention never computes scores itself: it writes the new K/V into the paged cache with
``kernels.write_kv`` and reads them back through ``kernels.paged_prefill`` or
``kernels.paged_decode``, so the engine exercises exactly the kernels the spec checks.

With ``fused`` set (``LlamaForCausalLM.use_fused_ops``; the engine's ``fused_ops`` option, on a
GPU) a layer runs the small steps around its matmuls as the three kernels of ``kernels.fused``:
rotary embedding + KV write in one (``rope_write_kv``; layers with per-head Q/K norms or an fp8
cache keep the unfused path), the residual add with the second RMSNorm (``add_rms_norm``), and the
gated activation (``silu_mul``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from fast.model.attention_context import AttentionContext
from fast.model.config import ModelConfig
from fast.model.kv_scales import LayerKVScales
from fast.model.rope import apply_rope
from fast.model.step_plan import DecodeStepPlan
from kernels.cache_ops import write_rows
from kernels.fused import add_rms_norm, rope_write_kv, silu_mul
from kernels.torch_attention import planned_decode

CPU_MLP_ROWS = 512
"""Rows per chunk of the MLP on the CPU for prompts longer than this (see :meth:`MLP.forward`)."""


class Linear(nn.Module):
    """``y = x W^T (+ b)`` with uninitialized parameters: weights always come from a loader."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, in] -> [T, out]
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """Token id -> row of an uninitialized ``[V, H]`` table."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids [T] -> [T, H]
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * (weight + offset)`` (torch's fused RMSNorm).

    With ``offset`` 0 (Llama) the weight multiplies in the activation dtype; with an offset
    (Gemma's ``1 + weight``) the whole norm runs in float32 and is rounded once at the end, as
    Gemma's reference does.
    """

    def __init__(self, hidden_size: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., H] -> [..., H]
        if self.offset == 0.0:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)  # [..., H] float32
        return (normed * (self.weight.float() + self.offset)).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention over the paged KV cache (fused Q/K/V projection).

    Layer ``layer`` takes its window from ``config.layer_window(layer)``; scale and soft-cap are
    the config's. With ``config.qk_norm`` each query and key head is RMS-normed before rope.
    """

    kv_scales: LayerKVScales | None = None  # an fp8 cache's scales, set by the engine
    fused = False  # rope + KV write in one kernel (kernels.fused), set by use_fused_ops

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.scale = config.attention_scale
        self.sliding_window = config.layer_window(layer)
        self.softcap = config.attn_logit_softcap
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            eps, offset = config.rms_norm_eps, config.norm_weight_offset
            self.q_norm = RMSNorm(config.head_dim, eps, offset)
            self.k_norm = RMSNorm(config.head_dim, eps, offset)

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttentionContext,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        plan: DecodeStepPlan | None = None,
    ) -> torch.Tensor:
        # x [T, H], caches [N, bs, Hkv, D], rope (cos, sin) [T, 1, D] of the positions -> [T, H]
        # plan: the step validated once (CPU decode): unchecked torch paths, shared indices
        t = x.shape[0]
        if self.fused and plan is None and self.q_norm is None and self.kv_scales is None:
            q = self.fused_query(x, ctx, k_cache, v_cache, rope)  # [T, Hq, D]
            o_fused = self.attend(q, ctx, k_cache, v_cache)  # [T, Hq, D]
            fused_out: torch.Tensor = self.o_proj(o_fused.reshape(t, self.q_size))  # [T, H]
            return fused_out
        qkv = self.qkv_proj(x)  # [T, Q + 2 KV]
        qk = qkv[:, : self.q_size + self.kv_size].unflatten(
            -1, (self.num_heads + self.num_kv_heads, self.head_dim)
        )  # [T, Hq + Hkv, D]
        if self.q_norm is not None and self.k_norm is not None:
            h = self.num_heads
            qk = torch.cat((self.q_norm(qk[:, :h]), self.k_norm(qk[:, h:])), dim=1)
        qk = apply_rope(qk, *rope)  # [T, Hq + Hkv, D]
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]  # [T, Hq|Hkv, D]
        v = qkv[:, self.q_size + self.kv_size :].unflatten(
            -1, (self.num_kv_heads, self.head_dim)
        )  # [T, Hkv, D]
        # The planned path is the fused-SDPA decode, which has no soft-cap: soft-capped layers
        # (Gemma 2) take the checked kernels, which apply it.
        if plan is not None and self.softcap is None:
            if plan.keep is not None:
                k, v = k[plan.keep], v[plan.keep]
            write_rows(k, v, k_cache, v_cache, plan.rows)
            attend = plan.attend[self.sliding_window]
            o = planned_decode(q, k_cache, v_cache, attend, self.scale)  # [T, Hq, D]
        else:
            o = self._checked_attention(q, k, v, ctx, k_cache, v_cache)
        out: torch.Tensor = self.o_proj(o.reshape(t, self.q_size))  # [T, H]
        return out

    def fused_query(
        self,
        x: torch.Tensor,
        ctx: AttentionContext,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """The fused path up to the attention: the QKV projection, then rope + KV write in one
        kernel. x [T, H] -> q [T, Hq, D] (rotated); K/V of the new tokens written."""
        qkv = self.qkv_proj(x)  # [T, Q + 2 KV]
        q: torch.Tensor = rope_write_kv(
            qkv, *rope, k_cache, v_cache, ctx.slot_mapping, self.num_heads
        )
        return q

    def attend(
        self,
        q: torch.Tensor,
        ctx: AttentionContext,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [T, Hq, D] over a cache of the model's dtype, the step's K/V already written ->
        [T, Hq, D] (into ``out`` when given)."""
        return self._attend(q, ctx, k_cache, v_cache, 1.0, 1.0, out)

    def _checked_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: AttentionContext,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        # q [T, Hq, D], k, v [T, Hkv, D] -> [T, Hq, D] through the validating public kernels
        ks: float | torch.Tensor = 1.0
        vs: float | torch.Tensor = 1.0
        if self.kv_scales is not None:  # fp8 cache: quantize on write, dequantize on read
            self.kv_scales.observe(k, v, ctx.slot_mapping)  # calibrates once when armed
            ks, vs = self.kv_scales.k_scale, self.kv_scales.v_scale
        kernels.write_kv(k, v, k_cache, v_cache, ctx.slot_mapping, k_scale=ks, v_scale=vs)
        return self._attend(q, ctx, k_cache, v_cache, ks, vs)

    def _attend(
        self,
        q: torch.Tensor,
        ctx: AttentionContext,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        ks: float | torch.Tensor,
        vs: float | torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # q [T, Hq, D] over the cache, the step's K/V already written -> [T, Hq, D]
        n, caches, scales = ctx.num_decodes, (k_cache, v_cache), (ks, vs)
        max_q = ctx.max_seqlen_q
        if ctx.is_decode:
            return self._decode(q, caches, ctx.block_tables, ctx.seq_lens, scales, out)
        tables, lens, cu = ctx.prefill_block_tables, ctx.prefill_seq_lens, ctx.prefill_cu_seqlens_q
        if n == 0 or tables is None or lens is None or cu is None:
            return self._prefill(
                q, caches, ctx.block_tables, ctx.cu_seqlens_q, ctx.seq_lens, max_q, scales, out
            )
        # a mixed step, its n single-token sequences first: the decode kernel on those rows,
        # the prefill kernel on the rest (q, o [T, Hq, D]; rows n.. are the prefill tokens)
        o = torch.empty_like(q) if out is None else out  # [T, Hq, D]
        self._decode(q[:n], caches, ctx.block_tables[:n], ctx.seq_lens[:n], scales, o[:n])
        self._prefill(q[n:], caches, tables, cu, lens, max_q, scales, o[n:])
        return o

    def _decode(
        self,
        q: torch.Tensor,
        caches: tuple[torch.Tensor, torch.Tensor],
        tables: torch.Tensor,
        lens: torch.Tensor,
        scales: tuple[float | torch.Tensor, float | torch.Tensor],
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        # q [B, Hq, D], tables [B, W], lens [B] -> [B, Hq, D]
        return kernels.paged_decode(
            q,
            *caches,
            tables,
            lens,
            scale=self.scale,
            sliding_window=self.sliding_window,
            softcap=self.softcap,
            k_scale=scales[0],
            v_scale=scales[1],
            out=out,
        )

    def _prefill(
        self,
        q: torch.Tensor,
        caches: tuple[torch.Tensor, torch.Tensor],
        tables: torch.Tensor,
        cu: torch.Tensor,
        lens: torch.Tensor,
        max_q: int,
        scales: tuple[float | torch.Tensor, float | torch.Tensor],
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        # q [T, Hq, D] packed by cu [B + 1], tables [B, W], lens [B] -> [T, Hq, D]
        return kernels.paged_prefill(
            q,
            *caches,
            tables,
            cu,
            lens,
            scale=self.scale,
            sliding_window=self.sliding_window,
            softcap=self.softcap,
            k_scale=scales[0],
            v_scale=scales[1],
            max_seqlen_q=max_q,
            out=out,
        )


class MLP(nn.Module):
    """Gated feed-forward ``down(act(gate(x)) * up(x))`` with a fused gate/up projection.

    ``act`` is ``silu`` (SwiGLU) or, for ``config.hidden_act == "gelu_tanh"``, the
    tanh-approximated GELU (GeGLU, Gemma).
    """

    fused = False  # act(gate) * up in one kernel (kernels.fused.silu_mul), set by use_fused_ops

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gelu = config.hidden_act == "gelu_tanh"
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, H] -> [T, H]
        t = x.shape[0]
        if x.device.type != "cpu" or t <= CPU_MLP_ROWS:
            return self._rows(x)
        # On the CPU a long prompt runs in row chunks: the [T, 2F] intermediate of a 4k-token
        # prompt is 50 MB, above glibc's largest mmap threshold (32 MB), so every layer would
        # map fresh pages and fault them in (363 vs 273 ms per SmolLM2-135M MLP at 4k tokens,
        # one thread); chunks of CPU_MLP_ROWS rows reuse heap memory and stay warmer in cache.
        out = torch.empty_like(x)  # [T, H]
        for lo in range(0, t, CPU_MLP_ROWS):
            out[lo : lo + CPU_MLP_ROWS] = self._rows(x[lo : lo + CPU_MLP_ROWS])
        return out

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, H] -> [T, H]
        if self.fused:
            fused_out: torch.Tensor = self.down_proj(silu_mul(self.gate_up_proj(x), self.gelu))
            return fused_out
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)  # [T, F] each
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)  # [T, F]
        out: torch.Tensor = self.down_proj(act * up)
        return out


class DecoderLayer(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    fused = False  # the residual add and the second norm in one kernel, set by use_fused_ops

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        eps, offset = config.rms_norm_eps, config.norm_weight_offset
        self.input_layernorm = RMSNorm(config.hidden_size, eps, offset)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, offset)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttentionContext,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        plan: DecodeStepPlan | None = None,
    ) -> torch.Tensor:
        # x [T, H], rope (cos, sin) [T, 1, D] of the positions -> [T, H]
        attn: torch.Tensor = self.self_attn(
            self.input_layernorm(x), ctx, k_cache, v_cache, rope, plan
        )
        if self.fused:
            return self._fused_tail(x, attn)
        x = x + attn
        mlp: torch.Tensor = self.mlp(self.post_attention_layernorm(x))
        return x + mlp

    def _fused_tail(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        # x, attn [T, H] -> [T, H]: residual add + second norm in one kernel, then the MLP
        norm = self.post_attention_layernorm
        x, h = add_rms_norm(x, attn, norm.weight, norm.eps, norm.offset)  # [T, H] each
        mlp: torch.Tensor = self.mlp(h)
        return x + mlp

    # The fused layer cut at its attention, for graphs captured around it
    # (fast.engine.cuda_graphs.MixedGraphs): forward = attention_output(x, attend(attention_input)).
    def attention_input(
        self,
        x: torch.Tensor,
        ctx: AttentionContext,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """x [T, H] -> q [T, Hq, D]: norm, QKV projection, rope + KV write (fused path)."""
        return self.self_attn.fused_query(self.input_layernorm(x), ctx, k_cache, v_cache, rope)

    def attention_output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """x [T, H], the attention's o [T, Hq, D] -> the layer's output [T, H] (fused path)."""
        attn: torch.Tensor = self.self_attn.o_proj(o.reshape(x.shape[0], -1))  # [T, H]
        return self._fused_tail(x, attn)
