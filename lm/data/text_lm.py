"""Character-level language-model data (tiny Shakespeare), as in nanoGPT's shakespeare_char.

The vocabulary is the sorted set of characters of the whole text; the first 90% of the
characters train and the last 10% are held out. A training batch is B random windows of
context + 1 characters (inputs and next-character targets), drawn from ``default_rng([seed,
step])`` like nanoGPT's ``get_batch``; evaluation reads a fixed set of non-overlapping
windows, so two evaluations of the same model give the same number.

Instruction data (chat templates, loss on assistant tokens, packing) is in ``lm.data.sft``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence

import numpy as np

from lm.data.batches import Batch, eval_index_batches
from lm.data.errors import DataError
from lm.data.files import bundled_path, read_text


class CharTokenizer:
    """Maps each character of a fixed vocabulary to its index in sorted order."""

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars or any(len(c) != 1 for c in chars) or sorted(set(chars)) != chars:
            raise DataError("a character vocabulary is a sorted list of distinct single characters")
        self.chars = chars
        # Sorted code points let encode() map a whole text with one searchsorted.
        self._codes = np.array([ord(c) for c in chars], np.uint32)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary of all characters in ``text``."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """int32 [len(text)] character ids. Raises DataError for characters outside the vocabulary."""
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        ids = np.minimum(np.searchsorted(self._codes, codes), len(self.chars) - 1)
        bad = self._codes[ids] != codes
        if bad.any():
            unknown = sorted({chr(c) for c in codes[bad]})
            raise DataError(f"characters outside the vocabulary: {unknown[:20]}")
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        """The text of a sequence of ids."""
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))

    def save(self, path: str) -> None:
        """Writes the vocabulary as JSON (``{"type": "char", "chars": [...]}``)."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"type": "char", "chars": self.chars}, f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str) -> CharTokenizer:
        """Reads a vocabulary written by ``save``."""
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read character vocabulary ({e})") from e
        if (
            not isinstance(obj, dict)
            or obj.get("type") != "char"
            or not isinstance(obj.get("chars"), list)
        ):
            raise DataError(f'{path}: expected {{"type": "char", "chars": [...]}}')
        return cls(obj["chars"])


@dataclasses.dataclass(frozen=True)
class CharText:
    """A text split for character-level LM.

    Attributes:
      tokenizer: the character vocabulary of the whole text.
      train: int32 [N_train] the first ``train_fraction`` of the characters.
      eval: int32 [N_eval] the rest.
    """

    tokenizer: CharTokenizer
    train: np.ndarray
    eval: np.ndarray


def load_char_text(path: str | None = None, *, train_fraction: float = 0.9) -> CharText:
    """Reads a text file (default: bundled tiny Shakespeare) for character-level LM.

    Args:
      path: a UTF-8 text file (``.gz`` allowed).
      train_fraction: the share of characters, from the start, used for training.
    """
    path = path or bundled_path("tinyshakespeare/input.txt.gz")
    text = read_text(path)
    if len(text) < 2:
        raise DataError(f"{path}: file is empty")
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    n = int(len(ids) * train_fraction)
    return CharText(tok, ids[:n], ids[n:])


def _windows(data: np.ndarray, starts: np.ndarray, context: int, weights=None) -> Batch:
    # [B, context + 1]: inputs are the first `context` characters, targets the last.
    w = data[starts[:, None] + np.arange(context + 1)[None, :]]
    b = len(starts)
    loss = np.ones((b, context), np.float32)
    if weights is not None:
        loss *= np.asarray(weights, np.float32)[:, None]
    return dict(
        tokens=w[:, :-1].astype(np.int32),
        targets=w[:, 1:].astype(np.int32),
        loss_mask=loss,
        positions=np.broadcast_to(np.arange(context, dtype=np.int32), (b, context)).copy(),
        segment_ids=np.ones((b, context), np.int32),
        mask=np.ones((b, context), np.int32),
    )


def _check_context(data: np.ndarray, context: int):
    if len(data) < context + 1:
        raise DataError(f"text of {len(data)} characters is too short for windows of {context} + 1")


def char_train_batch(
    data: np.ndarray, batch_size: int, context: int, seed: int, step: int
) -> Batch:
    """Training batch ``step``: B random windows, a pure function of (seed, step).

    Returns:
      tokens, targets int32 [B, context]; loss_mask float32 [B, context] (all 1); positions,
      segment_ids (all 1), mask (all 1) int32 [B, context].
    """
    _check_context(data, context)
    starts = np.random.default_rng([seed, step]).integers(0, len(data) - context, size=batch_size)
    return _windows(data, starts, context)


def char_eval_starts(data: np.ndarray, context: int, max_windows: int | None = None) -> np.ndarray:
    """Start offsets of the fixed eval windows: non-overlapping, covering the text; if there
    are more than ``max_windows``, that many spread evenly over it."""
    _check_context(data, context)
    starts = np.arange(0, len(data) - context, context)
    if max_windows is not None and len(starts) > max_windows:
        starts = starts[np.linspace(0, len(starts) - 1, max_windows).round().astype(int)]
    return starts


def char_eval_batches(
    data: np.ndarray, batch_size: int, context: int, max_windows: int | None = None
) -> Iterator[Batch]:
    """The eval windows in batches (keys as ``char_train_batch``); padding windows of the last
    batch have loss_mask 0."""
    starts = char_eval_starts(data, context, max_windows)
    for idx, w in eval_index_batches(len(starts), batch_size):
        yield _windows(data, starts[idx], context, w)
