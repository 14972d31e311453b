"""On a GPU: decode CUDA graphs give the tokens of eager mode and of transformers (float32).

The CPU twin is ``test_e2e_tiny.py`` (the CPU runs eagerly). ``benchmarks/gpu_engine.py`` ran the
same check on an H200 (``benchmarks/results/engine_gpu.json``, "correctness").
"""

from __future__ import annotations

from pathlib import Path

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
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        use_tqdm=False,
    )
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert llm.llm_engine.num_free_gpu_blocks == 64
