"""A tiny Llama checkpoint with a character-level tokenizer, for the engine, API and CLI tests.

One character is one token, so stop strings, detokenization and prompts are easy to reason
about. ``make_char_model(path)`` writes it (config, safetensors, tokenizer.json, chat template).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

SPECIALS = ["<unk>", "<s>", "</s>"]
CHARS = list(string.ascii_lowercase + string.digits + " .,!?'-:;()") + list("ABCDEFGHIJ")
VOCAB = SPECIALS + CHARS
EOS = 2
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }};{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


def make_char_model(path: Path, seed: int = 0) -> Path:
    """Write the checkpoint into ``path`` (created) and return it."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=EOS,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE})
    )
    return path


def test_char_tokenizer_round_trips(tmp_path: Path) -> None:
    from fast.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_dir(make_char_model(tmp_path / "m"))
    ids = tok.encode("hi there", add_special_tokens=False)
    assert ids == [VOCAB.index(c) for c in "hi there"]
    assert tok.decode(ids + [EOS]) == "hi there"
    assert EOS in tok.eos_token_ids
    assert tok.apply_chat_template([{"role": "user", "content": "yo"}]) == "u:yo;a:"
