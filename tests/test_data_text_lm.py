"""Character-level LM data on the bundled tiny Shakespeare (nanoGPT shakespeare_char numbers)."""

import numpy as np
import pytest

from lm.data import CharTokenizer, DataError, char_eval_batches, char_train_batch, load_char_text


@pytest.fixture(scope="module")
def shakespeare():
    return load_char_text()


def test_vocab_and_split_match_nanogpt(shakespeare):
    tok = shakespeare.tokenizer
    assert tok.vocab_size == 65 and tok.chars[:2] == ["\n", " "]
    assert (len(shakespeare.train), len(shakespeare.eval)) == (1_003_854, 111_540)
    assert tok.decode(shakespeare.train[:14]) == "First Citizen:"


def test_char_tokenizer_roundtrip_and_json(shakespeare, tmp_path):
    tok = shakespeare.tokenizer
    text = "O Romeo, Romeo!\nwherefore art thou?"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and tok.decode(ids) == text
    tok.save(str(tmp_path / "vocab.json"))
    again = CharTokenizer.load(str(tmp_path / "vocab.json"))
    assert again.chars == tok.chars and again.decode(again.encode(text)) == text
    with pytest.raises(DataError, match=r"outside the vocabulary: \['é'\]"):
        tok.encode("café")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="bad.json"):
        CharTokenizer.load(str(tmp_path / "bad.json"))


def test_train_batches_are_pure_and_shifted(shakespeare):
    data = shakespeare.train
    b = char_train_batch(data, 4, 32, seed=1, step=10)
    assert b["tokens"].shape == b["targets"].shape == (4, 32)
    assert np.array_equal(b["tokens"][:, 1:], b["targets"][:, :-1])  # next-character targets
    assert b["loss_mask"].dtype == np.float32 and b["loss_mask"].all()
    assert (b["positions"][0] == np.arange(32)).all() and (b["segment_ids"] == 1).all()
    again = char_train_batch(data, 4, 32, seed=1, step=10)
    assert all(np.array_equal(b[k], again[k]) for k in b)
    assert not np.array_equal(b["tokens"], char_train_batch(data, 4, 32, seed=1, step=11)["tokens"])


def test_eval_windows_are_fixed_and_cover_the_text(shakespeare):
    data = shakespeare.eval
    batches = list(char_eval_batches(data, 64, 256))
    windows = (len(data) - 256 + 255) // 256
    assert sum(b["loss_mask"][:, 0].sum() for b in batches) == windows
    first = batches[0]["tokens"]
    assert np.array_equal(first[1], data[256:512]) and np.array_equal(first[0], data[:256])
    assert np.array_equal(first, next(char_eval_batches(data, 64, 256))["tokens"])
    few = list(char_eval_batches(data, 8, 256, max_windows=10))
    assert len(few) == 2 and few[-1]["loss_mask"][:, 0].tolist() == [1, 1] + [0] * 6
