"""The engine's step batch: numpy flattening, packed uploads, graph inputs, kernel warm-up.

The CUDA-only parts (pinned buffers, graph replay) run on the GPU in test_engine_gpu.py and
benchmarks/gpu_engine.py; here their host logic runs on the CPU: the packing of several arrays
into one buffer, the padding of graph inputs, and the warm-up forwards.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from fast.engine.batch import HostBatch, HostStaging, padded_width
from fast.engine.cuda_graphs import GraphInputs, warm_up
from fast.engine.engine import LLMEngine
from fast.engine.sampling_params import SamplingParams
from fast.loader import random_model
from fast.model.config import ModelConfig
from spec.scheduler import SchedulerOutput

CFG = ModelConfig(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)


def _engine(**kw: Any) -> LLMEngine:
    model = random_model(CFG, seed=0, dtype=torch.float32, device="cpu")
    return LLMEngine(
        model,
        device="cpu",
        dtype="float32",
        block_size=8,
        num_gpu_blocks=64,
        max_model_len=128,
        max_num_seqs=8,
        **kw,
    )


def _batch(b: int, w: int, seed: int = 0) -> HostBatch:
    rng = np.random.default_rng(seed)
    return HostBatch(
        tokens=rng.integers(0, 96, b),
        positions=rng.integers(0, 50, b),
        slots=rng.integers(0, 500, b),
        tables=rng.integers(0, 60, (b, w)).astype(np.int32),
        seq_lens=rng.integers(1, 50, b).astype(np.int32),
        cu_seqlens_q=np.arange(b + 1, dtype=np.int32),
        max_seqlen_q=1,
        decode=True,
        sample_rows=np.arange(b),
    )


def test_padded_width_is_a_bounded_power_of_two() -> None:
    for top in (10, 16, 100, 128, 8192):
        for w in range(1, top + 1):
            p = padded_width(w, top)
            assert w <= p <= max(w, top)
            assert p == top or (p >= 16 and p & (p - 1) == 0), (w, top, p)
    assert len({padded_width(w, 128) for w in range(1, 129)}) == 4  # 16, 32, 64, 128


def test_packed_upload_returns_the_arrays() -> None:
    staging = HostStaging(torch.device("cpu"), pack=True)
    for b, w in ((3, 5), (7, 2), (1, 9)):
        batch = _batch(b, w, seed=b)
        ids, pos, ctx, rows = staging.upload(batch)
        assert ids.tolist() == batch.tokens.tolist()
        assert pos.tolist() == batch.positions.tolist()
        assert ctx.slot_mapping.tolist() == batch.slots.tolist()
        assert ctx.block_tables.tolist() == batch.tables.tolist()
        assert ctx.block_tables.dtype == torch.int32 and ctx.seq_lens.dtype == torch.int32
        assert ctx.seq_lens.tolist() == batch.seq_lens.tolist()
        assert ctx.cu_seqlens_q.tolist() == batch.cu_seqlens_q.tolist()
        assert rows.tolist() == batch.sample_rows.tolist() and ctx.is_decode
        # every array 16-byte aligned, whatever the shapes (Triton specializes on alignment)
        tensors = [ids, pos, rows, ctx.slot_mapping, ctx.block_tables, ctx.seq_lens]
        assert all(t.data_ptr() % 16 == 0 for t in [*tensors, ctx.cu_seqlens_q])


def test_graph_inputs_pad_rows_past_the_batch() -> None:
    inputs = GraphInputs(8, 6, torch.device("cpu"))
    inputs.write(_batch(8, 6, seed=1), 8)  # a full batch first: padding must overwrite it
    inputs.upload()
    batch = _batch(3, 4, seed=2)
    inputs.write(batch, 4)
    inputs.upload()
    ids, pos, slots = inputs.dev64
    assert ids[:3].tolist() == batch.tokens.tolist() and ids[3] == 0
    assert pos[:3].tolist() == batch.positions.tolist() and pos[3] == 0
    assert slots[:3].tolist() == batch.slots.tolist() and slots[3] == -1  # no KV write
    assert inputs.tables[:3, :4].tolist() == batch.tables.tolist()
    assert inputs.lens[:3].tolist() == batch.seq_lens.tolist() and inputs.lens[3] == 0
    ctx = inputs.ctx(4)
    assert ctx.block_tables.shape == (4, 6) and ctx.cu_seqlens_q.tolist() == [0, 1, 2, 3, 4]


def test_warm_up_writes_nothing_to_the_cache() -> None:
    engine = _engine()
    engine._max_width = 16
    before = [(k.clone(), v.clone()) for k, v in engine.kv_caches]
    warm_up(engine.model, engine.kv_caches, engine.device, engine._max_width, [1, 2, 8])
    for (k, v), (k0, v0) in zip(engine.kv_caches, before):
        assert torch.equal(k, k0) and torch.equal(v, v0)


def test_warm_up_meets_every_prefill_search_depth() -> None:
    """Warm-up prefills a batch for each compile-time search depth up to max_num_seqs."""
    from kernels.triton_prefill import search_steps

    engine = _engine()
    prefill_batches: list[int] = []

    def spy(ids: torch.Tensor, pos: torch.Tensor, ctx: Any, caches: Any) -> torch.Tensor:
        if not ctx.is_decode:
            prefill_batches.append(int(ctx.block_tables.shape[0]))
            assert ctx.cu_seqlens_q[-1] == ids.shape[0] == pos.shape[0]
        out: torch.Tensor = engine.model(ids, pos, ctx, caches)
        return out

    warm_up(spy, engine.kv_caches, engine.device, 16, [1], max_num_seqs=600)  # type: ignore[arg-type]
    want = {search_steps(b) for b in range(1, 601)}
    assert len(want) == 3  # 8 (below 256), 9 and 10
    assert {search_steps(b) for b in prefill_batches} == want
    assert max(prefill_batches) == 512


@pytest.mark.parametrize("chunked", [False, True])
def test_step_batch_matches_the_block_manager(chunked: bool) -> None:
    """Every token of every step's batch sits at the block manager's slot for its position."""
    engine = _engine(enable_chunked_prefill=chunked, max_num_batched_tokens=16 if chunked else None)
    build = engine._build_batch
    kinds: list[bool] = []

    def checked(out: SchedulerOutput) -> HostBatch:
        batch = build(out)
        at = 0
        for s in out.scheduled:
            seq = engine.scheduler.seqs[s.seq_id]
            want = engine.block_manager.slot_mapping(s.seq_id, s.start, s.start + s.num_tokens)
            assert batch.slots[at : at + s.num_tokens].tolist() == want
            assert batch.positions[at : at + s.num_tokens].tolist() == list(
                range(s.start, s.start + s.num_tokens)
            )
            assert (
                batch.tokens[at : at + s.num_tokens].tolist()
                == seq.token_ids[s.start : s.start + s.num_tokens]
            )
            at += s.num_tokens
        assert at == batch.tokens.shape[0]
        assert batch.seq_lens.tolist() == [s.start + s.num_tokens for s in out.scheduled]
        assert batch.sample_rows.tolist() == [
            int(batch.cu_seqlens_q[i + 1]) - 1 for i, s in enumerate(out.scheduled) if s.sample
        ]
        kinds.append(batch.decode)
        return batch

    engine._build_batch = checked  # type: ignore[method-assign]
    for i, n in enumerate((5, 17, 9)):
        engine.add_request(
            str(i),
            list(range(1, n + 1)),
            SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
        )
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step(finished_only=True)
    assert sorted(len(o.outputs[0].token_ids) for o in outs) == [6, 6, 6]
    assert True in kinds and False in kinds
    assert engine.num_free_gpu_blocks == 64


def _mixed_batch() -> HostBatch:
    """Two single-token sequences, then a 5-token chunk and a 3-token prompt."""
    cu = np.array([0, 1, 2, 7, 10], dtype=np.int32)
    return HostBatch(
        tokens=np.arange(10),
        positions=np.array([9, 20, 3, 4, 5, 6, 7, 0, 1, 2]),
        slots=np.arange(10) + 40,
        tables=np.arange(16, dtype=np.int32).reshape(4, 4),
        seq_lens=np.array([10, 21, 8, 3], dtype=np.int32),
        cu_seqlens_q=cu,
        max_seqlen_q=5,
        decode=False,
        sample_rows=cu[1:] - 1,
    )


@pytest.mark.parametrize("pack", [False, True])
def test_split_upload_gives_the_prefill_rows_their_own_metadata(pack: bool) -> None:
    batch = _mixed_batch()
    _, _, ctx, _ = HostStaging(torch.device("cpu"), pack=pack, split=True).upload(batch)
    assert ctx.num_decodes == 2 and not ctx.is_decode
    assert ctx.prefill_seq_lens is not None and ctx.prefill_cu_seqlens_q is not None
    assert ctx.prefill_seq_lens.tolist() == [8, 3]
    assert ctx.prefill_block_tables is not None
    assert ctx.prefill_block_tables.tolist() == batch.tables[2:].tolist()
    assert ctx.prefill_cu_seqlens_q.tolist() == [0, 5, 8]
    assert ctx.seq_lens.tolist() == [10, 21, 8, 3]  # the whole batch's, unchanged
    _, _, plain, _ = HostStaging(torch.device("cpu"), pack=pack, split=False).upload(batch)
    assert plain.num_decodes == 0 and plain.prefill_seq_lens is None
    # a decode step and a step whose first sequence is a chunk are not split
    for cu in ([0, 1, 2, 3], [0, 4, 5, 6]):
        other = dataclasses.replace(_batch(3, 4), cu_seqlens_q=np.array(cu, dtype=np.int32))
        other = dataclasses.replace(other, decode=cu == [0, 1, 2, 3])
        assert HostStaging(torch.device("cpu"), split=True).upload(other)[2].num_decodes == 0


def test_decodes_first_is_a_stable_partition() -> None:
    from fast.engine.engine import _decodes_first
    from spec.scheduler import ScheduledSequence

    sched = tuple(
        ScheduledSequence(seq_id=i, start=s, num_tokens=n, sample=True)
        for i, (s, n) in enumerate([(0, 7), (9, 1), (0, 3), (4, 1), (2, 1)])
    )
    out = _decodes_first(SchedulerOutput(scheduled=sched, preempted=(5,)))
    assert [s.seq_id for s in out.scheduled] == [1, 3, 4, 0, 2]
    assert out.preempted == (5,)
    same = SchedulerOutput(scheduled=sched[1:2] + sched[3:])  # all single tokens
    assert _decodes_first(same) is same


def test_split_mixed_steps_generate_the_unsplit_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU with the split forced on: steps that mix decodes and prompt chunks put their
    single-token sequences first (1-token prompts behind a running chunk are moved), run the
    decode path on those rows, and give the unsplit engine's tokens, forks (n = 2) and prompt
    logprobs, sampled in the scheduler's order."""
    import fast.engine.engine as engine_module

    real = engine_module._decodes_first
    moved: list[int] = []

    def counting(out: SchedulerOutput) -> SchedulerOutput:
        got = real(out)
        moved.append(int(got is not out and got.scheduled != out.scheduled))
        return got

    monkeypatch.setattr(engine_module, "_decodes_first", counting)
    results = []
    for split in (False, True):
        engine = _engine(max_num_batched_tokens=16)
        engine._staging = HostStaging(torch.device("cpu"), split=split)
        seen: list[int] = []
        upload = engine._staging.upload

        def counted(batch: HostBatch, _upload: Any = upload, _seen: list[int] = seen) -> Any:
            got = _upload(batch)
            _seen.append(got[2].num_decodes)
            return got

        engine._staging.upload = counted  # type: ignore[method-assign]
        outs = []
        arrivals = [(30, {}), (1, {}), (5, {"n": 2, "temperature": 1.0, "seed": 7}), (1, {})]
        arrivals += [(23, {"prompt_logprobs": 1}), (9, {})]
        for i, (n, extra) in enumerate(arrivals):  # one arrival per step
            params = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True, **extra}
            engine.add_request(
                str(i), [(7 * i + j) % 90 + 1 for j in range(n)], SamplingParams(**params)
            )
            outs += engine.step(finished_only=True)
        while engine.has_unfinished_requests():
            outs += engine.step(finished_only=True)
        assert engine.num_free_gpu_blocks == 64
        assert (max(seen) > 0) == split
        results.append(
            {
                o.request_id: (
                    [c.token_ids for c in o.outputs],
                    [sorted(e) if e else e for e in (o.prompt_logprobs or [])],
                )
                for o in outs
            }
        )
    assert sum(moved) > 0  # some step had a single-token sequence behind a chunk
    assert results[0] == results[1]
