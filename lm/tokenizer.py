"""Tokenizers: an HF directory's tokenizer files, or the tokenizer embedded in a GGUF file.

transformers' own GGUF reader imports torch; lm must not need torch at run time, so the GGUF
vocabulary is read with the ``gguf`` package and handed to transformers' torch-free converters
(``integrations.gguf.gguf_tokenizer_mapping``).
"""

from __future__ import annotations

import os

from lm.convert.hf import CheckpointError

# GGUF metadata key -> transformers' tokenizer_dict key (as in GGUF_TOKENIZER_MAPPING).
_GGUF_KEYS = {
    "tokenizer.ggml.model": "tokenizer_type",
    "tokenizer.ggml.pre": "pre_tokenizer_type",
    "tokenizer.ggml.tokens": "tokens",
    "tokenizer.ggml.scores": "scores",
    "tokenizer.ggml.token_type": "token_type",
    "tokenizer.ggml.merges": "merges",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
    "tokenizer.ggml.add_space_prefix": "add_prefix_space",
}


def tokenizer_from_gguf(path: str):
    """A ``PreTrainedTokenizerFast`` (chat template included) built from a GGUF file."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    from lm.convert.gguf import _reader, field

    reader = _reader(path)
    arch = field(reader, "general.architecture")
    tok = {v: field(reader, k) for k, v in _GGUF_KEYS.items() if k in reader.fields}
    if "tokens" not in tok:
        raise CheckpointError(f"{path}: GGUF file holds no tokenizer (tokenizer.ggml.tokens)")
    backend, _ = convert_gguf_tokenizer(arch, tok)
    tokens = tok["tokens"]

    def special(key):
        i = tok.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    kwargs = dict(
        tokenizer_object=backend,
        bos_token=special("bos_token_id"),
        eos_token=special("eos_token_id"),
        unk_token=special("unk_token_id"),
        pad_token=special("pad_token_id"),
    )
    chat_template = field(reader, "tokenizer.chat_template")
    if chat_template:
        kwargs["chat_template"] = chat_template
    t = PreTrainedTokenizerFast(**{k: v for k, v in kwargs.items() if v is not None})
    add_bos = field(reader, "tokenizer.ggml.add_bos_token")
    if add_bos is not None and hasattr(t, "add_bos_token"):
        try:
            t.add_bos_token = bool(add_bos)
        except (AttributeError, ValueError):
            pass
    return t


def load_tokenizer(path: str):
    """The tokenizer stored with a local checkpoint (HF directory or .gguf file)."""
    if path.endswith(".gguf"):
        return tokenizer_from_gguf(path)
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory for the tokenizer")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load tokenizer files ({e})") from e
