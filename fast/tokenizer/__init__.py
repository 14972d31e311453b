"""Tokenizers: the tokenizer.json wrapper (``tokenizer``) and its GGUF construction (``gguf``)."""
