"""Batches as pure functions of (seed, step), padded to a few length buckets.

Training reads an endless stream: epoch e is the permutation ``default_rng([seed, e])`` of the
examples, epochs follow each other, and batch ``step`` is positions
``[step * B, (step + 1) * B)`` of the stream. So the position in the data is just the step
number: resuming at step k recomputes exactly the batches an uninterrupted run would have seen,
with no iterator state to checkpoint, and no example is dropped at an epoch's end.

Padding goes to the smallest bucket (powers of two from 16, and max_len) that fits the longest
example of the batch, so XLA compiles at most ``len(buckets)`` shapes per batch size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from lm.data.errors import DataError
from lm.data.tokenize import Tokenized

Batch = dict[str, np.ndarray]


def length_buckets(max_len: int, min_len: int = 16) -> tuple[int, ...]:
    """Padded lengths: min_len, 2 * min_len, ... below max_len, then max_len itself.

    >>> length_buckets(128)
    (16, 32, 64, 128)
    """
    buckets, n = [], min_len
    while n < max_len:
        buckets.append(n)
        n *= 2
    return (*buckets, max_len)


def bucket_length(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= length."""
    for b in buckets:
        if b >= length:
            return b
    raise DataError(f"sequence of {length} tokens is longer than the largest bucket {buckets[-1]}")


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Steps to see every example at least once: ceil(N / B)."""
    _check_sizes(num_examples, batch_size)
    return math.ceil(num_examples / batch_size)


def num_train_steps(num_examples: int, batch_size: int, num_epochs: float) -> int:
    """Steps for ``num_epochs`` passes over the data (fractions allowed): ceil(E * N / B)."""
    _check_sizes(num_examples, batch_size)
    return max(1, math.ceil(num_epochs * num_examples / batch_size))


def _check_sizes(num_examples, batch_size):
    if num_examples <= 0:
        raise DataError("the data set is empty")
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")


def epoch_order(
    num_examples: int,
    seed: int,
    epoch: int,
    *,
    lengths: np.ndarray | None = None,
    group_batches: int = 0,
    batch_size: int = 1,
) -> np.ndarray:
    """The order of examples in one epoch: a permutation of range(N), int64 [N].

    With ``lengths`` and ``group_batches > 1``, each window of ``group_batches * batch_size``
    consecutive examples of the permutation is sorted by length and its whole batches are
    shuffled again, so a batch holds examples of similar length (less padding) while the
    order stays random at the scale of windows. Still a pure function of (seed, epoch).
    """
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    if lengths is None or group_batches <= 1:
        return perm
    window = group_batches * batch_size
    rng = np.random.default_rng([seed, epoch, 1])
    parts = []
    for start in range(0, num_examples, window):
        chunk = perm[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        nb = len(chunk) // batch_size
        whole = chunk[: nb * batch_size].reshape(nb, batch_size)[rng.permutation(nb)]
        parts += [whole.reshape(-1), chunk[nb * batch_size :]]
    return np.concatenate(parts)


def train_indices(
    num_examples: int,
    batch_size: int,
    seed: int,
    step: int,
    *,
    lengths: np.ndarray | None = None,
    group_batches: int = 0,
) -> np.ndarray:
    """Example indices of training batch ``step``: int64 [B], a pure function of its arguments."""
    _check_sizes(num_examples, batch_size)
    pos = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = pos // num_examples
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):  # one epoch, or two where the batch straddles a boundary
        sel = epochs == e
        order = epoch_order(
            num_examples,
            seed,
            int(e),
            lengths=lengths,
            group_batches=group_batches,
            batch_size=batch_size,
        )
        out[sel] = order[pos[sel] % num_examples]
    return out


def classification_batch(
    data: Tokenized,
    indices: np.ndarray,
    buckets: tuple[int, ...],
    weights: np.ndarray | None = None,
) -> Batch:
    """Pads the examples ``indices`` to their bucket.

    Returns:
      tokens int32 [B, T], mask int32 [B, T] (1 = real token), token_types int32 [B, T],
      labels int32 [B], weights float32 [B] (ones unless given).
    """
    lengths = data.lengths[indices]
    b, t = len(indices), bucket_length(int(lengths.max()), buckets)
    tokens = np.full((b, t), data.pad_id, np.int32)
    types = np.zeros((b, t), np.int32)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
    for row, i in enumerate(indices):
        ids, tt = data.example(int(i))
        tokens[row, : len(ids)] = ids
        types[row, : len(ids)] = tt
    w = np.ones(b, np.float32) if weights is None else np.asarray(weights, np.float32)
    return dict(
        tokens=tokens,
        mask=mask,
        token_types=types,
        labels=data.labels[indices].astype(np.int32),
        weights=w,
    )


def classification_train_batch(
    data: Tokenized,
    batch_size: int,
    seed: int,
    step: int,
    buckets: tuple[int, ...],
    *,
    group_batches: int = 0,
) -> Batch:
    """Training batch ``step`` (see ``classification_batch`` for the keys and shapes).

    Args:
      group_batches: if > 1, batch examples of similar length within windows of this many
        batches (see ``epoch_order``).
    """
    lengths = data.lengths if group_batches > 1 else None
    idx = train_indices(
        len(data), batch_size, seed, step, lengths=lengths, group_batches=group_batches
    )
    return classification_batch(data, idx, buckets)


def eval_index_batches(
    num_examples: int, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices int64 [B], weights float32 [B]) covering range(N) in order, each example once.

    The last batch is filled up with copies of its first example at weight 0: copies of real
    data, not empty rows, so no fully masked row can turn a weight-0 loss into 0 * NaN.
    """
    _check_sizes(num_examples, batch_size)
    for start in range(0, num_examples, batch_size):
        idx = np.arange(start, min(start + batch_size, num_examples))
        w = np.ones(batch_size, np.float32)
        if len(idx) < batch_size:
            w[len(idx) :] = 0.0
            idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
        yield idx, w


def classification_eval_batches(
    data: Tokenized, batch_size: int, buckets: tuple[int, ...]
) -> Iterator[Batch]:
    """Eval batches in data order; real examples have weight 1, padding examples weight 0."""
    for idx, w in eval_index_batches(len(data), batch_size):
        yield classification_batch(data, idx, buckets, w)


def split_microbatches(batch: Batch, grad_accum: int) -> Batch:
    """A global batch as ``grad_accum`` micro-batches, for a ``lax.scan`` over the first axis.

    Returns:
      The same keys, each array reshaped [B, ...] -> [grad_accum, B // grad_accum, ...];
      micro-batch j is ``{k: v[j] for k, v in out.items()}`` (rows j*b .. (j+1)*b - 1).
    """
    if grad_accum < 1:
        raise DataError(f"grad_accum must be at least 1, got {grad_accum}")
    out = {}
    for k, v in batch.items():
        if v.shape[0] % grad_accum:
            raise DataError(f"batch size {v.shape[0]} is not divisible by grad_accum={grad_accum}")
        out[k] = v.reshape(grad_accum, v.shape[0] // grad_accum, *v.shape[1:])
    return out
