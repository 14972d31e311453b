"""fast.tokenizer.tokenizer on a Hugging Face directory: encode/decode/chat template vs
transformers,
the incremental detokenizer on multi-byte characters, and the named errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from fast.tokenizer.gguf import tokenizer_from_gguf
from fast.tokenizer.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

CORPUS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "café naïve 日本語",
    "numbers 12345 and symbols !?#",
    "emoji 🤖 robots",
] * 20
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE trained on a tiny corpus, with BOS added by the post-processor."""
    root = tmp_path_factory.mktemp("tok")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<eot>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 0)]
    )
    backend.add_special_tokens(
        [
            AddedToken("<s>", special=True),
            AddedToken("</s>", special=True),
            AddedToken("<eot>", special=True),
        ]
    )
    backend.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "chat_template": TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    return root


TEXTS = ["hello world", "the  lazy\tdog\n", "café 日本語 🤖", "<s>inside</s>", "12345", ""]


def test_encode_decode_equal_transformers(hf_dir: Path) -> None:
    tok = Tokenizer.from_hf_dir(hf_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text)
        assert ids[0] == 0  # BOS from the post-processor
        assert tok.encode(text, add_special_tokens=False) == ref.encode(
            text, add_special_tokens=False
        )
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids)


def test_special_ids_and_template(hf_dir: Path) -> None:
    tok = Tokenizer.from_hf_dir(hf_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert tok.bos_token_id == 0
    assert tok.eos_token_ids == {1, 2} and tok.eos_token_id == 1
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    for gen in (True, False):
        assert tok.apply_chat_template(
            messages, add_generation_prompt=gen
        ) == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert tok.apply_chat_template(messages[:1]) == "<s>[USER] hi</s>\n[ASSISTANT] "


def test_incremental_detokenizer_never_splits_a_character(hf_dir: Path) -> None:
    tok = Tokenizer.from_hf_dir(hf_dir)
    text = "日本語 🤖 café ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # some characters span several byte tokens
    stream = IncrementalDetokenizer(tok, tok.encode("hello"))
    pieces = [stream.add(i) for i in ids]
    assert "".join(pieces) == text == stream.text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # at least one token completed no character
    batch = IncrementalDetokenizer(tok)
    assert batch.add(ids) == text


def test_older_config_spellings(tmp_path: Path, hf_dir: Path) -> None:
    """AddedToken dicts for special tokens, named templates, no generation_config."""
    (tmp_path / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<s>", "__type": "AddedToken"},
                "eos_token": {"content": "<eot>", "__type": "AddedToken"},
                "chat_template": [
                    {"name": "tool_use", "template": "T"},
                    {"name": "default", "template": "D{{ messages | length }}"},
                ],
            }
        )
    )
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_ids) == (0, {2})
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "D1"


def test_missing_template_and_files_raise(tmp_path: Path, hf_dir: Path) -> None:
    tok = Tokenizer.from_hf_dir(hf_dir)
    bare = Tokenizer(tok.backend, bos_token_id=None, eos_token_ids=[])
    with pytest.raises(TokenizerError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])
    assert bare.eos_token_id is None
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        Tokenizer.from_hf_dir(tmp_path)


def test_gguf_metadata_of_unsupported_kind_raises() -> None:
    with pytest.raises(TokenizerError, match="'t5'"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "t5"})


def test_raise_exception_in_template(hf_dir: Path) -> None:
    tok = Tokenizer.from_hf_dir(hf_dir)
    strict = Tokenizer(
        tok.backend,
        bos_token_id=0,
        eos_token_ids=[1],
        chat_template=(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
        ),
    )
    assert strict.apply_chat_template([{"role": "user", "content": ""}]) == "ok"
    with pytest.raises(Exception, match="user first"):
        strict.apply_chat_template([{"role": "system", "content": ""}])
