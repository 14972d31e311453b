"""CUDA graphs of the decode step, one per padded batch size, and the kernels' warm-up.

A decode step launches hundreds of small kernels (every layer's norms, projections, rope, KV
write, attention); at small batches their launch time exceeds their run time. A CUDA graph
records the launches once and replays them with one call. Graph replay needs fixed shapes and
addresses, so each captured size ``B`` reads static input buffers; a batch of ``b <= B``
sequences is written into them, the rows ``b..B-1`` padded (slot ``-1``: no KV write; length 0:
no keys, output 0), and the first ``b`` rows of the output are used.

The static inputs are views of two device buffers, one int64 (token ids, positions, slots) and
one int32 (block tables, lengths), each mirrored by a pinned host buffer: the engine's numpy
arrays are written into the host mirrors and each buffer crosses in one asynchronous copy, so a
replay costs two copies and one launch of host work.

Per-layer attention parameters (each layer's sliding window, soft-cap and scale: Gemma, Qwen2,
Phi-3) are Python constants of that layer's kernel call, so the capture records every layer with
its own; the model's per-step device work (LongRoPE's choice of factors from the lengths) reads
the static inputs without a host synchronization, so it replays too.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any, cast

import torch

from fast.engine.batch import HostBatch, padded_width
from fast.model.attention_context import AttentionContext
from fast.model.llama import LlamaForCausalLM

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k_cache, v_cache)

__all__ = [
    "DecodeGraphs",
    "GraphInputs",
    "MixedGraphs",
    "capture_graph",
    "piecewise_ok",
    "warm_up",
]


def _dummy_ctx(b: int, width: int, device: torch.device) -> AttentionContext:
    """A decode context of ``b`` padding rows: no KV write, no keys."""
    return AttentionContext(
        slot_mapping=torch.full((b,), -1, dtype=torch.int64, device=device),
        block_tables=torch.zeros(b, width, dtype=torch.int32, device=device),
        seq_lens=torch.zeros(b, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.arange(b + 1, dtype=torch.int32, device=device),
        max_seqlen_q=1,
        is_decode=True,
    )


def warm_up(
    model: LlamaForCausalLM,
    kv_caches: KVCaches,
    device: torch.device,
    max_width: int,
    sizes: list[int],
    max_num_seqs: int = 1,
) -> None:
    """Compile every kernel variant a run can meet before the first request.

    Triton compiles a kernel once per set of compile-time arguments; the decode kernel's split
    count depends on the batch size and the (power-of-two padded) block-table width, so each
    (size, width) pair runs one padding-only decode forward; two prefill forwards (a whole
    prompt, and a chunk after a cached prefix) compile the prefill and KV-write kernels. The
    prefill kernel's binary search over the batch has a compile-time step count that grows with
    the number of sequences (``kernels.triton_prefill.search_steps``), so the prefill runs once
    more for the smallest batch of each step count up to ``max_num_seqs`` (on an H200 a step
    with 256 sequences otherwise compiled for 1.8 s mid-run). Every other argument is either
    not specialized or, like the staged inputs' 16-byte alignment, the same in every step.
    """
    from kernels.triton_prefill import search_steps

    first_of: dict[int, int] = {}  # search steps -> the smallest batch that needs them
    for b in range(1, max_num_seqs + 1):
        first_of.setdefault(search_steps(b), b)
    dev, caches, top = device, kv_caches, max_width
    widths = sorted(
        {padded_width(w, top) for w in [1 << k for k in range(4, 16) if 1 << k < top] + [top]}
    )
    with torch.inference_mode():
        for b in sizes:
            for w in widths:
                ids = torch.zeros(b, dtype=torch.int64, device=dev)  # [b]
                model(ids, ids, _dummy_ctx(b, w, dev), caches)
        n = 4  # tokens per sequence
        runs = [(1, 0), (1, 16)]  # a whole prompt, and a chunk after a cached prefix
        runs += [(b, 0) for b in sorted(first_of.values()) if b > 1]
        for b, prefix in runs:
            ids = torch.zeros(b * n, dtype=torch.int64, device=dev)  # [b * n]
            model(
                ids,
                torch.arange(prefix, prefix + n, device=dev).repeat(b),  # [b * n]
                AttentionContext(
                    slot_mapping=torch.full((b * n,), -1, dtype=torch.int64, device=dev),
                    block_tables=torch.zeros(b, widths[0], dtype=torch.int32, device=dev),
                    seq_lens=torch.full((b,), prefix + n, dtype=torch.int32, device=dev),
                    cu_seqlens_q=torch.arange(0, b * n + 1, n, dtype=torch.int32, device=dev),
                    max_seqlen_q=n,
                    is_decode=False,
                ),
                caches,
            )
    if dev.type == "cuda":
        torch.cuda.synchronize()


class GraphInputs:
    """The graphs' static inputs: device buffers and their (pinned, on CUDA) host mirrors.

    ``dev64 [3, B]`` holds token ids, positions and slots; ``dev32 [B * W + B]`` the block
    tables ``[B, W]`` and the lengths ``[B]``. :meth:`write` fills the host mirrors for a batch
    padded to ``size`` rows; :meth:`upload` sends both in one asynchronous copy each.
    """

    def __init__(self, big: int, width: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.big, self.width, self.device = big, width, device
        self.dev64 = torch.zeros(3, big, dtype=torch.int64, device=device)
        self.dev64[2].fill_(-1)
        self.dev32 = torch.zeros(big * width + big, dtype=torch.int32, device=device)
        self.host64 = torch.zeros(3, big, dtype=torch.int64, pin_memory=pin)
        self.host32 = torch.zeros(big * width + big, dtype=torch.int32, pin_memory=pin)
        self.tables = self.dev32[: big * width].view(big, width)  # [B, W]
        self.lens = self.dev32[big * width :]  # [B]
        self.cu = torch.arange(big + 1, dtype=torch.int32, device=device)  # [B + 1]
        h64, h32 = self.host64.numpy(), self.host32.numpy()
        self._ids, self._pos, self._slots = h64[0], h64[1], h64[2]
        self._tables = h32[: big * width].reshape(big, width)
        self._lens = h32[big * width :]
        self._event: torch.cuda.Event | None = None

    def ctx(self, b: int) -> AttentionContext:
        """The decode context of the first ``b`` rows."""
        return AttentionContext(
            self.dev64[2, :b], self.tables[:b], self.lens[:b], self.cu[: b + 1], 1, True
        )

    def write(self, batch: HostBatch, size: int) -> None:
        """Fill the host mirrors: the batch's ``b`` rows, then padding up to ``size``."""
        b, w = batch.tables.shape
        if self._event is not None:  # the previous upload has left the pinned buffers
            self._event.synchronize()
            self._event = None
        self._ids[:b] = batch.tokens
        self._ids[b:size] = 0
        self._pos[:b] = batch.positions
        self._pos[b:size] = 0
        self._slots[:b] = batch.slots
        self._slots[b:size] = -1
        self._tables[:b, :w] = batch.tables
        self._lens[:b] = batch.seq_lens
        self._lens[b:size] = 0

    def upload(self) -> None:
        """Copy both host mirrors to the device (asynchronous on CUDA)."""
        self.dev64.copy_(self.host64, non_blocking=True)
        self.dev32.copy_(self.host32, non_blocking=True)
        if self.device.type == "cuda":
            self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._event.record()


