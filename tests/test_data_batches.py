"""Batching: bounded shapes, batches as pure functions of (seed, step), exact eval coverage."""

import numpy as np
import pytest

from lm.data import (
    DataError,
    Tokenized,
    classification_eval_batches,
    classification_train_batch,
    epoch_order,
    length_buckets,
    num_train_steps,
    split_microbatches,
    steps_per_epoch,
    train_indices,
)


def _fake_tokenized(n=103, max_len=100, seed=0):
    """Examples whose token i of example k is 1000 * k + i + 1 (so every token is traceable)."""
    lengths = np.random.default_rng(seed).integers(2, max_len + 1, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.concatenate(
        [1000 * k + np.arange(1, n_k + 1) for k, n_k in enumerate(lengths)]
    ).astype(np.int32)
    types = np.zeros(len(ids), np.int8)
    return Tokenized(
        ids, types, offsets, (np.arange(n) % 3).astype(np.int32), pad_id=0, num_truncated=0
    )


def test_buckets_bound_the_shapes():
    assert length_buckets(128) == (16, 32, 64, 128)
    assert length_buckets(100) == (16, 32, 64, 100)
    data = _fake_tokenized()
    buckets = length_buckets(100)
    shapes = {
        classification_train_batch(data, 8, 0, s, buckets)["tokens"].shape for s in range(200)
    }
    assert shapes <= {(8, b) for b in buckets}
    batch = classification_train_batch(data, 8, 0, 3, buckets)
    assert set(batch) == {"tokens", "mask", "token_types", "labels", "weights"}
    assert [batch[k].dtype for k in ("tokens", "mask", "token_types", "labels", "weights")] == [
        np.int32,
        np.int32,
        np.int32,
        np.int32,
        np.float32,
    ]
    # Real tokens under mask 1, padding under mask 0, labels match the examples.
    k = batch["tokens"][:, 0] // 1000
    assert np.array_equal(batch["mask"].sum(1), data.lengths[k])
    assert (batch["tokens"][batch["mask"] == 0] == 0).all()
    assert np.array_equal(batch["labels"], data.labels[k])


def test_resume_reproduces_batches_without_state():
    data = _fake_tokenized()
    buckets = length_buckets(100)
    run = [classification_train_batch(data, 16, 7, s, buckets, group_batches=4) for s in range(30)]
    # "Resume" at step 20: recompute from (seed, step) alone.
    for s in (20, 29, 0):
        again = classification_train_batch(data, 16, 7, s, buckets, group_batches=4)
        assert all(np.array_equal(run[s][k], again[k]) for k in again)
    other_seed = classification_train_batch(data, 16, 8, 20, buckets, group_batches=4)
    assert not np.array_equal(other_seed["tokens"][:, 0], run[20]["tokens"][:, 0])


def test_each_epoch_is_a_permutation_and_no_example_is_dropped():
    n, b = 103, 16
    seen = np.concatenate([train_indices(n, b, 0, s) for s in range(num_train_steps(n, b, 3))])
    assert len(seen) >= 3 * n
    for e in range(3):
        assert np.array_equal(np.sort(seen[e * n : (e + 1) * n]), np.arange(n))
    assert not np.array_equal(seen[:n], seen[n : 2 * n])  # reshuffled each epoch
    assert steps_per_epoch(n, b) == 7 and num_train_steps(n, b, 2.5) == 17
    assert train_indices(3, 8, 0, 0).shape == (8,)  # batch larger than the data set


def test_group_by_length_reduces_padding_and_keeps_permutation():
    data = _fake_tokenized(n=512)
    order = epoch_order(512, 0, 0, lengths=data.lengths, group_batches=8, batch_size=16)
    assert np.array_equal(np.sort(order), np.arange(512))
    buckets = length_buckets(100)

    def padding(group):
        b = [
            classification_train_batch(data, 16, 0, s, buckets, group_batches=group)
            for s in range(32)
        ]
        return sum((x["mask"] == 0).sum() for x in b)

    assert padding(8) < 0.7 * padding(0)


def test_eval_covers_every_example_once():
    data = _fake_tokenized(n=103)
    batches = list(classification_eval_batches(data, 16, length_buckets(100)))
    assert len(batches) == 7 and all(b["tokens"].shape[0] == 16 for b in batches)
    real = np.concatenate([b["tokens"][b["weights"] > 0, 0] // 1000 for b in batches])
    assert np.array_equal(real, np.arange(103))
    last = batches[-1]
    assert last["weights"].tolist() == [1.0] * 7 + [0.0] * 9


def test_split_microbatches():
    batch = classification_train_batch(_fake_tokenized(), 8, 0, 0, length_buckets(100))
    micro = split_microbatches(batch, 4)
    assert micro["tokens"].shape == (4, 2, batch["tokens"].shape[1]) and micro["labels"].shape == (
        4,
        2,
    )
    assert np.array_equal(micro["tokens"][1], batch["tokens"][2:4])
    with pytest.raises(DataError, match="not divisible by grad_accum=3"):
        split_microbatches(batch, 3)
