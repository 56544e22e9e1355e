"""Tokenization of labeled text with a HF fast tokenizer, cached on disk once per data set.

The result is ragged (flat token arrays plus offsets), so padding happens per batch, to the
batch's length bucket (``lm.data.batches``), instead of to max_len for every example.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable

import numpy as np

from lm.data import cache
from lm.data.errors import DataError
from lm.data.files import Examples

_CHUNK = 4096  # examples per tokenizer call: bounds the Python lists HF builds


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """N tokenized examples, ragged.

    Attributes:
      ids: int32 [total] token ids of all examples, concatenated.
      type_ids: int8 [total] segment of each token (0 = first text, 1 = second text of a pair).
      offsets: int64 [N + 1]; example i is ``ids[offsets[i]:offsets[i + 1]]``.
      labels: int32 [N] label indices.
      pad_id: the tokenizer's padding id (used for padding positions in batches).
      num_truncated: how many examples were cut to max_len (the caller should warn if > 0).
    """

    ids: np.ndarray
    type_ids: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    pad_id: int
    num_truncated: int

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        """int32 [N] tokens per example."""
        return np.diff(self.offsets).astype(np.int32)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, type_ids) of example i."""
        s, e = self.offsets[i], self.offsets[i + 1]
        return self.ids[s:e], self.type_ids[s:e]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides a fast tokenizer's output: its full serialized form
    (vocabulary, merges, normalizer, special-token template) and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(
            f"{type(tokenizer).__name__} is not a fast (Rust-backed) tokenizer; "
            "load it with transformers.AutoTokenizer (use_fast=True)"
        )
    # The backend also serializes its current truncation/padding settings, which HF changes on
    # every call with truncation=...; they do not change what a call returns, so drop them.
    state = json.loads(backend.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    h = hashlib.sha256(json.dumps(state, sort_keys=True).encode())
    h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()[:16]


def examples_key(examples: Examples) -> str:
    """A hash of the texts and labels of some examples."""
    texts = (
        examples.text_a if examples.text_b is None else [*examples.text_a, "\x01", *examples.text_b]
    )
    return cache.fingerprint(
        cache.hash_texts(texts), hashlib.sha256(examples.labels.tobytes()).hexdigest()
    )


def tokenize_examples(
    tokenizer,
    examples: Examples | Callable[[], Examples],
    max_len: int,
    *,
    cache_dir: str | None = None,
    data_key: str | None = None,
    use_cache: bool = True,
) -> Tokenized:
    """Tokenizes single texts or pairs (``[CLS] a [SEP] b [SEP]`` for BERT) up to max_len.

    Args:
      tokenizer: a transformers fast tokenizer (the caller loads it).
      examples: the examples, or a function returning them (called only on a cache miss, so a
        cached run need not read the data at all; then ``data_key`` must be given).
      max_len: most tokens per example, special tokens included. Longer examples are cut
        (pairs: the longer text first) and counted in ``num_truncated``.
      cache_dir: cache root; default ``default_cache_dir()``. The entry is
        ``<cache_dir>/tokens/<hash of tokenizer, data, max_len>.npz``.
      data_key: a key that identifies the examples' content (e.g.
        ``LabeledTextSource.key``); default: a hash of the texts and labels.
      use_cache: False to neither read nor write the cache.

    Returns:
      The ragged token ids, token types and labels.
    """
    if max_len < 2:
        raise DataError(f"max_len must be at least 2, got {max_len}")
    if data_key is None:
        if callable(examples):
            examples = examples()
        data_key = examples_key(examples)
    path = os.path.join(
        cache_dir or cache.default_cache_dir(),
        "tokens",
        cache.fingerprint("cls", tokenizer_fingerprint(tokenizer), data_key, max_len) + ".npz",
    )
    cached = cache.load_npz(path) if use_cache else None
    if cached is not None:
        return Tokenized(
            cached["ids"],
            cached["type_ids"],
            cached["offsets"],
            cached["labels"],
            int(cached["pad_id"]),
            int(cached["num_truncated"]),
        )
    if callable(examples):
        examples = examples()
    out = _tokenize(tokenizer, examples, max_len)
    if use_cache:
        cache.save_npz(
            path, {f.name: np.asarray(getattr(out, f.name)) for f in dataclasses.fields(out)}
        )
    return out


def _tokenize(tokenizer, examples: Examples, max_len: int) -> Tokenized:
    n = len(examples)
    if n == 0:
        raise DataError("no examples to tokenize")
    ids, types, truncated = [], [], 0
    for start in range(0, n, _CHUNK):
        a = examples.text_a[start : start + _CHUNK]
        b = None if examples.text_b is None else examples.text_b[start : start + _CHUNK]
        # First without truncation, to learn which examples are too long; only those are
        # encoded again with truncation (HF's 'longest_first' for pairs).
        enc = _encode(tokenizer, a, b, None)
        long = [i for i, x in enumerate(enc["input_ids"]) if len(x) > max_len]
        if long:
            cut = _encode(
                tokenizer,
                [a[i] for i in long],
                None if b is None else [b[i] for i in long],
                max_len,
            )
            for k, i in enumerate(long):
                enc["input_ids"][i] = cut["input_ids"][k]
                enc["token_type_ids"][i] = cut["token_type_ids"][k]
        truncated += len(long)
        ids.extend(enc["input_ids"])
        types.extend(enc["token_type_ids"])
    lengths = np.fromiter((len(x) for x in ids), np.int64, count=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Tokenized(
        ids=np.fromiter((t for x in ids for t in x), np.int32, count=int(offsets[-1])),
        type_ids=np.fromiter((t for x in types for t in x), np.int8, count=int(offsets[-1])),
        offsets=offsets,
        labels=np.asarray(examples.labels, np.int32),
        pad_id=int(pad_id),
        num_truncated=truncated,
    )


def _encode(tokenizer, a, b, max_len):
    enc = tokenizer(
        a,
        b,
        truncation=max_len is not None,
        max_length=max_len,
        return_token_type_ids=True,
        return_attention_mask=False,
        verbose=False,  # no "longer than the model's maximum" warning: we count truncation
    )
    enc = dict(enc)
    if "token_type_ids" not in enc:  # tokenizers without segment embeddings
        enc["token_type_ids"] = [[0] * len(x) for x in enc["input_ids"]]
    return enc