class DecodeGraphs:
    """Captured decode forwards for the batch sizes in ``cuda_graph_batch_sizes``."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: KVCaches,
        device: torch.device,
        max_width: int,
        sizes: list[int],
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sizes
        self.inputs = GraphInputs(sizes[-1], max_width, device)
        ids, pos = self.inputs.dev64[0], self.inputs.dev64[1]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        with torch.inference_mode():
            for b in reversed(sizes):  # largest first: smaller ones reuse its pool
                ctx = self.inputs.ctx(b)
                stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm up outside the capture
                        self.model(ids[:b], pos[:b], ctx, self.kv_caches)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[b] = self.model(ids[:b], pos[:b], ctx, self.kv_caches)  # [b, H]
                pool = graph.pool()
                self.graphs[b] = graph
        torch.cuda.synchronize()

    def run(self, batch: HostBatch, ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Replay the smallest graph that fits the batch's ``b`` sequences; None when none
        does (too many sequences, or a table wider than captured). -> hidden [b, H]

        ``ids`` [b] (on the device) replaces ``batch.tokens``: the overlapped scheduling's
        input ids are the previous step's sampled tokens, still on the device; they are
        copied into the static input after the upload, in stream order."""
        b, w = batch.tables.shape
        i = bisect.bisect_left(self.sizes, b)
        if i == len(self.sizes) or w > self.inputs.width:
            return None
        size = self.sizes[i]
        self.inputs.write(batch, size)
        self.inputs.upload()
        if ids is not None:
            self.inputs.dev64[0, :b].copy_(ids)
        self.graphs[size].replay()
        return self.outputs[size][:b]


