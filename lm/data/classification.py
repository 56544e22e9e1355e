"""Text classification data from its source (local files or a TFDS registry name) to tokens.

One call a training script needs: it validates the inputs, converts them to array_record once,
tokenizes once, and returns ragged token arrays that ``lm.data.batches`` pads per batch. A run
whose files, columns, labels, tokenizer and max_len are unchanged reads only two .npz files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lm.data import cache
from lm.data.errors import DataError
from lm.data.files import Column, PathSpec, bundled_path
from lm.data.tfds_builder import LabeledTextSource, prepare_local_files, prepare_registry
from lm.data.tokenize import Tokenized, tokenize_examples


@dataclasses.dataclass(frozen=True)
class ClassificationData:
    """Tokenized train and eval splits and their shared label list.

    Attributes:
      train: the training examples.
      eval: the evaluation examples, or None if no eval data was given.
      label_names: label i is ``label_names[i]``; the classifier has len(label_names) outputs.
    """

    train: Tokenized
    eval: Tokenized | None
    label_names: list[str]


def sst2_files() -> dict:
    """Keyword arguments of ``load_classification`` for the bundled GLUE SST-2 copy."""
    return dict(
        train_files=bundled_path("sst2/train.tsv.gz"),
        eval_files=bundled_path("sst2/dev.tsv.gz"),
        text_columns="sentence",
        label_column="label",
        has_header=True,
    )


def load_classification(
    tokenizer,
    max_len: int,
    *,
    text_columns: Column | Sequence[Column],
    label_column: Column = "label",
    train_files: PathSpec | None = None,
    eval_files: PathSpec | None = None,
    has_header: bool = True,
    labels: Sequence[str | int] | str | None = None,
    fmt: str | None = None,
    tfds_name: str | None = None,
    train_split: str = "train",
    eval_split: str | None = "validation",
    data_dir: str | None = None,
    download: bool = True,
    cache_dir: str | None = None,
) -> ClassificationData:
    """Loads and tokenizes a text classification data set.

    Give either local files (``train_files``, optional ``eval_files``) or ``tfds_name``.

    Args:
      tokenizer: a transformers fast tokenizer.
      max_len: most tokens per example (special tokens included); longer ones are cut.
      text_columns, label_column, has_header, labels, fmt: see
        ``lm.data.files.read_labeled_files`` (for TFDS: feature names).
      train_files, eval_files: local data files.
      tfds_name, train_split, eval_split, data_dir, download: see
        ``lm.data.tfds_builder.prepare_registry`` (eval_split None: no eval data).
      cache_dir: cache root (default ``default_cache_dir()``).

    Returns:
      The tokenized splits; ``.train.num_truncated`` / ``.eval.num_truncated`` say how many
      examples were cut to max_len.
    """
    if (train_files is None) == (tfds_name is None):
        raise DataError(
            "give either train_files (local data) or tfds_name (a TFDS dataset), not both"
        )
    if tfds_name is not None:
        splits = [train_split] + ([eval_split] if eval_split else [])
        source = prepare_registry(
            tfds_name,
            splits,
            text_columns=text_columns,
            label_column=str(label_column),
            data_dir=data_dir,
            download=download,
        )
        train_name, eval_name = train_split, eval_split
    else:
        files = {"train": train_files} | ({"eval": eval_files} if eval_files is not None else {})
        source = prepare_local_files(
            files,
            text_columns=text_columns,
            label_column=label_column,
            has_header=has_header,
            labels=labels,
            fmt=fmt,
            cache_dir=cache_dir,
        )
        train_name, eval_name = "train", "eval" if eval_files is not None else None
    train = _tokenize(tokenizer, source, train_name, max_len, cache_dir)
    evals = _tokenize(tokenizer, source, eval_name, max_len, cache_dir) if eval_name else None
    return ClassificationData(train, evals, source.label_names)


def _tokenize(tokenizer, source: LabeledTextSource, split, max_len, cache_dir) -> Tokenized:
    out = tokenize_examples(
        tokenizer,
        lambda: source.examples(split),
        max_len,
        cache_dir=cache_dir,
        data_key=cache.fingerprint(source.key, split),
    )
    bad = (out.labels < 0) | (out.labels >= len(source.label_names))
    if bad.any():
        raise DataError(
            f"split {split!r} has {int(bad.sum())} examples whose label is outside the labels "
            f"{source.label_names} (e.g. label {int(out.labels[np.argmax(bad)])}; an unlabeled test split?)"
        )
    return out
