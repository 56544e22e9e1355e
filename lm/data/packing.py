"""Packing variable-length causal-LM examples into fixed-length rows.

Several short examples share one row of length T; ``segment_ids`` (1, 2, 3, .. per example,
0 = padding) let the model keep attention inside each example, and ``positions`` restart at 0
for each, so a packed example is computed exactly as if it were alone in its row.

Rows are packed once (best-fit decreasing, deterministic, independent of the seed); training then
shuffles whole rows per epoch through ``lm.data.batches.train_indices``, so batch ``step`` is a
pure function of (seed, step) and every epoch has the same number of rows.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from lm.data.batches import Batch, eval_index_batches, train_indices
from lm.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class LMExamples:
    """N token sequences with a per-token loss flag, ragged.

    Attributes:
      ids: int32 [total] tokens of all examples, concatenated (each example's full sequence:
        its inputs are ids[:-1] and its targets ids[1:]).
      loss: uint8 [total] 1 where the token is one the model should learn to produce
        (assistant tokens); the first token of an example is never a target.
      offsets: int64 [N + 1]; example i is ``ids[offsets[i]:offsets[i + 1]]``.
      pad_id: id put at padding positions.
      num_truncated: examples cut to fit the row length.
      num_dropped: examples dropped because no target token survived truncation.
    """

    ids: np.ndarray
    loss: np.ndarray
    offsets: np.ndarray
    pad_id: int
    num_truncated: int = 0
    num_dropped: int = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def input_lengths(self) -> np.ndarray:
        """int64 [N] positions each example fills in a row (its tokens minus one)."""
        return np.diff(self.offsets) - 1


def pack_rows(lengths: np.ndarray, row_len: int) -> list[np.ndarray]:
    """Groups examples into rows of at most ``row_len`` positions (best-fit decreasing).

    Args:
      lengths: int [N] positions each example needs.
      row_len: T, the length of a row.

    Returns:
      One int64 array of example indices per row, longest example first.
    """
    if len(lengths) and int(np.max(lengths)) > row_len:
        raise DataError(
            f"an example of {int(np.max(lengths))} positions does not fit rows of {row_len}"
        )
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free positions, row), sorted
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        need = int(lengths[i])
        k = bisect.bisect_left(free, (need, -1))  # the tightest row that still fits
        if k == len(free):
            space, row = row_len, len(rows)
            rows.append([])
        else:
            space, row = free.pop(k)
        rows[row].append(int(i))
        if space - need > 0:
            bisect.insort(free, (space - need, row))
    return [np.asarray(r, np.int64) for r in rows]


def packed_batch(
    data: LMExamples,
    rows: Sequence[np.ndarray],
    row_len: int,
    loss_weights: np.ndarray | None = None,
) -> Batch:
    """Lays out the given rows of examples.

    Args:
      data: the examples.
      rows: B rows, each the indices of the examples it holds.
      row_len: T.
      loss_weights: float [B], multiplies each row's loss_mask (0 for padding rows).

    Returns:
      tokens int32 [B, T], targets int32 [B, T], loss_mask float32 [B, T] (1 where the target
      counts), positions int32 [B, T] (within each example), segment_ids int32 [B, T]
      (1, 2, .. per example in the row, 0 = padding), mask int32 [B, T] (= segment_ids > 0).
    """
    b = len(rows)
    tokens = np.full((b, row_len), data.pad_id, np.int32)
    targets = np.full((b, row_len), data.pad_id, np.int32)
    loss = np.zeros((b, row_len), np.float32)
    positions = np.zeros((b, row_len), np.int32)
    segments = np.zeros((b, row_len), np.int32)
    for r, examples in enumerate(rows):
        at = 0
        for seg, i in enumerate(examples, 1):
            s, e = data.offsets[i], data.offsets[i + 1]
            n = e - s - 1
            if at + n > row_len:
                raise DataError(f"row {r} overflows: examples need more than {row_len} positions")
            tokens[r, at : at + n] = data.ids[s : e - 1]
            targets[r, at : at + n] = data.ids[s + 1 : e]
            loss[r, at : at + n] = data.loss[s + 1 : e]
            positions[r, at : at + n] = np.arange(n)
            segments[r, at : at + n] = seg
            at += n
    if loss_weights is not None:
        loss *= np.asarray(loss_weights, np.float32)[:, None]
    return dict(
        tokens=tokens,
        targets=targets,
        loss_mask=loss,
        positions=positions,
        segment_ids=segments,
        mask=(segments > 0).astype(np.int32),
    )


def packed_train_batch(
    data: LMExamples,
    rows: Sequence[np.ndarray],
    row_len: int,
    batch_size: int,
    seed: int,
    step: int,
) -> Batch:
    """Training batch ``step``: B rows of the per-epoch shuffle of ``rows`` (keys as in
    ``packed_batch``)."""
    idx = train_indices(len(rows), batch_size, seed, step)
    return packed_batch(data, [rows[i] for i in idx], row_len)


def packed_eval_batches(
    data: LMExamples, rows: Sequence[np.ndarray], row_len: int, batch_size: int
) -> Iterator[Batch]:
    """All rows in order, each once; the last batch is filled with copies at loss_mask 0."""
    for idx, w in eval_index_batches(len(rows), batch_size):
        yield packed_batch(data, [rows[i] for i in idx], row_len, w)