def capture_graph(run: Callable[[], object], pool: Any = None) -> torch.cuda.CUDAGraph:
    """``run`` once on a side stream (it compiles and allocates there, outside the capture),
    then captured into a CUDA graph, in memory pool ``pool`` when given (``graph.pool()`` of
    an earlier capture: graphs replayed one at a time may share one)."""
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        run()
    return graph


def piecewise_ok(model: LlamaForCausalLM, kv_caches: KVCaches) -> bool:
    """Whether :class:`MixedGraphs` can run ``model``: the base forward and rope (Phi-3's
    LongRoPE reads the step's lengths), plain decoder layers on the fused path (no per-head
    Q/K norm), and caches of the activations' dtype (an fp8 cache calibrates on the host)."""
    from fast.model.layers import DecoderLayer

    cls = type(model)
    if cls.forward is not LlamaForCausalLM.forward or cls.rope is not LlamaForCausalLM.rope:
        return False
    dtype = model.model.embed_tokens.weight.dtype
    for layer in model.model.layers:
        if type(layer) is not DecoderLayer or not (layer.fused and layer.self_attn.fused):
            return False
        if layer.self_attn.q_norm is not None or layer.self_attn.kv_scales is not None:
            return False
    return all(k.dtype == dtype for k, _ in kv_caches)


