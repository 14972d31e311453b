"""LLMEngine: one continuous-batching step at a time over a paged KV cache.

``step()`` = schedule (``fast.engine.scheduler``), apply the cache operations the schedule asks for
(swap out, swap in, copy-on-write copies), flatten the scheduled tokens into one batch with its
:class:`~fast.model.attention_context.AttentionContext`, run the model, sample one token for every
sequence that reached its last known token, check the stop conditions, and tell the scheduler
(which frees the blocks of finished sequences).

``n > 1`` is done by fork: only the request's first sequence (the parent) is scheduled and
prefills the prompt; the step that samples its first token samples the other ``n - 1``
sequences' first tokens from the same logits row (each with its own generator), and the block
manager forks the parent into them (shared prompt blocks, copy-on-write on the first append).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np
import torch

import kernels
from fast.engine.batch import HostBatch, HostStaging, padded_width, to_device
from fast.engine.config import EngineConfig, pool_sizes, resolve_device, resolve_dtype
from fast.engine.inputs import ParsedPrompt, parse_prompt, parse_prompts
from fast.engine.journal import (
    JournaledBlockManager,
    SavedKV,
    restore_kv_blocks,
    save_kv_blocks,
)
from fast.engine.outputs import (
    CompletionOutput,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
    decode_logprobs,
)
from fast.engine.sampler import Sampler, SamplerOutput, token_logprobs
from fast.engine.sampling_params import RequestOutputKind, SamplingParams
from fast.engine.scheduler import Scheduler, SchedulerCheckpoint, checkpoint, restore
from fast.engine.sequence import Sequence, SequenceStatus, all_finished
from fast.engine.stop import StopChecker
from fast.loader import LoadedModel, load_model
from fast.model.kv_scales import LayerKVScales, install_kv_scales
from fast.model.llama import allocate_kv_caches
from kernels.fp8 import cache_dtype, is_fp8
from spec.errors import InvalidArgumentError
from spec.scheduler import SchedulerConfig, SchedulerOutput, StepOutcome

if TYPE_CHECKING:  # imported where a CUDA engine captures them
    from fast.engine.cuda_graphs import MixedGraphs

__all__ = ["LLMEngine", "EngineStats", "BlockUsage", "CompactReport", "PromptType"]
_T = TypeVar("_T")  # what a step's body returns (LLMEngine._transaction)

#: A prompt: text, token ids, or ``{"prompt_token_ids": [...]}`` / ``{"prompt": "..."}``.
PromptType = str | Seq[int] | Mapping[str, Any]

#: :meth:`LLMEngine.step_compact`'s report of a running ``DELTA`` request with one sequence and
#: no logprobs after its first output: ``(request_id, new_token_ids, new_text,
#: cumulative_logprob)``, what its ``DELTA`` output would hold besides what its earlier outputs
#: already said (the metrics: only ``last_token_time`` changed, to the step's time).
CompactReport = tuple[str, list[int], str, float]


def _block_manager(config: Any) -> Any:
    """The numba block manager when it is importable, else the spec's (same API)."""
    try:
        from fast.blocks.manager import BlockManager
    except ImportError:  # pragma: no cover - fast.blocks.manager is part of the package
        from spec.block_manager import BlockManager  # type: ignore[assignment]
    return BlockManager(config)


@dataclass(frozen=True)
class BlockUsage:
    """What :meth:`LLMEngine.block_usage` reports (device blocks)."""

    in_use: int  # physical blocks held by some sequence (cached blocks nobody holds are free)
    unshared: int  # sum over resident sequences of ceil(tokens / block_size)

    @property
    def saved(self) -> float:
        """``1 - in_use / unshared``: the fraction of blocks sharing saves (0.0 when idle)."""
        return 1.0 - self.in_use / self.unshared if self.unshared else 0.0


