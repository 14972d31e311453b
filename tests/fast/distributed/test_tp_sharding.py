"""Sharding without processes: the plan's KV-head rule, refused sizes, and every model weight
reassembled from its shards equal to the original (copies of a replicated KV head agree)."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
from tp_models import ENGINE, tiny

from fast.api.llm import LLM
from fast.distributed.errors import InvalidTensorParallelSizeError, UnshardableWeightError
from fast.distributed.sharding import plan_sharding, reassemble_parameter, shard_parameter
from fast.engine.config import EngineConfig
from spec.errors import InvalidArgumentError

CASES = [  # (heads, kv_heads, tp, local KV heads per rank)
    (4, 4, 2, 2),  # MHA: split
    (4, 2, 2, 1),  # GQA, tp divides Hkv: split
    (8, 2, 4, 1),  # GQA, Hkv divides tp: each head on two ranks
    (4, 1, 2, 1),  # MQA: the head on every rank
    (6, 3, 2, 3),  # neither divides: copies for a uniform group on each rank
    (6, 3, 3, 1),
]


@pytest.mark.parametrize(("heads", "kv_heads", "tp", "local_kv"), CASES)
def test_shards_reassemble_to_the_model(heads: int, kv_heads: int, tp: int, local_kv: int) -> None:
    loaded = tiny(heads, kv_heads, seed=1, bias=True, qk_norm=True)
    config, model = loaded.config, loaded.model
    plan = plan_sharding(config, tp)
    assert plan.kv_heads_per_rank == local_kv
    assert sorted({h for rank in plan.kv_heads for h in rank}) == list(range(kv_heads))
    for r in range(tp):  # local query head j reads local KV head j // (q / local_kv) ...
        g_local = plan.heads_per_rank // local_kv
        for j in range(plan.heads_per_rank):  # ... which is the model's KV head of query r q + j
            model_head = (r * plan.heads_per_rank + j) // (heads // kv_heads)
            assert plan.kv_heads[r][j // g_local] == model_head
    for name, full in model.named_parameters():
        shards = [shard_parameter(plan, config, r, name, full.detach()) for r in range(tp)]
        local = [dict(empty.named_parameters())[name] for empty in _local_models(config, plan)]
        assert [s.shape for s in shards] == [p.shape for p in local], name
        assert torch.equal(reassemble_parameter(plan, config, name, shards), full), name


def _local_models(config, plan):  # type: ignore[no-untyped-def]
    from fast.loader.weights import empty_model

    return [
        empty_model(plan.local_config(config, r), torch.float32, "meta")
        for r in range(plan.tp_size)
    ]


def test_a_corrupted_kv_copy_or_padding_is_detected() -> None:
    loaded = tiny(6, 3, seed=2)
    config, plan = loaded.config, plan_sharding(loaded.config, 2)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    full = dict(loaded.model.named_parameters())[name].detach()
    shards = [shard_parameter(plan, config, r, name, full) for r in range(2)]
    shards[1][plan.heads_per_rank * config.head_dim] += 1.0  # rank 1's copy of KV head 1
    with pytest.raises(ValueError, match="differs"):
        reassemble_parameter(plan, config, name, shards)
    vocab = [
        shard_parameter(plan, config, r, "lm_head.weight", loaded.model.lm_head.weight)
        for r in range(2)
    ]  # type: ignore[union-attr]
    vocab[1][-1, 0] = 1.0  # the padding row past the vocabulary
    with pytest.raises(ValueError, match="padding"):
        reassemble_parameter(plan, config, "lm_head.weight", vocab)


@pytest.mark.parametrize("size", [0, -2, True, 2.0, "2", None])
def test_a_size_that_is_not_a_positive_int_is_refused(size: object) -> None:
    with pytest.raises(InvalidTensorParallelSizeError) as info:
        EngineConfig(tensor_parallel_size=size)  # type: ignore[arg-type]
    assert info.value.value == size and info.value.name == "tensor_parallel_size"


def test_a_size_the_heads_do_not_allow_is_refused_before_any_process_starts() -> None:
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(InvalidTensorParallelSizeError, match="must divide the model's 4") as info:
        LLM(tiny(4, 2, seed=0), num_gpu_blocks=16, tensor_parallel_size=3, **ENGINE)
    assert info.value.value == 3
    with pytest.raises(InvalidTensorParallelSizeError, match="8"):
        plan_sharding(tiny(4, 2, seed=0).config, 8)
    assert {p.pid for p in multiprocessing.active_children()} <= before


def test_settings_tensor_parallelism_cannot_honour_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="kv_cache_dtype"):
        EngineConfig(tensor_parallel_size=2, kv_cache_dtype="fp8")
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(InvalidArgumentError, match="distributed_timeout_s"):
            EngineConfig(distributed_timeout_s=bad)


def test_a_parameter_without_a_rule_is_an_error() -> None:
    loaded = tiny(4, 2, seed=0)
    plan = plan_sharding(loaded.config, 2)
    with pytest.raises(UnshardableWeightError) as info:
        shard_parameter(plan, loaded.config, 0, "model.layers.0.mlp.experts.weight", torch.ones(2))
    assert info.value.name == "model.layers.0.mlp.experts.weight"


def test_the_command_line_takes_the_size() -> None:
    from fast.api.cli import SERVE_ENGINE_OPTIONS, build_parser

    parser = build_parser()
    assert parser.parse_args(["generate", "hi"]).tensor_parallel_size == 1
    args = parser.parse_args(["generate", "hi", "--tensor-parallel-size", "2"])
    assert args.tensor_parallel_size == 2
    serve = parser.parse_args(["serve", "--tensor-parallel-size", "4"])
    assert serve.tensor_parallel_size == 4 and "tensor_parallel_size" in SERVE_ENGINE_OPTIONS
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "hi", "--tensor-parallel-size", "0"])


def test_a_misspelled_size_is_an_error_naming_the_real_one() -> None:
    from fast.api.errors import UnknownArgumentError

    with pytest.raises(UnknownArgumentError, match="did you mean tensor_parallel_size"):
        LLM(tiny(4, 2, seed=0), tensor_paralel_size=2, num_gpu_blocks=16, **ENGINE)
