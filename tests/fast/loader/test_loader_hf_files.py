"""The files around a Hugging Face checkpoint: shard index, generation_config.json, hub cache.

One tiny random Llama is saved by transformers in shards; pagedkv must load it as transformers
does, refuse an index that does not match the files (naming what is wrong), take its sampling
defaults and end tokens from ``generation_config.json`` as vLLM does, and find it by id in a
local Hugging Face cache without the network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from offline import no_network  # noqa: F401 - a fixture

from fast import LLM, SamplingParams
from fast.loader import ModelNotFoundError, load_model
from fast.loader.generation_config import GenerationConfigError
from fast.loader.hf_files import INDEX_FILE, ShardedCheckpointError

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 42, 9, 33], [70, 2, 11]]
ENGINE = {"num_gpu_blocks": 32, "block_size": 4, "device": "cpu"}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """(a directory of 3+ safetensors shards and an index, the transformers model)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("hf") / "sharded"
    model.save_pretrained(path, max_shard_size="60KB")
    return path, model


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def greedy(llm: LLM, params: SamplingParams | None = None) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


# --- sharded safetensors -------------------------------------------------------------------


def test_sharded_checkpoint_loads_as_transformers(sharded: tuple[Path, Any]) -> None:
    path, ref = sharded
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    index = json.loads((path / INDEX_FILE).read_text())
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == shards
    lm = load_model(str(path))
    ids = torch.tensor(PROMPTS[0])
    from fast.model import allocate_kv_caches
    from fast.model.attention_context import AttentionContext

    with torch.no_grad():
        want = ref(ids[None]).logits[0]
        caches = allocate_kv_caches(lm.config, 4, 4, torch.float32, "cpu")
        ctx = AttentionContext.build([[0, 1]], [0], [len(ids)], 4)
        got = lm.model.compute_logits(lm.model(ids, torch.arange(len(ids)), ctx, caches))
    assert (got - want).abs().max().item() < 1e-4


def test_missing_shard_is_named(sharded: tuple[Path, Any], tmp_path: Path) -> None:
    path = copy_of(sharded[0], tmp_path / "m")
    gone = sorted(path.glob("*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(ShardedCheckpointError, match="shard files missing") as e:
        load_model(str(path))
    assert e.value.names == [gone.name] and str(path / INDEX_FILE) in str(e.value)


def test_weight_in_no_shard_is_named(sharded: tuple[Path, Any], tmp_path: Path) -> None:
    path = copy_of(sharded[0], tmp_path / "u")
    index = json.loads((path / INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ShardedCheckpointError, match="1 weights of the model are in no shard"):
        load_model(str(path))
    try:
        load_model(str(path))
    except ShardedCheckpointError as err:
        assert err.names == ["model.layers.1.mlp.down_proj.weight"]


def test_tensor_not_in_its_shard_is_named(sharded: tuple[Path, Any], tmp_path: Path) -> None:
    path = copy_of(sharded[0], tmp_path / "w")
    index = json.loads((path / INDEX_FILE).read_text())
    wmap = index["weight_map"]
    name = "model.norm.weight"
    other = next(s for s in sorted(set(wmap.values())) if s != wmap[name])
    wmap[name] = other
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ShardedCheckpointError, match=f"places in {other} are not in it") as e:
        load_model(str(path))
    assert e.value.names == [name]


def test_malformed_index_is_named(sharded: tuple[Path, Any], tmp_path: Path) -> None:
    path = copy_of(sharded[0], tmp_path / "j")
    (path / INDEX_FILE).write_text('{"metadata": {}}')
    with pytest.raises(ShardedCheckpointError, match="no 'weight_map'"):
        load_model(str(path))
    (path / INDEX_FILE).write_text("{")
    with pytest.raises(ShardedCheckpointError, match="not valid JSON"):
        load_model(str(path))


# --- generation_config.json ----------------------------------------------------------------


def with_generation_config(src: Path, dst: Path, values: dict[str, Any]) -> Path:
    path = copy_of(src, dst)
    (path / "generation_config.json").write_text(json.dumps(values))
    return path


def test_sampling_defaults_come_from_the_file(sharded: tuple[Path, Any], tmp_path: Path) -> None:
    fields = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05}
    fields |= {"repetition_penalty": 1.1, "max_new_tokens": 3, "do_sample": True}
    path = with_generation_config(sharded[0], tmp_path / "g", {"eos_token_id": 2, **fields})
    llm = LLM(str(path), **ENGINE)
    d = llm.get_default_sampling_params()
    assert (d.temperature, d.top_p, d.top_k, d.min_p) == (0.6, 0.9, 20, 0.05)
    assert (d.repetition_penalty, d.max_tokens) == (1.1, 3)
    assert d.presence_penalty == 0.0 and d.n == 1  # not in the file: the library's
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)
    for o in outs:  # max_new_tokens applied, unless EOS (2) was sampled first
        got = o.outputs[0]
        assert len(got.token_ids) == 3 or (len(got.token_ids) < 3 and got.token_ids[-1] == 2)
    assert max(len(o.outputs[0].token_ids) for o in outs) == 3
    explicit = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    assert [len(t) for t in greedy(llm, explicit)] == [5, 5]  # explicit params win whole
    assert LLM(str(path), generation_config="vllm", **ENGINE).get_default_sampling_params() == (
        SamplingParams()
    )
    over = LLM(str(path), override_generation_config={"temperature": 0.0}, **ENGINE)
    assert over.get_default_sampling_params().temperature == 0.0
    assert over.get_default_sampling_params().top_k == 20
    other = with_generation_config(sharded[0], tmp_path / "o", {"top_k": 7})
    from_dir = LLM(str(path), generation_config=str(other), **ENGINE)
    assert from_dir.get_default_sampling_params() == SamplingParams(top_k=7)