@dataclass
class EngineStats:
    """Counters since the engine started (tests and benchmarks read them)."""

    steps: int = 0
    computed_tokens: int = 0  # every token run through the model
    generated_tokens: int = 0
    preempted: int = 0  # recompute preemptions
    swapped_out: int = 0
    swapped_in: int = 0
    copied_blocks: int = 0  # copy-on-write block copies (forked children's first appends)
    forked: int = 0  # children started from a parent's first token (n > 1)
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (vLLM's name)
    prefix_cache_hits: int = 0  # of those, tokens served from cached blocks
    # async_scheduling: steps launched before the previous step's tokens reached the host,
    # and calls that processed a step in flight without launching the next (a drain)
    overlapped: int = 0
    drained: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """``prefix_cache_hits / prefix_cache_queries`` (0.0 before any query)."""
        q = self.prefix_cache_queries
        return self.prefix_cache_hits / q if q else 0.0

    def record(self, out: SchedulerOutput) -> None:
        """Add one step's schedule."""
        self.steps += 1
        self.computed_tokens += out.num_batched_tokens
        self.preempted += len(out.preempted)
        self.swapped_out += len(out.swapped_out)
        self.swapped_in += len(out.swapped_in)
        self.copied_blocks += len(out.blocks_to_copy)


class LLMEngine:
    """The engine behind :class:`fast.api.llm.LLM`.

    Args:
        model: a ``.gguf`` file or Hugging Face directory (None: the default SmolLM2), or an
            already loaded :class:`~fast.loader.LoadedModel` (random weights in tests).
        config: the engine settings; keyword arguments override its fields.
    """

    def __init__(
        self,
        model: str | LoadedModel | None = None,
        config: EngineConfig | None = None,
        **overrides: Any,
    ) -> None:
        cfg = config or EngineConfig()
        if overrides:
            cfg = EngineConfig(**{**cfg.__dict__, **overrides})
        self.config = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.fused_ops = cfg.resolved_fused_ops(self.device.type)
        torch.manual_seed(cfg.seed)
        tp = cfg.tensor_parallel_size
        loaded = (
            model
            if isinstance(model, LoadedModel)
            else load_model(model, dtype=self.dtype, device="cpu" if tp > 1 else self.device)
        )
        self.tensor_parallel: Any = None  # TensorParallelDriver when tp > 1
        kv_config = loaded.config  # the shape of this process's KV cache
        if tp > 1:  # checked now; the workers start once the pools are sized
            from fast.distributed.sharding import plan_sharding

            kv_config = plan_sharding(loaded.config, tp).local_config(loaded.config, 0)
        else:
            self.model = loaded.model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        max_len = cfg.max_model_len or self.model_config.max_position_embeddings
        if max_len > self.model_config.max_position_embeddings:
            raise InvalidArgumentError(
                "max_model_len",
                max_len,
                f"above the model's max_position_embeddings "
                f"{self.model_config.max_position_embeddings}",
            )
        self.max_model_len = max_len
        budget = cfg.resolved_max_num_batched_tokens(max_len)
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=max_len,
            enable_chunked_prefill=cfg.enable_chunked_prefill,
            preemption_mode=cfg.preemption_mode,
        )
        self.num_gpu_blocks, self.num_cpu_blocks = pool_sizes(
            cfg, kv_config, self.dtype, self.device, max_len
        )
        if self.num_gpu_blocks * cfg.block_size < max_len:
            raise InvalidArgumentError(
                "num_gpu_blocks",
                self.num_gpu_blocks,
                f"{self.num_gpu_blocks} blocks of {cfg.block_size} tokens cannot hold one "
                f"sequence of max_model_len {max_len}",
            )
        from spec.block_manager import BlockManagerConfig

        self.block_manager = _block_manager(
            BlockManagerConfig(
                block_size=cfg.block_size,
                num_gpu_blocks=self.num_gpu_blocks,
                num_cpu_blocks=self.num_cpu_blocks,
                enable_prefix_caching=cfg.enable_prefix_caching,
            )
        )
        # every step is a transaction: its block operations are undone if it fails
        self.block_manager = JournaledBlockManager(self.block_manager)
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        self.kv_cache_dtype = cache_dtype(cfg.kv_cache_dtype, self.dtype)  # fp8: 1 byte
        if tp > 1:  # rank 0 here, ranks 1..tp-1 spawned (docs/tensor-parallel.md)
            self.tensor_parallel = _start_tensor_parallel(loaded, cfg, self.device, self.dtype)
            self.model = self.tensor_parallel.model
        self.kv_caches = allocate_kv_caches(
            kv_config,
            self.num_gpu_blocks,
            cfg.block_size,
            self.kv_cache_dtype,
            self.device,
        )
        self.cpu_caches = (
            allocate_kv_caches(
                kv_config, self.num_cpu_blocks, cfg.block_size, self.kv_cache_dtype, "cpu"
            )
            if self.num_cpu_blocks
            else []
        )
        if self.tensor_parallel is not None:  # every rank: its shard of the same blocks
            self.tensor_parallel.allocate(self.num_gpu_blocks, self.num_cpu_blocks, cfg.block_size)
        self.sampler = Sampler()
        self._stop = StopChecker(self.tokenizer, self.model_config, max_len)
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self._cache_salts = itertools.count()  # private prefix-cache keys (prompt logprobs)
        self._requests: dict[str, list[Sequence]] = {}  # request id -> its n sequences
        self._generators: dict[int, torch.Generator] = {}
        self._children: dict[int, list[Sequence]] = {}  # parent seq id -> its unforked n - 1
        self._metrics: dict[str, RequestMetrics] = {}  # request id -> its times
        self._num_cached: dict[str, int] = {}  # request id -> prefix-cache hits (tokens)
        self._unscheduled: set[str] = set()  # requests no step has scheduled yet
        self._prompt_logprobs: dict[str, PromptLogprobs] = {}  # requests that asked for them
        self._sent: dict[str, _Sent] = {}  # DELTA requests: what their outputs reported
        self.stats = EngineStats()
        self._undo: _StepUndo | None = None  # the step in flight's saved state
        self._flight: _Flight | None = None  # async_scheduling: launched, not yet processed
        self._max_width = -(-max_len // cfg.block_size)  # blocks of the longest sequence
        self._staging = HostStaging(self.device)
        self._graphs: Any = None  # decode steps, captured whole
        self._mixed: MixedGraphs | None = None  # steps with prefill tokens, piecewise
        self._own_fused_ops()  # before warm-up: the graphs capture what the config chose
        self.kv_scales: list[LayerKVScales] = []  # fp8 cache: per layer (docs/fp8.md)
        if is_fp8(self.kv_cache_dtype):
            self.kv_scales = install_kv_scales(
                self.model,
                self.kv_cache_dtype,
                self.device,
                per_head=cfg.kv_scale_granularity == "head",
                headroom=cfg.kv_scale_headroom,
                k_scale=cfg.k_scale,
                v_scale=cfg.v_scale,
            )
        if self.device.type == "cuda":
            from fast.engine.cuda_graphs import DecodeGraphs, warm_up

            limit = cfg.max_num_seqs
            sizes = sorted(
                {b for b in cfg.cuda_graph_batch_sizes if b <= limit}
                | {min(limit, max(cfg.cuda_graph_batch_sizes))}
            )
            if self.tensor_parallel is not None:  # the workers warm up (and capture) too
                self.tensor_parallel.prepare_cuda(
                    self._max_width, limit, not cfg.enforce_eager, sizes
                )
            warm_up(self.model, self.kv_caches, self.device, self._max_width, sizes, limit)
            if not cfg.enforce_eager:
                self._graphs = DecodeGraphs(
                    self.model, self.kv_caches, self.device, self._max_width, sizes
                )
                self._mixed = self._mixed_graphs(cfg)
        if cfg.calculate_kv_scales and not cfg.kv_scales_given:
            for layer_scales in self.kv_scales:  # after the warm-up: the first real step
                layer_scales.arm()

    # -- requests -------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: PromptType | ParsedPrompt,
        params: SamplingParams | None = None,
    ) -> None:
        """Validate and queue one request; raises before anything is scheduled.

        ``prompt`` is any form :meth:`parse_prompts` accepts, or one of its results."""
        arrival = time.time()
        params = params if params is not None else SamplingParams()
        if request_id in self._requests:
            raise InvalidArgumentError("request_id", request_id, "already in use")
        vocab = self.model_config.vocab_size
        parsed = parse_prompt(prompt, self.tokenizer, vocab, self.max_model_len)
        text, ids = parsed.prompt, parsed.token_ids
        if not isinstance(params, SamplingParams):
            raise InvalidArgumentError(
                "sampling_params", params, f"a {type(params).__name__}, not a SamplingParams"
            )
        params.check_vocab_size(vocab)
        if params.stop and self.tokenizer is None:  # matched in the text, which needs one
            raise InvalidArgumentError(
                "stop", params.stop, "stop strings need a tokenizer; this model has none"
            )
        # prompt logprobs need every prompt position computed: such a request gets a cache key
        # of its own, so it never hits blocks of other requests (vLLM skips the lookup too);
        # unique per request, not per id: an id may come back once its request finished
        cache_key = (
            f"pagedkv:prompt_logprobs:{request_id}:{next(self._cache_salts)}"
            if params.prompt_logprobs is not None and self.config.enable_prefix_caching
            else None
        )
        group = []
        for index in range(params.n):  # n > 1: the parent (index 0) is forked at its 1st token
            seq = Sequence(
                next(self._seq_ids),
                request_id,
                next(self._arrivals),
                list(ids),
                sampling_params=params,
                prompt=text,
                index=index,
                cache_key=cache_key,
            )
            if params.logprobs is not None:
                seq.logprobs = []
            self._stop.start(seq)
            group.append(seq)
            if params.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(params.seed + index)
                self._generators[seq.seq_id] = gen
        self.scheduler.add_request(group[0])
        if len(group) > 1:
            self._children[group[0].seq_id] = group[1:]
        self._requests[request_id] = group
        self._metrics[request_id] = RequestMetrics(arrival)
        self._unscheduled.add(request_id)
        if params.prompt_logprobs is not None:
            self._prompt_logprobs[request_id] = [None]

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its blocks go back to the pool. Unknown ids are ignored.

        Returns the request's final output (``finish_reason="abort"`` on the sequences that
        were still running; for a ``DELTA`` request, what is new since its last output), or
        None for an unknown id.

        With ``async_scheduling``, a request in the step in flight gives its blocks back when
        that step is processed (the device still writes them); the abort processes it at once
        when no other sequence is in it.
        """
        final = self._abort_request(request_id)
        if self._flight is not None and not self.scheduler.in_flight():
            self._async_step(False, False)  # nothing left in flight: process it, free the blocks
        return final

    def _abort_request(self, request_id: str) -> RequestOutput | None:
        group = self._requests.pop(request_id, [])
        for seq in group:
            self._children.pop(seq.seq_id, None)
            if seq.seq_id in self.scheduler.seqs:
                self.scheduler.abort_request(seq.seq_id)
            elif not seq.is_finished:  # a child not forked yet: holds no blocks
                seq.status = SequenceStatus.FINISHED_ABORTED
            self._stop.finish(seq)
            self._generators.pop(seq.seq_id, None)
        if not group:
            return None
        self._metrics[request_id].finished(time.time())
        delta = group[0].sampling_params.output_kind == RequestOutputKind.DELTA
        final = self._delta_output(group) if delta else self.request_output(group)
        self._forget(request_id)
        return final

    def _forget(self, request_id: str) -> None:
        """Drop the per-request records of a finished or aborted request."""
        self._metrics.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        self._unscheduled.discard(request_id)
        self._prompt_logprobs.pop(request_id, None)
        self._sent.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        """Some request is waiting, running or swapped, or a step is in flight."""
        return self.scheduler.has_unfinished_requests() or self._flight is not None

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent); a later step raises
        :class:`~fast.distributed.errors.TensorParallelGroupDownError`."""
        if self.tensor_parallel is not None:
            self.tensor_parallel.shutdown()

    @property
    def num_free_gpu_blocks(self) -> int:
        """Free device blocks (cached prefix blocks with no user count as free)."""
        return int(self.block_manager.num_free_gpu_blocks)

    def block_usage(self) -> BlockUsage:
        """Device blocks in use now, against the blocks the same resident sequences would hold
        without any sharing (fork of ``n > 1`` samples, prefix-cache hits): O(sequences)."""
        bs = self.config.block_size
        bm = self.block_manager
        unshared = sum(
            -(-bm.num_tokens(seq.seq_id) // bs)
            for seq in self.scheduler.running
            if seq.in_pool and bm.has_sequence(seq.seq_id)
        )
        return BlockUsage(self.num_gpu_blocks - self.num_free_gpu_blocks, unshared)

    # -- the step -------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one step; return the requests that produced a token (finished ones included).

        ``finished_only`` returns only the requests that finished in this step, each with its
        whole (cumulative) output (what batch generation needs; it saves building an output per
        running request per step). Otherwise each request reports as its
        ``SamplingParams.output_kind`` says: everything so far (``CUMULATIVE``, the default),
        only what is new since its last output (``DELTA``, which costs the host time of the new
        tokens only), or nothing until it finishes (``FINAL_ONLY``).

        A step is all or nothing: if anything raises inside it (the model, the sampler, the
        block manager, a KeyboardInterrupt), the engine is put back exactly as it was before
        the step (queues, block manager, KV of blocks the step overwrote, sequences, request
        records, seeded generators) and the exception propagates. Stepping again retries the
        same step; ``abort_request`` drops a request that cannot run.

        With ``EngineConfig.async_scheduling`` a call may launch the next step before it
        processes the one in flight, and return that one's outputs: see
        :meth:`_async_step`.
        """
        if self.config.async_scheduling:
            return self._full_outputs(self._async_step(finished_only, False)[1])
        return self._full_outputs(self._transaction(lambda: self._step(finished_only, False))[1])

    @torch.inference_mode()
    def step_compact(self) -> tuple[float, list[RequestOutput | CompactReport]]:
        """:meth:`step` for the engine process (``fast.api.engine_process``): ``(time, outputs)``
        where a running ``DELTA`` request with one sequence, no logprobs and no prompt logprobs
        that reported before reports a :data:`CompactReport` tuple instead of its ``DELTA``
        :class:`RequestOutput`; every other output is :meth:`step`'s, in the same order.
        ``time`` is the step's token time: each compact request's ``last_token_time``, its only
        metric that changed since its previous output (the others are set at its first
        schedule, first token and finish, and those outputs are full ones).

        The tuple carries exactly the new ids and text a ``DELTA`` output would (the same
        ``text_holdback`` rule), built from the sequence with no output, completion or metrics
        object; the request's ``_sent`` record is replaced as :meth:`_delta_output` replaces
        it, so the step's undo (which restores the ``_sent`` table) covers both alike. Here in
        the engine rather than in the engine process reading sequences after a step: only the
        engine knows which requests a step sampled and what their outputs reported, and the
        undo journal already owns that record. All or nothing, as :meth:`step`. With
        ``async_scheduling`` the reports are those of the step the call processed (the one in
        flight, or a synchronous one) with that step's token time; a call that only launched a
        step returns the call's time and no output."""
        if self.config.async_scheduling:
            return self._async_step(False, True)
        return self._transaction(lambda: self._step(False, True))

    def _transaction(self, body: Callable[[], _T]) -> _T:
        """Run ``body`` (the work of one ``step()`` call) all or nothing: if it raises, the
        engine is put back as it was before the call (``async_scheduling``: the step in flight
        too, still in flight) and the exception propagates with a note saying so."""
        flight = self._flight
        undo = self._undo = self._save_step(in_flight=flight is not None)
        try:
            result = body()
        except BaseException as exc:
            self._undo = None
            self._restore_step(undo)
            self._flight = flight
            note = getattr(exc, "add_note", None)  # Python >= 3.11
            if note is not None:
                note(f"pagedkv: step {self.stats.steps + 1} was rolled back (engine as before)")
            raise
        self._undo = None
        self.block_manager.commit()
        return result

    def _step(
        self, finished_only: bool, compact: bool
    ) -> tuple[float, list[RequestOutput | CompactReport]]:
        out = self.scheduler.schedule()
        self._saved_schedule(out)
        self.stats.record(out)
        if self.config.enable_prefix_caching:
            for prompt_len, cached in self.scheduler.allocations:
                self.stats.prefix_cache_queries += prompt_len
                self.stats.prefix_cache_hits += cached
        now = time.time()
        if self._unscheduled:
            self._note_first_scheduled(out, now)
        self._apply_cache_ops(out)
        sampled: dict[int, int] = {}
        finished: set[int] = set()
        touched: list[Sequence] = []
        if out.scheduled:
            seqs, (tokens, logprobs, sampled_lps), forks = self._run_model(out)
            self._saved_sequences(seqs)
            now = time.time()
            metrics, tokenizer = self._metrics, self.tokenizer
            for seq, token, lp, token_lp in zip(seqs, tokens, logprobs, sampled_lps):
                seq.token_ids.append(token)
                seq.cumulative_logprob += token_lp
                if lp is not None and seq.logprobs is not None:
                    if tokenizer is not None and seq.sampling_params.detokenize:
                        decode_logprobs((lp,), tokenizer)
                    seq.logprobs.append(lp)
                metrics[seq.request_id].token(now)
            stopped = self._stop.check_all(seqs)
            sampled = {seq.seq_id: token for seq, token in zip(seqs, tokens)}
            finished = {seq.seq_id for seq in stopped}
            for parent, child in forks:  # before update() may free the parent
                del sampled[child.seq_id]  # not scheduled: the scheduler learns it by fork
                finished.discard(child.seq_id)
                if not child.is_finished:
                    self._fork(parent, child)
            self.stats.generated_tokens += len(tokens)
            touched = stopped if finished_only else seqs
        elif self.scheduler.has_unfinished_requests() and not self.scheduler.running:
            raise RuntimeError(
                "the scheduler made no progress with requests waiting: "
                f"{self.num_free_gpu_blocks} free blocks"
            )
        self.scheduler.update(StepOutcome(sampled, frozenset(finished)))
        return now, self._outputs(touched, finished_only, now, compact)

    def _outputs(
        self, touched: list[Sequence], finished_only: bool, now: float, compact: bool = False
    ) -> list[RequestOutput | CompactReport]:
        """The outputs of the requests of the sequences a step sampled (``touched``), and the
        records of those that finished dropped (``compact``: see :meth:`step_compact`)."""
        outputs: list[RequestOutput | CompactReport] = []
        # With finished_only, only a request with a sequence finishing now can be done now.
        for request_id in dict.fromkeys([seq.request_id for seq in touched]):
            group = self._requests[request_id]
            if compact and len(group) == 1:
                report = self._compact_report(group[0])
                if report is not None:
                    outputs.append(report)
                    continue
            done = all_finished(group)
            if done:
                del self._requests[request_id]
                for seq in group:
                    self._generators.pop(seq.seq_id, None)
                    self._stop.finish(seq)
                self._metrics[request_id].finished(now)
            kind = group[0].sampling_params.output_kind
            if done or (not finished_only and kind != RequestOutputKind.FINAL_ONLY):
                delta = kind == RequestOutputKind.DELTA and not finished_only
                outputs.append(self._delta_output(group) if delta else self.request_output(group))
            if done:
                self._forget(request_id)
        return outputs

    def _compact_report(self, seq: Sequence) -> CompactReport | None:
        """:meth:`step_compact`'s report of a request's only sequence, or None where its
        ``DELTA`` output must be a full one: not ``DELTA``, first output (prompt, prompt
        logprobs, first metrics), finished (finish reason, finish time), logprobs, or nothing
        new. Records what it reported in ``_sent`` as :meth:`_delta_output` does."""
        rid = seq.request_id
        sent = self._sent.get(rid)  # None: no output yet, or not a DELTA request
        if (
            sent is None
            or seq.is_finished
            or seq.logprobs is not None
            or rid in self._prompt_logprobs
        ):
            return None
        n_tok, n_chars, n_lps, ended = sent.marks.get(seq.index, _NOTHING_SENT)
        new_ids = seq.token_ids[len(seq.prompt_token_ids) + n_tok :]
        if not new_ids:
            return None
        text = seq.output_text
        end = len(text) - sent.holdback
        if end < n_chars:
            end = n_chars
        self._sent[rid] = _Sent(
            sent.prompt_token_ids, False, {seq.index: (n_tok + len(new_ids), end, n_lps, ended)},
            sent.holdback,
        )  # fmt: skip
        return rid, new_ids, text[n_chars:end], seq.cumulative_logprob

    def request_output(self, group: list[Sequence]) -> RequestOutput:
        """The current :class:`RequestOutput` of a request (its sequences, in index order)."""
        # Positional arguments: the dataclasses' __init__ takes keywords 2.5x slower.
        completions = [
            CompletionOutput(
                seq.index,
                seq.output_text,
                seq.token_ids[len(seq.prompt_token_ids) :],  # seq.output_token_ids
                seq.cumulative_logprob,
                list(seq.logprobs) if seq.logprobs is not None else None,
                seq.finish_reason,
                seq.stop_reason,
            )
            for seq in group
        ]
        first = group[0]
        rid = first.request_id
        metrics = self._metrics.get(rid)
        prompt_lps = self._prompt_logprobs.get(rid) if self._prompt_logprobs else None
        return RequestOutput(
            rid,
            first.prompt,
            list(first.prompt_token_ids),
            completions,
            all_finished(group),
            list(prompt_lps) if prompt_lps is not None else None,  # prompt_logprobs
            metrics.snapshot() if metrics is not None else None,
            self._num_cached.get(rid),  # num_cached_tokens
        )

    def _delta_output(self, group: list[Sequence]) -> RequestOutput:
        """What is new in a ``DELTA`` request since its last output (``SamplingParams``'s
        ``RequestOutputKind``): new token ids, new logprobs, and the new text up to
        ``holdback`` characters before its end while the sequence runs (a stop string found
        later cuts the text at most that far back, so no character sent is ever taken back);
        a completion with nothing new (n > 1: a sibling finished earlier) is left out.
        Records what it reported in ``_sent`` (replaced, not mutated: a step's undo restores
        the table)."""
        first = group[0]
        rid = first.request_id
        sent = self._sent.get(rid)
        if sent is None:
            holdback = first.sampling_params.text_holdback
            sent = _Sent(list(first.prompt_token_ids), True, {}, holdback)
        marks = dict(sent.marks)
        completions = []
        all_finished = True
        for seq in group:
            n_tok, n_chars, n_lps, ended = marks.get(seq.index, _NOTHING_SENT)
            new_ids = seq.token_ids[len(seq.prompt_token_ids) + n_tok :]
            text = seq.output_text
            reason = seq.finish_reason  # None while it runs
            if reason is None:
                all_finished = False
            end = len(text) if reason is not None else len(text) - sent.holdback
            end = max(end, n_chars)
            lps = None if seq.logprobs is None else seq.logprobs[n_lps:]
            if not (new_ids or end > n_chars or lps or (reason is not None and not ended)):
                continue  # as vLLM: a completion appears when it has something new
            completions.append(  # positional: see request_output
                CompletionOutput(
                    seq.index,
                    text[n_chars:end],
                    new_ids,
                    seq.cumulative_logprob,
                    lps,
                    reason,
                    seq.stop_reason,
                )
            )
            marks[seq.index] = (
                n_tok + len(new_ids),
                end,
                n_lps + len(lps or ()),
                reason is not None,
            )
        self._sent[rid] = _Sent(sent.prompt_token_ids, False, marks, sent.holdback)
        prompt_lps = self._prompt_logprobs.get(rid) if sent.first else None
        metrics = self._metrics.get(rid)
        return RequestOutput(
            rid,
            first.prompt,
            sent.prompt_token_ids,
            completions,
            all_finished,
            list(prompt_lps) if prompt_lps is not None else None,  # prompt_logprobs
            metrics.snapshot() if metrics is not None else None,
            self._num_cached.get(rid),  # num_cached_tokens
        )

    # -- internals ------------------------------------------------------------------------
    def parse_prompts(self, prompts: Any) -> list[ParsedPrompt]:
        """Check every prompt of a call (one prompt or a list, in any form vLLM accepts) and
        tokenize it, before any is queued; raises :class:`~fast.engine.inputs.InvalidPromptError`
        naming the first bad prompt by index. ``add_request`` takes the results as prompts."""
        return parse_prompts(
            prompts, self.tokenizer, self.model_config.vocab_size, self.max_model_len
        )

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        parsed = parse_prompt(
            prompt, self.tokenizer, self.model_config.vocab_size, self.max_model_len
        )
        return parsed.prompt, parsed.token_ids

    def _apply_cache_ops(self, out: SchedulerOutput) -> None:
        # Order: swap out (frees device blocks), swap in, then copy-on-write copies.
        if self.tensor_parallel is not None:  # the workers' shards of the same blocks
            self.tensor_parallel.cache_ops(
                out.blocks_to_swap_out, out.blocks_to_swap_in, out.blocks_to_copy
            )
        if out.blocks_to_swap_out:
            pairs = torch.tensor(out.blocks_to_swap_out, dtype=torch.int64)
            for (k, v), (ck, cv) in zip(self.kv_caches, self.cpu_caches):
                kernels.swap_blocks(k, ck, pairs)
                kernels.swap_blocks(v, cv, pairs)
        if out.blocks_to_swap_in:
            pairs = torch.tensor(out.blocks_to_swap_in, dtype=torch.int64)
            for (k, v), (ck, cv) in zip(self.kv_caches, self.cpu_caches):
                kernels.swap_blocks(ck, k, pairs)
                kernels.swap_blocks(cv, v, pairs)
        if out.blocks_to_copy:
            pairs = torch.tensor(out.blocks_to_copy, dtype=torch.int64, device=self.device)
            for k, v in self.kv_caches:
                kernels.copy_blocks(k, v, pairs)

    def _build_batch(self, out: SchedulerOutput) -> HostBatch:
        """Flatten the scheduled tokens into numpy arrays (no torch, no device work)."""
        seqs, bs, sched = self.scheduler.seqs, self.config.block_size, out.scheduled
        n = len(sched)
        ids = np.array([s.seq_id for s in sched], dtype=np.int64)  # [B]
        starts = np.array([s.start for s in sched], dtype=np.int64)  # [B]
        nums = np.array([s.num_tokens for s in sched], dtype=np.int64)  # [B]
        cu = np.zeros(n + 1, dtype=np.int64)  # [B + 1]
        np.cumsum(nums, out=cu[1:])
        total = int(cu[-1])
        decode = total == n  # one new token per sequence
        if decode:
            tokens = np.array(
                [seqs[s.seq_id].token_ids[s.start] for s in sched], dtype=np.int64
            )  # [T]
            positions = starts  # [T]
            row = np.arange(n)  # [T]
        else:
            tokens = np.fromiter(
                itertools.chain.from_iterable(
                    seqs[s.seq_id].token_ids[s.start : s.start + s.num_tokens] for s in sched
                ),
                np.int64,
                total,
            )  # [T]
            positions = np.arange(total) - np.repeat(cu[:-1] - starts, nums)  # [T]
            row = np.repeat(np.arange(n), nums)  # [T]
        tables = self._tables(ids)  # [B, W]
        slots = tables[row, positions // bs].astype(np.int64) * bs + positions % bs  # [T]
        sample = np.array([s.sample for s in sched], dtype=np.bool_)  # [B]
        return HostBatch(
            tokens,
            positions,
            slots,
            tables,
            (starts + nums).astype(np.int32),
            cu.astype(np.int32),
            int(nums.max()),
            decode,
            cu[1:][sample] - 1,
        )

    def _tables(self, ids: np.ndarray) -> np.ndarray:
        """Block tables [B, W] int32; on CUDA W is padded to a power of two (>= 16, <= the
        widest table ``max_model_len`` needs), so kernels see few distinct widths."""
        bm = self.block_manager
        if hasattr(bm, "gather"):  # the numba block manager: one call for every table
            tables: np.ndarray = bm.gather(ids)[0]  # [B, w]
        else:
            rows = [bm.block_table(int(i)) for i in ids]
            width = max(len(r) for r in rows)
            tables = np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int32)
        if self.device.type != "cuda":
            return tables
        w = tables.shape[1]
        padded = padded_width(w, self._max_width)
        if padded == w:
            return tables
        wide = np.zeros((tables.shape[0], padded), dtype=np.int32)  # [B, W]
        wide[:, :w] = tables
        return wide

    def _fork(self, parent: Sequence, child: Sequence) -> None:
        """Start a child that sampled its first token: forked into the running queue (shared
        blocks) while the running queue has room under ``max_num_seqs``, else queued as a new
        sequence that prefills prompt + first token itself (as after a recompute preemption)."""
        self.stats.forked += 1
        if len(self.scheduler.running) < self.scheduler_config.max_num_seqs:
            self.scheduler.fork(parent, child)
        else:
            self.scheduler.add_request(child)

    def _with_children(
        self, seqs: list[Sequence], logits: torch.Tensor
    ) -> tuple[list[Sequence], torch.Tensor, list[tuple[Sequence, Sequence]]]:
        """Add a row for every unforked child of a parent that samples its first token now:
        (sequences [N'], logits [N', V] with each child repeating its parent's row, forks)."""
        rows: list[int] = []
        order: list[Sequence] = []
        forks: list[tuple[Sequence, Sequence]] = []
        for i, seq in enumerate(seqs):
            rows.append(i)
            order.append(seq)
            for child in self._children.pop(seq.seq_id, ()):
                rows.append(i)
                order.append(child)
                forks.append((seq, child))
        if not forks:
            return seqs, logits, forks
        index = torch.tensor(rows, dtype=torch.int64, device=logits.device)  # [N']
        return order, logits.index_select(0, index), forks

    def _mixed_graphs(self, cfg: EngineConfig) -> MixedGraphs | None:
        """The piecewise graphs of steps with prefill tokens (``cuda_graph_token_sizes``), or
        None: none asked for, tensor parallelism, or a model they cannot cut (``piecewise_ok``)."""
        from fast.engine.cuda_graphs import MixedGraphs, piecewise_ok

        sizes = cfg.resolved_graph_token_sizes(self.max_model_len)
        if not sizes or self.tensor_parallel is not None:
            return None
        if not piecewise_ok(self.model, self.kv_caches):
            return None
        return MixedGraphs(self.model, self.kv_caches, self.device, list(sizes))

    def _own_fused_ops(self) -> None:
        """Set the model's layers to this engine's ``fused_ops``: a loaded model may be shared
        by engines of different settings, so each engine sets it before it runs the model
        (free when it already is; captured graphs keep what they captured)."""
        if getattr(self.model, "fused_ops", self.fused_ops) != self.fused_ops:
            self.model.use_fused_ops(self.fused_ops)

    def _run_model(
        self, out: SchedulerOutput
    ) -> tuple[list[Sequence], SamplerOutput, list[tuple[Sequence, Sequence]]]:
        """Run the model on the step's batch; (sampled sequences, the sampler's output for them,
        the (parent, child) pairs to fork: the children's first tokens are among those sampled).
        """
        self._own_fused_ops()
        # On CUDA a mixed step's single-token sequences go first, so that its attention runs
        # the decode kernel on a prefix of rows; the sampled rows stay in the scheduler's order
        # (sampling, forks and outputs see the order the CPU and the spec see).
        model_out = _decodes_first(out) if self._staging.split else out
        batch = self._build_batch(model_out)
        if model_out is not out:
            batch = dataclasses.replace(batch, sample_rows=_rows_of(out, model_out, batch))
        if self.tensor_parallel is not None:  # the workers run the same step on their shards
            self.tensor_parallel.forward(batch)
        hidden = None
        rows: torch.Tensor | None = None
        if self._graphs is not None and batch.decode:
            hidden = self._graphs.run(batch)  # [T, H] or None
        if hidden is None:
            input_ids, positions, ctx, rows = self._staging.upload(batch)
            if self._mixed is not None and not batch.decode:
                hidden = self._mixed.run(input_ids, positions, ctx)  # [T, H] or None
            if hidden is None:
                hidden = self.model(input_ids, positions, ctx, self.kv_caches)  # [T, H]
        if self._prompt_logprobs:
            self._collect_prompt_logprobs(model_out, batch, hidden)
        num_rows = int(batch.sample_rows.shape[0])
        if not num_rows:
            return [], SamplerOutput([], [], []), []
        if num_rows != hidden.shape[0]:  # prefill, or a chunk that samples nothing
            if rows is None:
                rows = self._staging.put(torch.int64, [batch.sample_rows])[0]
            hidden = hidden.index_select(0, rows)  # [N, H]
        logits = self.model.compute_logits(hidden)  # [N, V] float32
        seqs = [self.scheduler.seqs[s.seq_id] for s in out.scheduled if s.sample]
        forks: list[tuple[Sequence, Sequence]] = []
        if self._children:
            seqs, logits, forks = self._with_children(seqs, logits)  # [N', V]
        gens = [self._generators.get(q.seq_id) for q in seqs] if self._generators else None
        params = [q.sampling_params for q in seqs]
        histories = None
        if any(p.needs_history for p in params):
            histories = [
                (q.prompt_token_ids, q.output_token_ids) if p.needs_history else None
                for q, p in zip(seqs, params)
            ]
        if self._undo is not None:
            self._undo.save_rng(gens, params, self.device)
        banned = self._banned(seqs, params, int(logits.shape[-1]))
        sampled = self.sampler.sample(logits, params, gens, banned=banned, histories=histories)
        return seqs, sampled, forks

    def _banned(
        self, seqs: list[Sequence], params: list[SamplingParams], vocab: int
    ) -> list[frozenset[int]] | None:
        """vLLM's ``min_tokens``: while a sequence has fewer output tokens than that, EOS
        (unless ``ignore_eos``) and its ``stop_token_ids`` cannot be sampled."""
        if not any(p.min_tokens for p in params):
            return None
        eos = self._stop.eos_token_ids
        out: list[frozenset[int]] = []
        for seq, p in zip(seqs, params):
            if p.min_tokens and seq.num_output_tokens < p.min_tokens:
                ban = set(p.stop_token_ids or ()) | (set() if p.ignore_eos else eos)
                out.append(frozenset(t for t in ban if t < vocab))
            else:
                out.append(frozenset())
        return out

    def _note_first_scheduled(self, out: SchedulerOutput, now: float) -> None:
        """Record when a request is first scheduled, and its prefix-cache hits (the tokens the
        scheduler found computed: its first chunk starts after them)."""
        seqs = self.scheduler.seqs
        for s in out.scheduled:
            rid = seqs[s.seq_id].request_id
            if rid in self._unscheduled:
                self._unscheduled.discard(rid)
                self._metrics[rid].scheduled(now)
                self._num_cached[rid] = s.start

    def _collect_prompt_logprobs(
        self, out: SchedulerOutput, batch: HostBatch, hidden: torch.Tensor
    ) -> None:
        """Append the prompt logprobs of the prompt positions this step computed (hidden
        [T, H]): position ``p`` predicts prompt token ``p + 1``. Positions recomputed after a
        preemption are skipped (their entries exist)."""
        rows: list[int] = []
        targets: list[int] = []
        wanted: list[int | None] = []
        owners: list[PromptLogprobs] = []
        detok: list[bool] = []  # decode the entries' tokens (SamplingParams.detokenize)
        cu = batch.cu_seqlens_q
        for b, s in enumerate(out.scheduled):
            seq = self.scheduler.seqs[s.seq_id]
            lps = self._prompt_logprobs.get(seq.request_id)
            if lps is None or seq.index != 0:
                continue
            prompt = seq.prompt_token_ids
            first = len(lps) - 1  # the next position without an entry
            if not s.start <= first < s.start + s.num_tokens:
                continue
            for p in range(first, min(s.start + s.num_tokens, len(prompt) - 1)):
                rows.append(int(cu[b]) + p - s.start)
                targets.append(prompt[p + 1])
                wanted.append(seq.sampling_params.prompt_logprobs)
                detok.append(seq.sampling_params.detokenize)
                owners.append(lps)
        chunk = 256  # rows of [*, V] float32 logits at a time
        for i in range(0, len(rows), chunk):
            index = torch.tensor(rows[i : i + chunk], dtype=torch.int64, device=hidden.device)
            logits = self.model.compute_logits(hidden.index_select(0, index))  # [R, V]
            ids = torch.tensor(targets[i : i + chunk], dtype=torch.int64, device=hidden.device)
            _, entries = token_logprobs(logits, ids, wanted[i : i + chunk])
            if self.tokenizer is not None:
                texts = [e for e, p in zip(entries, detok[i : i + chunk]) if p]
                decode_logprobs(texts, self.tokenizer)
            for owner, entry in zip(owners[i : i + chunk], entries):
                owner.append(entry)

    # -- overlapped ("asynchronous") scheduling ---------------------------------------------
    def _async_step(
        self, finished_only: bool, compact: bool
    ) -> tuple[float, list[RequestOutput | CompactReport]]:
        """One call of ``step()`` (``compact``: ``step_compact()``) with ``async_scheduling``,
        as one transaction: ``(token time, outputs)``.

        Without a step in flight: a step that could be overlapped (pure decode of every
        running sequence, see :meth:`_can_overlap`) is scheduled and launched and left in
        flight (the call returns nothing); any other step runs synchronously. With a step
        ``n`` in flight: if ``n + 1`` can be overlapped it is launched first, its input ids
        read from ``n``'s sampled tokens on the device, then ``n`` is processed (its tokens
        reach the host, stop checks, scheduler update, outputs) while ``n + 1`` runs; else
        ``n`` is processed alone (a drain) and the next call runs as without a flight.

        A call that raises leaves the engine as it was before the call, with the step that
        was in flight still in flight (its sampled tokens are on the device, unchanged); the
        step the call launched is forgotten (its K/V went to slots past every sequence's
        computed tokens, or to fresh blocks whose cached K/V the undo puts back).
        """
        flight = self._flight
        return self._transaction(lambda: self._async_body(flight, finished_only, compact))

    def _async_body(
        self, flight: _Flight | None, finished_only: bool, compact: bool
    ) -> tuple[float, list[RequestOutput | CompactReport]]:
        if flight is None:
            if not self._can_start_flight():
                return self._step(finished_only, compact)
            self._flight = self._start_flight()
            return time.time(), []
        plan = self._overlap_plan(flight)
        if plan is None:
            self._flight = None
            self.stats.drained += 1
            return self._finish_flight(flight, finished_only, compact, None)
        launched = self._launch_next(flight, plan)
        self._flight = None
        outputs = self._finish_flight(flight, finished_only, compact, (launched, plan))
        self._flight = launched
        return outputs

    def _can_overlap(self, seqs: list[Sequence], ahead: int) -> bool:
        """Whether a decode step of exactly ``seqs`` (the whole running queue) can run with
        its sampled tokens left on the device: nothing waiting or swapped out, no child to
        fork, no prompt logprobs, one device, and no row that needs host state to sample
        (logits processors or penalties, ``logprobs``, a ``min_tokens`` ban still active
        ``ahead`` tokens from now)."""
        sched = self.scheduler
        if (
            not seqs
            or sched.waiting
            or sched.swapped
            or self._children
            or self._prompt_logprobs
            or self.tensor_parallel is not None
            or self.kv_scales
            or len(seqs) != len(sched.running)
        ):
            return False
        for seq in seqs:
            p = seq.sampling_params
            if p.needs_history or p.logprobs is not None:
                return False
            if p.min_tokens and seq.num_output_tokens + ahead < p.min_tokens:
                return False
        return True

    def _can_start_flight(self) -> bool:
        """The next ``schedule()`` is one decode token for every running sequence (all
        pending, no preemption) and :meth:`_can_overlap` holds for them."""
        running = self.scheduler.running
        if not all(seq.pending for seq in running) or not self._can_overlap(running, 0):
            return False
        return bool(self.block_manager.can_append([seq.seq_id for seq in running]))

    def _start_flight(self) -> _Flight:
        """Schedule and launch a pure-decode step; leave its tokens on the device."""
        out = self.scheduler.schedule()
        self._saved_schedule(out)
        self.stats.record(out)
        if (
            out.preempted
            or out.swapped_out
            or out.swapped_in
            or not all(s.num_tokens == 1 and s.sample for s in out.scheduled)
        ):  # pragma: no cover - _can_start_flight rules these out
            raise RuntimeError("async_scheduling: the step to launch is not a pure decode")
        self._apply_cache_ops(out)  # copy-on-write of a forked child's first append
        seqs = [self.scheduler.seqs[s.seq_id] for s in out.scheduled]
        return self._launch(seqs, self._build_batch(out), None)

    def _overlap_plan(self, flight: _Flight) -> _Plan | None:
        """How step ``n + 1`` would run over the live rows of ``flight`` (step ``n``), or None
        when it must not be overlapped: the rows' slots for their pending tokens, as the
        block manager will give them (``peek_append``; None on copy-on-write or too few
        blocks: the synchronous step preempts)."""
        live = self.scheduler.in_flight()
        if not live:
            return None
        rows = [i for i, q in enumerate(flight.seqs) if q.seq_id in live]
        seqs = [flight.seqs[i] for i in rows]
        if len(rows) != len(live) or not self._can_overlap(seqs, 1):
            return None
        peek = getattr(self.block_manager, "peek_append", None)
        if peek is None:  # the spec's block manager: no peek
            return None
        ids = np.array([q.seq_id for q in seqs], dtype=np.int64)  # [N]
        got = peek(ids)
        if got is None:
            return None
        slots, fresh = got
        return _Plan(rows, seqs, ids, slots, fresh)

    def _launch_next(self, flight: _Flight, plan: _Plan) -> _Flight:
        """Launch step ``n + 1`` of ``plan``: one token per sequence at position
        ``num_computed`` (the token step ``n`` sampled, id still on the device), in the slot
        ``peek_append`` gave."""
        seqs, bs = plan.seqs, self.config.block_size
        n = len(seqs)
        positions = np.array([q.num_computed for q in seqs], dtype=np.int64)  # [N]
        if any(len(q.token_ids) != p for q, p in zip(seqs, positions.tolist())):
            raise RuntimeError("async_scheduling: a sequence of the step in flight has a token")
        tables = self.block_manager.gather(plan.ids)[0]  # [N, w]
        cols = positions // bs  # [N] the pending token's block
        width = max(int(tables.shape[1]), int(cols.max()) + 1)
        if width > tables.shape[1]:
            wide = np.zeros((n, width), dtype=np.int32)
            wide[:, : tables.shape[1]] = tables
            tables = wide
        tables[np.arange(n), cols] = plan.slots // bs  # fresh blocks (the others are there)
        if self.device.type == "cuda":
            padded = padded_width(width, self._max_width)
            if padded != width:
                wide = np.zeros((n, padded), dtype=np.int32)  # [N, W]
                wide[:, :width] = tables
                tables = wide
        batch = HostBatch(
            np.zeros(n, dtype=np.int64),  # the ids come from the device
            positions,
            plan.slots,
            tables,
            (positions + 1).astype(np.int32),
            np.arange(n + 1, dtype=np.int32),
            1,
            True,
            np.arange(n, dtype=np.int64),
        )
        if plan.fresh.size and self.config.enable_prefix_caching and self._undo is not None:
            # fresh blocks still in the prefix cache: the step overwrites their K/V
            cached = plan.fresh[_cached_mask(self.block_manager.live)[plan.fresh]]
            self._undo.kv = save_kv_blocks(self.kv_caches, cached, self.device)
        ids = flight.tokens
        if len(plan.rows) != int(ids.shape[0]):  # rows of finished or aborted sequences
            index = to_device(plan.rows, torch.int64, ids.device)  # [N] (no stream sync)
            ids = ids.index_select(0, index)  # [N]
        self.stats.overlapped += 1
        return self._launch(seqs, batch, ids)

    def _launch(self, seqs: list[Sequence], batch: HostBatch, ids: torch.Tensor | None) -> _Flight:
        """Run the forward and the sampling of a decode batch (``ids`` [N] on the device
        replaces ``batch.tokens``) and start the sampled tokens' copy to the host."""
        self._own_fused_ops()
        hidden = None
        if self._graphs is not None:
            hidden = self._graphs.run(batch, ids)  # [N, H] or None
        if hidden is None:
            input_ids, positions, ctx, _ = self._staging.upload(batch)
            hidden = self.model(input_ids if ids is None else ids, positions, ctx, self.kv_caches)
        logits = self.model.compute_logits(hidden)  # [N, V] float32
        gens = [self._generators.get(q.seq_id) for q in seqs] if self._generators else None
        params = [q.sampling_params for q in seqs]
        if self._undo is not None:
            self._undo.save_rng(gens, params, self.device)
        tokens, packed = self.sampler.sample_device(logits, params, gens)  # [N], [2, N]
        event = None
        if packed.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
            packed = host
        return _Flight(seqs, tokens, packed, event)

    def _finish_flight(
        self,
        flight: _Flight,
        finished_only: bool,
        compact: bool,
        launched: tuple[_Flight, _Plan] | None,
    ) -> tuple[float, list[RequestOutput | CompactReport]]:
        """Process step ``n`` (``flight``): its tokens on the host, appended, stop checks,
        outputs. With ``launched`` (step ``n + 1``, running now), the block manager takes
        ``n + 1``'s pending tokens (the ids just read: their slots are the ones ``n + 1``
        writes, checked, and full blocks are hashed into the prefix cache with the real ids)
        before ``n``'s update frees the finished sequences, whose ``n + 1`` rows are dropped;
        then the scheduler records ``n + 1`` in flight."""
        if flight.event is not None:
            flight.event.synchronize()
        packed = flight.host.tolist()  # [2, N]
        live = self.scheduler.in_flight() or {}
        rows = [i for i, q in enumerate(flight.seqs) if q.seq_id in live]
        seqs = [flight.seqs[i] for i in rows]
        tokens = [int(packed[0][i]) for i in rows]
        self._saved_sequences(seqs)
        now = time.time()
        metrics = self._metrics
        for seq, token, i in zip(seqs, tokens, rows):
            seq.token_ids.append(token)
            seq.cumulative_logprob += packed[1][i]
            metrics[seq.request_id].token(now)
        stopped = self._stop.check_all(seqs)
        self.stats.generated_tokens += len(tokens)
        if launched is not None:
            nxt, plan = launched
            if plan.rows and [q.seq_id for q in seqs] != plan.ids.tolist():
                raise RuntimeError("async_scheduling: the launched step's rows changed")
            slots, pairs = self.block_manager.append_batch(
                plan.ids, np.array(tokens, dtype=np.int64)
            )
            if pairs.shape[0] or not np.array_equal(slots, plan.slots):
                raise RuntimeError(
                    "async_scheduling: the block manager gave other slots than peek_append"
                )
        sampled = {seq.seq_id: token for seq, token in zip(seqs, tokens)}
        finished = frozenset(seq.seq_id for seq in stopped)
        self.scheduler.update(StepOutcome(sampled, finished))
        if launched is not None:
            out = self.scheduler.continue_decodes(
                [q for q in launched[0].seqs if not q.is_finished]
            )
            self.stats.record(out)
        return now, self._outputs(stopped if finished_only else seqs, finished_only, now, compact)

    @staticmethod
    def _full_outputs(outputs: list[RequestOutput | CompactReport]) -> list[RequestOutput]:
        """``outputs`` of a step built without ``compact``: every one a :class:`RequestOutput`."""
        return outputs  # type: ignore[return-value]

    # -- the step as a transaction ----------------------------------------------------------
    def _save_step(self, in_flight: bool = False) -> _StepUndo:
        """What undoing the next step needs, as far as it is known before scheduling
        (``in_flight``: a step launched by the last call is in flight, async_scheduling)."""
        self.block_manager.begin()
        tables = {name: copy.copy(getattr(self, name)) for name in _TABLES if hasattr(self, name)}
        return _StepUndo(
            checkpoint(self.scheduler, in_flight),
            dataclasses.replace(self.stats),
            tables,
            dict(self._stop._detok),
            [child for group in self._children.values() for child in group],
        )

    def _saved_schedule(self, out: SchedulerOutput) -> None:
        """After ``schedule()``: save the records of the scheduled requests, and the KV of every
        block the step will write that held someone's KV before the step."""
        undo = self._undo
        if undo is None:
            return
        # Sampling changes a request's token and finish times (_saved_sequences keeps those);
        # only its first schedule changes more of its metrics.
        unscheduled: set[str] = getattr(self, "_unscheduled", set())
        prompt_lps = getattr(self, "_prompt_logprobs", {})
        if unscheduled or prompt_lps:
            seqs = self.scheduler.seqs
            rids = {seqs[s.seq_id].request_id for s in out.scheduled}
            metrics = getattr(self, "_metrics", {})
            undo.metrics = {
                rid: vars(metrics[rid]).copy() for rid in rids & unscheduled if rid in metrics
            }
            undo.prompt_logprobs = {rid: len(prompt_lps[rid]) for rid in rids if rid in prompt_lps}
        if out.preempted or out.swapped_out:
            undo.kv = self._save_overwritten_kv(out)
        elif self.config.enable_prefix_caching:
            undo.kv = self._save_evicted_kv()
        if undo.kv is not None and self.tensor_parallel is not None:
            self.tensor_parallel.save_kv(undo.kv[0].cpu())  # each rank saves its shard

    def _save_evicted_kv(
        self,
    ) -> SavedKV | None:
        """(blocks, their K/V per layer) for the cached blocks this step's schedule evicted (a
        step without preemption writes no other block that held someone's KV: a sequence
        writes past its computed tokens, so never into a cached block it holds)."""
        bm, before = self.block_manager, self.block_manager.before()
        count = getattr(before, "num_evictions", None)
        if count is not None and count == bm.live.num_evictions:
            return None  # the numba manager counts evictions: none in this step
        evicted = np.flatnonzero(_cached_mask(before) & ~_cached_mask(bm.live))  # [E]
        return save_kv_blocks(self.kv_caches, evicted, self.device)

    def _save_overwritten_kv(self, out: SchedulerOutput) -> SavedKV | None:
        """(blocks, their K/V per layer) for the blocks this step writes that, before the
        step, held KV of another sequence or of the prefix cache: blocks of a sequence the
        step preempted, or cached blocks it evicted. A rolled-back step gives them back."""
        bm, before, bs = self.block_manager, self.block_manager.before(), self.config.block_size
        written: set[int] = {g for _, g in out.blocks_to_swap_in}
        written.update(dst for _, dst in out.blocks_to_copy)
        own: set[int] = set()
        for s in out.scheduled:
            table = bm.block_table(s.seq_id)
            written.update(table[p // bs] for p in range(s.start, s.start + s.num_tokens))
            if before.has_sequence(s.seq_id) and not before.is_swapped(s.seq_id):
                own.update(before.block_table(s.seq_id))
        cached = set(before.cached_blocks()) if self.config.enable_prefix_caching else set()
        keep = sorted(b for b in written - own if before.refcount(b) > 0 or b in cached)
        return save_kv_blocks(self.kv_caches, keep, self.device)

    def _saved_sequences(self, seqs: list[Sequence]) -> None:
        """Before the sampled tokens are recorded: the output state of every sampled sequence."""
        undo = self._undo
        if undo is None:
            return
        detok = self._stop._detok
        metrics = getattr(self, "_metrics", {})
        undo.sequences = [
            (
                seq,
                len(seq.token_ids),
                seq.cumulative_logprob,
                None if seq.logprobs is None else len(seq.logprobs),
                seq.output_text,
                seq.stop_reason,
                _detok_state(detok.get(seq.seq_id)) if detok else None,
                m,  # the request's metrics, and the times that sampling sets
                None if m is None else (m.first_token_time, m.last_token_time, m.finished_time),
            )
            for seq in seqs
            for m in [metrics.get(seq.request_id)]
        ]

    def _restore_step(self, undo: _StepUndo) -> None:
        """Put the engine back as it was before the step ``undo`` was saved for."""
        self.block_manager.rollback()
        restore(self.scheduler, undo.scheduler)
        for child in undo.children:  # unforked children: nothing computed, no blocks
            child.status, child.num_computed, child.in_pool, child.pending = (
                SequenceStatus.WAITING,
                0,
                False,
                False,
            )
        # sampled sequences: their statuses are back (running, or unforked children) above
        for seq, n, cum, n_lps, text, reason, dstate, m, times in undo.sequences:
            del seq.token_ids[n:]
            if m is not None:
                m.first_token_time, m.last_token_time, m.finished_time = times
            seq.cumulative_logprob, seq.output_text, seq.stop_reason = cum, text, reason
            if n_lps is not None and seq.logprobs is not None:
                del seq.logprobs[n_lps:]
            d = undo.detok.get(seq.seq_id)
            if dstate is not None and d is not None:
                del d.ids[dstate[0] :]
                d.read_offset, d.prefix_offset, d.text = dstate[1:]
        self._stop._detok = undo.detok
        for name, table in undo.tables.items():
            setattr(self, name, table)
        metrics = getattr(self, "_metrics", {})
        for rid, fields in undo.metrics.items():
            if rid in metrics:
                vars(metrics[rid]).update(fields)
        prompt_lps = getattr(self, "_prompt_logprobs", {})
        for rid, n in undo.prompt_logprobs.items():
            if rid in prompt_lps:
                del prompt_lps[rid][n:]
        vars(self.stats).update(vars(undo.stats))  # in place: callers may hold it
        for gen, state in undo.generators:
            gen.set_state(state)
        if undo.cpu_rng is not None:
            torch.set_rng_state(undo.cpu_rng)
        if undo.cuda_rng is not None and undo.cuda_device is not None:
            torch.cuda.set_rng_state(undo.cuda_rng, undo.cuda_device)
        if undo.kv is not None:
            restore_kv_blocks(self.kv_caches, undo.kv)
            if self.tensor_parallel is not None:
                self.tensor_parallel.restore_kv()


def _decodes_first(out: SchedulerOutput) -> SchedulerOutput:
    """``out`` with its single-token sequences first (stable): a mixed step's attention then
    runs the decode kernel on a prefix of rows (``AttentionContext.num_decodes``)."""
    sched = out.scheduled
    ones = [s for s in sched if s.num_tokens == 1]
    if not ones or len(ones) == len(sched):
        return out
    rest = [s for s in sched if s.num_tokens != 1]
    return dataclasses.replace(out, scheduled=(*ones, *rest))


def _rows_of(out: SchedulerOutput, model_out: SchedulerOutput, batch: HostBatch) -> np.ndarray:
    """[N] int64: the batch rows (the batch built from ``model_out``, the same sequences in
    another order) of the last tokens of ``out``'s sampled sequences, in ``out``'s order."""
    cu = batch.cu_seqlens_q
    last = {s.seq_id: int(cu[i + 1]) - 1 for i, s in enumerate(model_out.scheduled)}
    return np.array([last[s.seq_id] for s in out.scheduled if s.sample], dtype=np.int64)


def _start_tensor_parallel(
    loaded: LoadedModel, cfg: EngineConfig, device: torch.device, dtype: torch.dtype
) -> Any:
    """The driver of ``cfg.tensor_parallel_size`` ranks; the workers run this engine's own
    batch, uploads, KV rollback copies and CUDA warm-up/graphs (``EngineKit``)."""
    from fast.distributed.driver import TensorParallelDriver
    from fast.distributed.protocol import EngineKit

    warm, graphs = None, None
    if device.type == "cuda":
        from fast.engine.cuda_graphs import DecodeGraphs, warm_up

        warm, graphs = warm_up, DecodeGraphs
    kit = EngineKit(HostBatch, HostStaging, save_kv_blocks, restore_kv_blocks, warm, graphs)
    return TensorParallelDriver(
        loaded, cfg.tensor_parallel_size, device, dtype, kit, cfg.distributed_timeout_s
    )


#: The engine's request records a step changes (saved as shallow copies before each step).
_TABLES = (
    "_requests",
    "_generators",
    "_children",
    "_metrics",
    "_num_cached",
    "_unscheduled",
    "_prompt_logprobs",
    "_sent",
)


class _Sent(NamedTuple):
    """What the ``DELTA`` outputs of one request have reported (replaced, never mutated)."""

    prompt_token_ids: list[int]  # the request's prompt, copied once, shared by its outputs
    first: bool  # no output yet (the next carries the prompt logprobs)
    # sequence index -> (tokens, text characters, logprobs, finish) reported
    marks: dict[int, tuple[int, int, int, bool]]
    holdback: int  # characters withheld at the end of a running sequence's text


#: a ``_Sent.marks`` entry for a sequence nothing was reported of yet
_NOTHING_SENT = (0, 0, 0, False)


def _cached_mask(manager: Any) -> np.ndarray:
    """[G] bool: which device blocks are in the prefix cache (the numba manager answers from
    its arrays; the spec's from its list)."""
    fast_mask = getattr(manager, "cached_mask", None)
    if fast_mask is not None:
        mask: np.ndarray = fast_mask()
        return mask
    mask = np.zeros(manager.config.num_gpu_blocks, dtype=np.bool_)
    mask[manager.cached_blocks()] = True
    return mask


def _detok_state(detok: Any) -> tuple[int, int, int, str] | None:
    if detok is None:
        return None
    return len(detok.ids), detok.read_offset, detok.prefix_offset, detok.text


@dataclass(frozen=True)
class _Flight:
    """A decode step launched by ``async_scheduling`` whose tokens the host has not read."""

    seqs: list[Sequence]  # [N] its rows' sequences, in scheduled order
    tokens: torch.Tensor  # [N] int64 on the device: the next step's input ids
    host: torch.Tensor  # [2, N] float64 (ids, raw log-probs): pinned on CUDA, copy in flight
    event: Any  # torch.cuda.Event recorded after the copy (None on the CPU)


@dataclass(frozen=True)
class _Plan:
    """Step ``n + 1`` over the live rows of step ``n`` in flight (``_overlap_plan``)."""

    rows: list[int]  # [N'] rows of step n that continue (not aborted)
    seqs: list[Sequence]  # [N'] their sequences
    ids: np.ndarray  # [N'] int64 sequence ids
    slots: np.ndarray  # [N'] int64 the pending tokens' slots (peek_append)
    fresh: np.ndarray  # [K] int64 free blocks the appends take, queue order


@dataclass
class _StepUndo:
    """What :meth:`LLMEngine._restore_step` needs, filled in as the step goes."""

    scheduler: SchedulerCheckpoint
    stats: EngineStats
    tables: dict[str, Any]  # attribute name -> shallow copy
    detok: dict[int, Any]  # the stop checker's detokenizers by sequence id
    children: list[Sequence]  # unforked children before the step
    metrics: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    prompt_logprobs: dict[str, int] = dataclasses.field(default_factory=dict)
    kv: SavedKV | None = None
    sequences: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)
    generators: list[tuple[torch.Generator, torch.Tensor]] = dataclasses.field(default_factory=list)
    cpu_rng: torch.Tensor | None = None
    cuda_rng: torch.Tensor | None = None

    cuda_device: torch.device | None = None

    def save_rng(
        self,
        gens: Seq[torch.Generator | None] | None,
        params: Seq[Any],
        device: torch.device,
    ) -> None:
        """Before sampling: the state of every generator the sampler may draw from (a row's
        own, or the device's default one for unseeded random rows)."""
        if not gens:  # no seeded row: only the default generator can be drawn from
            self.generators = []
            unseeded_random = not all(p.is_greedy for p in params)
        else:
            rows = [(g, not p.is_greedy) for g, p in zip(gens, params)]
            self.generators = [(g, g.get_state()) for g, r in rows if g is not None and r]
            unseeded_random = any(r and g is None for g, r in rows)
        if unseeded_random:
            if device.type == "cuda":
                self.cuda_rng, self.cuda_device = torch.cuda.get_rng_state(device), device
            else:
                self.cpu_rng = torch.get_rng_state()
