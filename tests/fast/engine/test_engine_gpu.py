"""On a GPU: decode CUDA graphs give the tokens of eager mode and of transformers (float32).

The CPU twin is ``test_e2e_tiny.py`` (the CPU runs eagerly). ``benchmarks/gpu_engine.py`` ran the
same check on an H200 (``benchmarks/results/engine_gpu.json``, "correctness").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fast.api.llm import LLM
from fast.engine.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_greedy_on_gpu_equals_transformers(tmp_path: Path, enforce_eager: bool) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    hf = hf.cuda()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 17, 33, 70, 3)]
    ref = []
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p], device="cuda")
            out = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=24,
                min_new_tokens=24,
                eos_token_id=None,
                pad_token_id=None,
            )
            ref.append(out[0, len(p) :].tolist())
    llm = LLM(
        str(tmp_path),
        dtype="float32",
        device="cuda",
        num_gpu_blocks=64,
        block_size=16,
        max_model_len=256,
        max_num_seqs=8,
        enforce_eager=enforce_eager,
    )
    assert (llm.llm_engine._graphs is None) == enforce_eager
    assert (llm.llm_engine._mixed is None) == enforce_eager
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        use_tqdm=False,
    )
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert llm.llm_engine.num_free_gpu_blocks == 64


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, max_len",
    # 400 tokens: tables 25 blocks wide, so a mixed step's prefill rows start at an offset of
    # 100n bytes into the batch's tables (they are uploaded on their own, 16-byte aligned)
    [("float32", 512), ("bfloat16", 512), ("bfloat16", 400)],
)
def test_no_triton_compilation_after_warm_up(dtype: str, max_len: int) -> None:
    """Warm-up compiles every kernel variant: a mixed run afterwards compiles nothing.

    The run meets what a trace meets: prompts of many lengths (1 to 300 tokens, so odd and
    multiple-of-16 token counts), prefix-cache hits on shared prompts, chunked prefill of a prompt
    longer than the token budget, decode batches of every size up to max_num_seqs, n = 2.
    """
    from fast.engine.compile_watch import CompileWatch
    from fast.loader import random_model
    from fast.model.config import ModelConfig

    cfg = ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
    )
    model = random_model(cfg, seed=0, dtype=getattr(torch, dtype), device="cuda")
    llm = LLM(
        model,
        device="cuda",
        num_gpu_blocks=256,
        block_size=16,
        max_model_len=max_len,
        max_num_seqs=16,
        max_num_batched_tokens=128,
    )
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 512, (48,), generator=g).tolist()
    lengths = [1, 2, 7, 15, 16, 17, 31, 32, 33, 64, 100, 129, 300]
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]
    prompts += [shared + torch.randint(0, 512, (n,), generator=g).tolist() for n in (1, 16, 40)]
    with CompileWatch() as watch:
        llm.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
        llm.generate(prompts[:3], SamplingParams(max_tokens=5, n=2, temperature=1.0, seed=1))
    assert watch.count == 0, watch.kernels


def _small_model(**fields: Any) -> Any:
    """A 3-layer random float32 Llama on the GPU (``fields`` override its config)."""
    from fast.loader import random_model
    from fast.model.config import ModelConfig

    cfg = ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        **fields,
    )
    return random_model(cfg, seed=0, dtype=torch.float32, device="cuda")


@pytest.mark.gpu
def test_mixed_steps_from_piecewise_graphs_equal_eager_mixed_steps() -> None:
    """Steps that mix decodes with prompt chunks, replayed from the piecewise graphs (decode
    kernel on the leading rows, prefill kernel on the rest), give the eager engine's tokens
    (float32: the graphs' matmuls run on the padded token count, which in bf16 may round
    differently from the eager run's)."""
    model = _small_model()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (9, 150, 40, 301, 7, 90)]
    results = []
    for sizes in ((16, 32, 64), ()):  # several sizes in one pool, t == S among the steps
        llm = LLM(
            model,
            device="cuda",
            num_gpu_blocks=256,
            block_size=16,
            max_model_len=512,
            max_num_seqs=8,
            max_num_batched_tokens=64,
            cuda_graph_token_sizes=sizes,
        )
        engine = llm.llm_engine
        assert (engine._mixed is None) == (sizes == ())
        outs = []
        for i, p in enumerate(prompts):  # one arrival per step: decodes meet prompt chunks
            engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=12))
            outs += engine.step(finished_only=True)
        while engine.has_unfinished_requests():
            outs += engine.step(finished_only=True)
        assert engine.num_free_gpu_blocks == 256
        if engine._mixed is not None:
            assert engine._mixed.replays > 5
        results.append({o.request_id: o.outputs[0].token_ids for o in outs})
    assert results[0] == results[1]


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_async_scheduling_on_gpu_equals_the_synchronous_engine(enforce_eager: bool) -> None:
    """Overlapped decode steps (``async_scheduling``: the next step launched with its input ids
    read from the previous step's sampled tokens on the device, the ids copied to pinned host
    memory behind an event) give the synchronous engine's tokens on a GPU, from CUDA graphs and
    eagerly: greedy and seeded requests, EOS and lengths finishing at different steps (float32,
    so that the dropped rows of finished sequences cannot change a kept row's rounding)."""
    model = _small_model(eos_token_id=7)
    g = torch.Generator().manual_seed(9)
    lengths = [int(n) for n in torch.randint(3, 200, (24,), generator=g)]
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]
    results = []
    for flag in (False, True):
        llm = LLM(
            model,
            device="cuda",
            num_gpu_blocks=512,
            block_size=16,
            max_model_len=512,
            max_num_seqs=16,
            enforce_eager=enforce_eager,
            async_scheduling=flag,
        )
        engine = llm.llm_engine
        for i, p in enumerate(prompts):
            params = SamplingParams(
                temperature=0.0 if i % 2 else 0.9,
                seed=None if i % 2 else 100 + i,
                max_tokens=8 + 3 * i,
                ignore_eos=i % 3 == 0,
            )
            engine.add_request(str(i), p, params)
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step(finished_only=True)
        assert engine.num_free_gpu_blocks == 512
        if flag:
            assert engine.stats.overlapped > 20, engine.stats
        results.append(
            {o.request_id: (o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs}
        )
    assert results[0] == results[1]
