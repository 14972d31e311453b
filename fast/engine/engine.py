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

import itertools
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import kernels
from fast.engine.batch import HostBatch, HostStaging, padded_width
from fast.engine.config import EngineConfig, pool_sizes, resolve_device, resolve_dtype
from fast.engine.outputs import CompletionOutput, RequestOutput
from fast.engine.sampler import Sampler
from fast.engine.sampling_params import SamplingParams
from fast.engine.scheduler import Scheduler
from fast.engine.sequence import Sequence, SequenceStatus
from fast.engine.stop import StopChecker
from fast.loader import LoadedModel, load_model
from fast.model.llama import allocate_kv_caches
from spec.errors import InvalidArgumentError
from spec.scheduler import SchedulerConfig, SchedulerOutput, StepOutcome

__all__ = ["LLMEngine", "EngineStats", "PromptType"]

#: A prompt: text, token ids, or ``{"prompt_token_ids": [...]}`` / ``{"prompt": "..."}``.
PromptType = str | Seq[int] | Mapping[str, Any]


def _block_manager(config: Any) -> Any:
    """The numba block manager when it is importable, else the spec's (same API)."""
    try:
        from fast.blocks.manager import BlockManager
    except ImportError:  # pragma: no cover - fast.blocks.manager is part of the package
        from spec.block_manager import BlockManager  # type: ignore[assignment]
    return BlockManager(config)


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
        torch.manual_seed(cfg.seed)
        loaded = (
            model
            if isinstance(model, LoadedModel)
            else load_model(model, dtype=self.dtype, device=self.device)
        )
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
        budget = cfg.max_num_batched_tokens or (
            2048 if cfg.enable_chunked_prefill else max(max_len, 2048)
        )
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=max_len,
            enable_chunked_prefill=cfg.enable_chunked_prefill,
            preemption_mode=cfg.preemption_mode,
        )
        self.num_gpu_blocks, self.num_cpu_blocks = pool_sizes(
            cfg, self.model_config, self.dtype, self.device, max_len
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
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        self.kv_caches = allocate_kv_caches(
            self.model_config, self.num_gpu_blocks, cfg.block_size, self.dtype, self.device
        )
        self.cpu_caches = (
            allocate_kv_caches(
                self.model_config, self.num_cpu_blocks, cfg.block_size, self.dtype, "cpu"
            )
            if self.num_cpu_blocks
            else []
        )
        self.sampler = Sampler()
        self._stop = StopChecker(self.tokenizer, self.model_config, max_len)
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self._requests: dict[str, list[Sequence]] = {}  # request id -> its n sequences
        self._generators: dict[int, torch.Generator] = {}
        self._children: dict[int, list[Sequence]] = {}  # parent seq id -> its unforked n - 1
        self.stats = EngineStats()
        self._max_width = -(-max_len // cfg.block_size)  # blocks of the longest sequence
        self._staging = HostStaging(self.device)
        self._graphs: Any = None
        if self.device.type == "cuda":
            from fast.engine.cuda_graphs import DecodeGraphs, warm_up

            limit = cfg.max_num_seqs
            sizes = sorted(
                {b for b in cfg.cuda_graph_batch_sizes if b <= limit}
                | {min(limit, max(cfg.cuda_graph_batch_sizes))}
            )
            warm_up(self.model, self.kv_caches, self.device, self._max_width, sizes)
            if not cfg.enforce_eager:
                self._graphs = DecodeGraphs(
                    self.model, self.kv_caches, self.device, self._max_width, sizes
                )

    # -- requests -------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams | None = None
    ) -> None:
        """Validate and queue one request; raises before anything is scheduled."""
        params = params if params is not None else SamplingParams()
        if request_id in self._requests:
            raise InvalidArgumentError("request_id", request_id, "already in use")
        text, ids = self._tokenize(prompt)
        if not ids:
            raise InvalidArgumentError("prompt", prompt, "empty prompt")
        if len(ids) > self.max_model_len:
            raise InvalidArgumentError(
                "len(prompt_token_ids)", len(ids), f"longer than max_model_len {self.max_model_len}"
            )
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidArgumentError("prompt_token_ids", bad[:5], f"outside [0, {vocab})")
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

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its blocks go back to the pool. Unknown ids are ignored."""
        for seq in self._requests.pop(request_id, []):
            self._children.pop(seq.seq_id, None)
            if seq.seq_id in self.scheduler.seqs:
                self.scheduler.abort_request(seq.seq_id)
            elif not seq.is_finished:  # a child not forked yet: holds no blocks
                seq.status = SequenceStatus.FINISHED_ABORTED
            self._stop.finish(seq)
            self._generators.pop(seq.seq_id, None)

    def has_unfinished_requests(self) -> bool:
        """Some request is waiting, running or swapped."""
        return self.scheduler.has_unfinished_requests()

    @property
    def num_free_gpu_blocks(self) -> int:
        """Free device blocks (cached prefix blocks with no user count as free)."""
        return int(self.block_manager.num_free_gpu_blocks)

    # -- the step -------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one step; return the requests that produced a token (finished ones included).

        ``finished_only`` returns only the requests that finished in this step (what batch
        generation needs; it saves building an output per running request per step).
        """
        out = self.scheduler.schedule()
        self.stats.record(out)
        self._apply_cache_ops(out)
        sampled: dict[int, int] = {}
        finished: set[int] = set()
        touched: list[Sequence] = []
        if out.scheduled:
            seqs, tokens, logprobs, forks = self._run_model(out)
            check = self._stop.check
            children = {child.seq_id for _, child in forks}
            for seq, token, lp in zip(seqs, tokens, logprobs):
                if lp is None:
                    seq.token_ids.append(token)
                else:
                    self._record(seq, token, lp)
                stopped = check(seq)
                if seq.seq_id in children:  # not scheduled: the scheduler learns by fork
                    continue
                sampled[seq.seq_id] = token
                if stopped:
                    finished.add(seq.seq_id)
            for parent, child in forks:  # before update() may free the parent
                if not child.is_finished:
                    self._fork(parent, child)
            self.stats.generated_tokens += len(tokens)
            touched = [s for s in seqs if s.is_finished] if finished_only else seqs
        elif self.scheduler.has_unfinished_requests() and not self.scheduler.running:
            raise RuntimeError(
                "the scheduler made no progress with requests waiting: "
                f"{self.num_free_gpu_blocks} free blocks"
            )
        self.scheduler.update(StepOutcome(sampled, frozenset(finished)))
        outputs = []
        # With finished_only, only a request with a sequence finishing now can be done now.
        for request_id in dict.fromkeys(seq.request_id for seq in touched):
            group = self._requests[request_id]
            done = all(seq.is_finished for seq in group)
            if done:
                del self._requests[request_id]
                for seq in group:
                    self._generators.pop(seq.seq_id, None)
                    self._stop.finish(seq)
            if done or not finished_only:
                outputs.append(self.request_output(group))
        return outputs

    def request_output(self, group: list[Sequence]) -> RequestOutput:
        """The current :class:`RequestOutput` of a request (its sequences, in index order)."""
        completions = [
            CompletionOutput(
                index=seq.index,
                text=seq.output_text,
                token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for seq in group
        ]
        first = group[0]
        return RequestOutput(
            first.request_id,
            first.prompt,
            list(first.prompt_token_ids),
            completions,
            all(seq.is_finished for seq in group),
        )

    # -- internals ------------------------------------------------------------------------
    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return self._tokenize(str(prompt["prompt"]))
            raise InvalidArgumentError(
                "prompt", dict(prompt), "needs 'prompt' or 'prompt_token_ids'"
            )
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidArgumentError(
                    "prompt", prompt, "text needs a tokenizer; this model has none"
                )
            return prompt, self.tokenizer.encode(prompt)
        return None, [int(t) for t in prompt]

    def _apply_cache_ops(self, out: SchedulerOutput) -> None:
        # Order: swap out (frees device blocks), swap in, then copy-on-write copies.
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
        ids = np.fromiter((s.seq_id for s in sched), np.int64, n)  # [B]
        starts = np.fromiter((s.start for s in sched), np.int64, n)  # [B]
        nums = np.fromiter((s.num_tokens for s in sched), np.int64, n)  # [B]
        cu = np.zeros(n + 1, dtype=np.int64)  # [B + 1]
        np.cumsum(nums, out=cu[1:])
        total = int(cu[-1])
        decode = total == n  # one new token per sequence
        if decode:
            tokens = np.fromiter(
                (seqs[s.seq_id].token_ids[s.start] for s in sched), np.int64, n
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
        sample = np.fromiter((s.sample for s in sched), np.bool_, n)  # [B]
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

    def _run_model(
        self, out: SchedulerOutput
    ) -> tuple[
        list[Sequence], list[int], list[dict[int, float] | None], list[tuple[Sequence, Sequence]]
    ]:
        """Run the model on the step's batch; (sampled sequences, their tokens, logprobs, the
        (parent, child) pairs to fork: the children's first tokens are among those sampled)."""
        batch = self._build_batch(out)
        hidden = None
        rows: torch.Tensor | None = None
        if self._graphs is not None and batch.decode:
            hidden = self._graphs.run(batch)  # [T, H] or None
        if hidden is None:
            input_ids, positions, ctx, rows = self._staging.upload(batch)
            hidden = self.model(input_ids, positions, ctx, self.kv_caches)  # [T, H]
        num_rows = int(batch.sample_rows.shape[0])
        if not num_rows:
            return [], [], [], []
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
        tokens, logprobs = self.sampler.sample(logits, [q.sampling_params for q in seqs], gens)
        return seqs, tokens, logprobs, forks

    def _record(self, seq: Sequence, token: int, lp: dict[int, float] | None) -> None:
        logprob = None if lp is None else lp.get(token)
        seq.append_token(token, logprob)
        if seq.logprobs is not None and lp is not None:
            seq.logprobs.append(lp)