class MixedGraphs:
    """Steps with prefill tokens from CUDA graphs, captured piecewise around the attention.

    A step with prefill tokens varies in what its attention sees (sequences, chunk lengths,
    block tables), but every other kernel of the forward depends only on its token count. So
    for each captured count ``S`` the forward is cut at its attention calls into ``L + 1``
    graphs: the embedding and rope tables with layer 0's norm, QKV projection and rope + KV
    write; then for each layer the output projection, residual + norm, MLP and the next
    layer's input half; the last ends with the final norm. Between two graphs the layer's
    attention runs eagerly on the step's ``t <= S`` real tokens, with the step's own metadata
    (decode kernel on the leading single-token rows, prefill kernel on the rest). The graphs
    talk through static buffers: residual ``x [S, H]``, queries ``q [S, Hq, D]``, attention
    output ``o [S, Hq, D]``, rope tables; rows ``t..S-1`` are padding (slot ``-1``: no KV write;
    their values are never read back). A step replays ``L + 1`` graphs and launches ``L``
    attention calls instead of about ten kernels per layer from Python (a 288-token step of
    the Llama-3-8B shape took 27.9 ms eagerly, 24.6 of them spent issuing it, against 9.9 ms
    replayed from one graph on an H200: benchmarks/results/mixed_step_h200.json).
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: KVCaches,
        device: torch.device,
        sizes: list[int],
    ) -> None:
        cfg = model.config
        from fast.model.layers import DecoderLayer

        self.model, self.kv_caches, self.sizes = model, kv_caches, sorted(set(sizes))
        self.layers = [cast(DecoderLayer, layer) for layer in model.model.layers]
        top, dtype = self.sizes[-1], model.model.embed_tokens.weight.dtype
        hq, d = cfg.num_attention_heads, cfg.head_dim
        self.ids = torch.zeros(top, dtype=torch.int64, device=device)  # [S]
        self.pos = torch.zeros(top, dtype=torch.int64, device=device)  # [S]
        self.slots = torch.full((top,), -1, dtype=torch.int64, device=device)  # [S]
        self.x = torch.zeros(top, cfg.hidden_size, dtype=dtype, device=device)  # [S, H]
        self.q = torch.zeros(top, hq, d, dtype=dtype, device=device)  # [S, Hq, D]
        self.o = torch.zeros(top, hq, d, dtype=dtype, device=device)  # [S, Hq, D]
        self.out = torch.zeros(top, cfg.hidden_size, dtype=dtype, device=device)  # [S, H]
        self.ropes: list[tuple[torch.Tensor, torch.Tensor]] = []  # per table [S, 1, R]
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.replays = 0  # steps run from the graphs
        pool = None
        with torch.inference_mode():
            _, ropes = model.embed(self.ids[:1], self.pos[:1], self._ctx(1))  # their shapes
            self.ropes = [
                (
                    torch.zeros(top, *c.shape[1:], dtype=c.dtype, device=device),
                    torch.zeros(top, *s.shape[1:], dtype=s.dtype, device=device),
                )
                for c, s in ropes
            ]
            for size in reversed(self.sizes):  # largest first: the smaller reuse its pool
                graphs = []
                for piece in range(len(kv_caches) + 1):
                    graph = capture_graph(lambda: self._piece(piece, size), pool)
                    pool = graph.pool()
                    graphs.append(graph)
                self.graphs[size] = graphs
        torch.cuda.synchronize()

    def _ctx(self, size: int) -> AttentionContext:
        """What a piece's KV write reads: the static slots (the rest is never used there)."""
        dev = self.slots.device
        none = torch.zeros(1, 1, dtype=torch.int32, device=dev)
        return AttentionContext(self.slots[:size], none, none[0], none[0], 1, False)

    def _piece(self, piece: int, size: int) -> None:
        """Run piece ``piece`` of the forward on the first ``size`` rows of the buffers."""
        layers, ctx = self.layers, self._ctx(size)
        x = self.x[:size]  # [S, H]
        if piece == 0:
            x0, ropes = self.model.embed(self.ids[:size], self.pos[:size], ctx)
            x.copy_(x0)
            for (cos, sin), (c, s) in zip(self.ropes, ropes):
                cos[:size].copy_(c)
                sin[:size].copy_(s)
        else:
            x.copy_(layers[piece - 1].attention_output(x, self.o[:size]))
        if piece == len(layers):
            self.out[:size].copy_(self.model.model.norm(x))
            return
        table = self.model._layer_rope[piece]
        rope = (self.ropes[table][0][:size], self.ropes[table][1][:size])
        k_cache, v_cache = self.kv_caches[piece]
        self.q[:size].copy_(layers[piece].attention_input(x, ctx, k_cache, v_cache, rope))

    def run(
        self, ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor | None:
        """The forward of a step's ``t`` tokens (ids, positions [t] and ctx on the device)
        from the smallest captured size that holds them; None when none does. -> [t, H]"""
        t = int(ids.shape[0])
        i = bisect.bisect_left(self.sizes, t)
        if i == len(self.sizes):
            return None
        size = self.sizes[i]
        self.ids[:t].copy_(ids)
        self.pos[:t].copy_(positions)
        self.slots[:t].copy_(ctx.slot_mapping)
        if t < size:
            self.slots[t:size].fill_(-1)
        graphs = self.graphs[size]
        graphs[0].replay()
        q, o = self.q[:t], self.o[:t]
        with torch.inference_mode():
            for layer, (k_cache, v_cache), graph in zip(self.layers, self.kv_caches, graphs[1:]):
                layer.self_attn.attend(q, ctx, k_cache, v_cache, out=o)
                graph.replay()
        self.replays += 1
        return self.out[:t]