def test_generation_eos_ids_stop_generation(sharded: tuple[Path, Any], tmp_path: Path) -> None:
    plain = LLM(str(sharded[0]), **ENGINE)
    free = greedy(plain, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    model_eos = plain.llm_engine.model_config.eos_token_id
    stop = next(t for t in free[0][2:] if t not in free[0][:2] and t != model_eos)
    cut = free[0].index(stop) + 1
    path = with_generation_config(sharded[0], tmp_path / "e", {"eos_token_id": [model_eos, stop]})
    for mode in ("auto", "vllm"):  # vLLM reads the end tokens in both modes
        llm = LLM(str(path), generation_config=mode, **ENGINE)
        out = llm.generate(
            [{"prompt_token_ids": PROMPTS[0]}],
            SamplingParams(temperature=0.0, max_tokens=6),
            use_tqdm=False,
        )[0].outputs[0]
        assert list(out.token_ids) == free[0][:cut] and out.finish_reason == "stop"
    greedy_all = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    assert greedy(llm, greedy_all) == free


def test_bad_generation_config_is_named(sharded: tuple[Path, Any], tmp_path: Path) -> None:
    path = with_generation_config(sharded[0], tmp_path / "b", {"top_p": 0})
    with pytest.raises(GenerationConfigError, match=r"generation_config.json: .*top_p=0"):
        LLM(str(path), **ENGINE)
    LLM(str(path), generation_config="vllm", **ENGINE)  # the sampling fields are not read
    with pytest.raises(GenerationConfigError, match="no generation_config.json in"):
        LLM(str(sharded[0]), generation_config=str(tmp_path), **ENGINE)
    (path / "generation_config.json").write_text("[1]")
    with pytest.raises(GenerationConfigError, match="not a JSON object"):
        load_model(str(path))


# --- the Hugging Face cache ----------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_layout(src: Path, hub: Path, repo_id: str) -> Path:
    """``src`` stored as huggingface_hub stores a download: blobs, a snapshot of links to
    them, and refs/main naming the snapshot's commit."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("../..") / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.mark.usefixtures("no_network")
def test_repo_id_resolves_to_the_cached_snapshot(
    sharded: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = with_generation_config(sharded[0], tmp_path / "src", {"top_k": 9})
    hub = tmp_path / "home" / "hub"
    snapshot = hub_layout(src, hub, "acme/tiny-llama")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        "acme/tiny-llama", cache_dir=str(hub), local_files_only=True
    )  # the layout is huggingface_hub's own
    assert torch.equal(ref.lm_head.weight, sharded[1].lm_head.weight)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    llm = LLM(model="acme/tiny-llama", **ENGINE)
    assert llm.get_default_sampling_params().top_k == 9  # the snapshot's generation config
    want = greedy(LLM(str(sharded[0]), **ENGINE), SamplingParams(temperature=0.0, max_tokens=4))
    assert greedy(llm, SamplingParams(temperature=0.0, max_tokens=4)) == want
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))  # wins over HF_HOME
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    assert load_model("acme/tiny-llama").generation_config.path == snapshot / (
        "generation_config.json"
    )


def test_uncached_repo_id_names_the_paths_searched(
    sharded: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache") as e:
        load_model("acme/absent")
    assert str(hub / "models--acme--absent") in str(e.value)
    with pytest.raises(ModelNotFoundError, match="'org/name' of a model in the local") as e:
        load_model(str(tmp_path / "acme" / "absent"))  # a path, not an id: no cache search
    assert "models--" not in str(e.value)
    hub_layout(sharded[0], hub, "acme/broken")
    shutil.rmtree(hub / "models--acme--broken" / "snapshots" / COMMIT)
    with pytest.raises(ModelNotFoundError) as e:
        load_model("acme/broken")
    assert f"refs/main -> {COMMIT}" in str(e.value) and f"snapshots/{COMMIT}" in str(e.value)
    (hub / "models--acme--broken" / "refs" / "main").unlink()
    with pytest.raises(ModelNotFoundError, match="refs/main \\(no such file\\)"):
        load_model("acme/broken")


def test_revision_picks_a_branch_tag_or_commit(
    sharded: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    hub_layout(with_generation_config(sharded[0], tmp_path / "a", {"top_k": 3}), hub, "acme/r")
    repo = hub / "models--acme--r"
    other = "fedcba9876543210fedcba9876543210fedcba98"
    shutil.copytree(repo / "snapshots" / COMMIT, repo / "snapshots" / other, symlinks=True)
    (repo / "snapshots" / other / "generation_config.json").unlink()
    (repo / "snapshots" / other / "generation_config.json").write_text('{"top_k": 5}')
    (repo / "refs" / "v2").write_text(other + "\n")
    top_k = {
        rev: LLM("acme/r", revision=rev, **ENGINE).get_default_sampling_params().top_k
        for rev in (None, "main", "v2", other, COMMIT)
    }
    assert top_k == {None: 3, "main": 3, "v2": 5, other: 5, COMMIT: 3}
    with pytest.raises(ModelNotFoundError, match="refs/v3 \\(no such file\\)"):
        load_model("acme/r", revision="v3")
