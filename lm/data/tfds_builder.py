"""Labeled text through TFDS in its no-TensorFlow mode: random-access ArrayRecord files.

Two sources, one result (``LabeledTextSource``: per split, a random-access sequence of
records plus the label names):

* ``prepare_registry('glue/sst2', ...)``: a TFDS registry dataset, prepared as array_record and
  opened with ``tfds.data_source``. Preparing downloads the source files, so it needs network
  once; offline it fails with a DataError naming the dataset and data_dir.
* ``prepare_local_files({'train': 'a.csv', ...}, ...)``: local TSV/CSV/JSONL files, validated by
  ``lm.data.files`` and written once by the ``LocalTextFiles`` builder into
  ``<cache_dir>/local_text_files/<key>``, where ``key`` hashes the files' paths, mtimes and sizes,
  the columns and the labels. Later runs with unchanged inputs reuse it without reading the
  files.

Finding for tensorflow-datasets 4.9.10 without tensorflow installed: a
``tfds.core.GeneratorBasedBuilder`` with ``file_format='array_record'`` does
``download_and_prepare`` (pure-Python example serializer, array_record writer) and
``as_data_source`` reads it back randomly, so no ArrayRecord fallback is needed. Two gaps of that
mode are bridged here:

1. tfds lazily imports the ``importlib_resources`` backport when it locates a builder's code
   (``DatasetBuilder.code_path``) but declares it only for Python < 3.9
   (tensorflow/datasets#11212). Without it every builder defined in a package fails to prepare.
   When the backport is missing, the standard library's ``importlib.resources`` (which has the
   same ``abc.Traversable``) is registered under that name.
2. Old-style registry builders (``glue`` lives in ``tensorflow_datasets/text``) are registered
   only when their category module is imported, which ``import tensorflow_datasets`` defers, so
   ``glue`` is "not found" until ``tensorflow_datasets.text`` is imported.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from lm.data import cache
from lm.data.errors import DataError
from lm.data.files import (
    Column,
    Examples,
    PathSpec,
    as_columns,
    expand_paths,
    label_names,
    read_labeled_files,
)

if importlib.util.find_spec("importlib_resources") is None:
    import importlib.resources.abc  # noqa: F401  (tfds reads importlib_resources.abc.Traversable)

    sys.modules["importlib_resources"] = importlib.resources

import tensorflow_datasets as tfds  # noqa: E402  (after the shim above)

# Category packages that hold old-style registry builders (imported on demand, see point 2).
_LEGACY_CATEGORIES = ("text", "question_answering", "summarization", "translate", "structured")


@dataclasses.dataclass
class LabeledTextSource:
    """Random-access labeled text, per split.

    Attributes:
      sources: split name -> sequence of records (dicts), random access by index.
      text_keys: the record keys holding the one or two texts.
      label_key: the record key holding the label index.
      label_names: label i is ``label_names[i]``.
      key: a content key for downstream caches (changes whenever the records could).
    """

    sources: dict[str, Sequence[dict]]
    text_keys: tuple[str, ...]
    label_key: str
    label_names: list[str]
    key: str
    _loaded: dict[str, Examples] = dataclasses.field(default_factory=dict, repr=False)

    def examples(self, split: str) -> Examples:
        """All examples of a split, in record order (read once, then kept)."""
        if split not in self.sources:
            raise DataError(f"no split {split!r}; this data has splits {sorted(self.sources)}")
        if split not in self._loaded:
            self._loaded[split] = _read_all(self.sources[split], self.text_keys, self.label_key)
        return self._loaded[split]


def _read_all(source: Sequence[dict], text_keys: tuple[str, ...], label_key: str) -> Examples:
    n = len(source)
    get_many = getattr(source, "__getitems__", None)
    records = get_many(range(n)) if get_many else [source[i] for i in range(n)]
    columns = [[_as_str(r[k]) for r in records] for k in text_keys]
    labels = np.fromiter((int(r[label_key]) for r in records), np.int32, count=n)
    return Examples(columns[0], columns[1] if len(columns) == 2 else None, labels)


def _as_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------
# Registry datasets.


def prepare_registry(
    name: str,
    splits: Sequence[str],
    *,
    text_columns: Column | Sequence[Column],
    label_column: str = "label",
    data_dir: str | None = None,
    download: bool = True,
) -> LabeledTextSource:
    """A TFDS registry dataset as array_record data sources.

    Args:
      name: registry name, e.g. ``'glue/sst2'`` (text column ``'sentence'``) or
        ``'imdb_reviews'`` (text column ``'text'``).
      splits: split names to open, e.g. ``['train', 'validation']``.
      text_columns: feature name(s) of the text(s).
      label_column: feature name of the label (a ClassLabel).
      data_dir: TFDS data directory; default ``<default_cache_dir()>/tfds``.
      download: whether to download and prepare the dataset if it is not in ``data_dir``.

    Returns:
      The splits as random-access sources. Raises DataError if the dataset is unknown, or not
      prepared and cannot be prepared (no network), naming the dataset and data_dir.
    """
    data_dir = os.path.abspath(data_dir or os.path.join(cache.default_cache_dir(), "tfds"))
    builder = _registry_builder(name, data_dir)
    if not builder.is_prepared() and not download:
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in data_dir {data_dir}; prepare it once with "
            "network access (download=True) or point data_dir at a prepared copy"
        )
    sources = {}
    for split in splits:
        try:
            sources[split] = tfds.data_source(
                name,
                split=split,
                data_dir=data_dir,
                download=download,
                builder_kwargs={"file_format": "array_record"},
            )
        except Exception as e:  # tfds raises many types (network, format, split errors).
            raise DataError(
                f"cannot prepare TFDS dataset {name!r} split {split!r} in data_dir {data_dir}: "
                f"{type(e).__name__}: {str(e).splitlines()[0][:300]}. Preparing downloads the "
                "source files once (needs network); offline, copy a prepared data_dir here or "
                "use local files instead"
            ) from e
    keys = tuple(str(c) for c in as_columns(text_columns))
    features = builder.info.features
    for k in (*keys, label_column):
        if k not in features:
            raise DataError(
                f"TFDS dataset {name!r} has no feature {k!r}; it has {sorted(features)}"
            )
    names = getattr(features[label_column], "names", None)
    if not names:
        raise DataError(f"TFDS dataset {name!r}: feature {label_column!r} is not a ClassLabel")
    key = cache.fingerprint("tfds", name, str(builder.info.version), data_dir, keys, label_column)
    return LabeledTextSource(sources, keys, label_column, list(names), key)


def _registry_builder(name: str, data_dir: str):
    kwargs = dict(data_dir=data_dir, file_format="array_record")
    try:
        return tfds.builder(name, **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
        for category in _LEGACY_CATEGORIES:
            try:
                importlib.import_module(f"tensorflow_datasets.{category}")
            except Exception:  # a category that needs TF cannot hold the dataset we want anyway
                pass
    try:
        return tfds.builder(name, **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"unknown TFDS dataset {name!r} (not in the tfds registry)") from None


# ---------------------------------------------------------------------------------------------
# Local files, converted once.


class LocalTextFiles(tfds.core.GeneratorBasedBuilder):
    """Validated local labeled text as array_record; features text_a, text_b, label.

    Built only by ``prepare_local_files``, which validates the files first (so errors name
    file:line before tfds starts) and hands the examples over in memory. Reading goes through
    ``tfds.builder_from_directory``, which restores the label names from disk without this class.
    """

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, splits: Mapping[str, Examples] = (), label_names=(), **kwargs):
        self._splits = dict(splits)
        self._label_names = list(label_names)
        super().__init__(file_format="array_record", **kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="Labeled text converted from local TSV/CSV/JSONL files by lm.data.",
            features=tfds.features.FeaturesDict(
                {
                    "text_a": tfds.features.Text(),
                    "text_b": tfds.features.Text(),  # '' for single-text tasks
                    "label": tfds.features.ClassLabel(names=self._label_names),
                }
            ),
            disable_shuffling=True,  # record i is example i of the files, as users count them
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {name: self._generate_examples(ex) for name, ex in self._splits.items()}

    def _generate_examples(self, examples: Examples):
        for i in range(len(examples)):
            b = examples.text_b[i] if examples.text_b is not None else ""
            yield i, {"text_a": examples.text_a[i], "text_b": b, "label": int(examples.labels[i])}


def prepare_local_files(
    splits: Mapping[str, PathSpec],
    *,
    text_columns: Column | Sequence[Column],
    label_column: Column,
    has_header: bool = True,
    labels: Sequence[str | int] | str | None = None,
    fmt: str | None = None,
    cache_dir: str | None = None,
) -> LabeledTextSource:
    """Local labeled text files as array_record data sources, converted once and cached.

    Args:
      splits: split name -> files (path, glob, list or comma-separated string), e.g.
        ``{'train': 'train.csv', 'validation': 'test.csv'}``.
      text_columns, label_column, has_header, labels, fmt: as in
        ``lm.data.files.read_labeled_files``. Without ``labels``, the label list is inferred
        from the 'train' split (the first split if there is none) and every other split must
        use only those labels.
      cache_dir: root of the cache; default ``default_cache_dir()``.

    Returns:
      The splits as random-access sources.
    """
    if not splits:
        raise DataError("no splits given")
    cols = as_columns(text_columns)
    stamps = {s: [cache.file_stamp(p) for p in expand_paths(spec)] for s, spec in splits.items()}
    fixed = None if labels is None else label_names(labels)
    key = cache.fingerprint("local", stamps, cols, label_column, has_header, fixed, fmt)
    data_dir = os.path.join(cache_dir or cache.default_cache_dir(), "local_text_files", key)
    version_dir = os.path.join(data_dir, "local_text_files", str(LocalTextFiles.VERSION))
    text_keys = ("text_a", "text_b")[: len(cols)]
    loaded = {}
    if not os.path.exists(os.path.join(version_dir, "dataset_info.json")):
        first = "train" if "train" in splits else next(iter(splits))
        read = dict(text_columns=cols, label_column=label_column, has_header=has_header, fmt=fmt)
        loaded[first], names = read_labeled_files(splits[first], labels=labels, **read)
        for s, spec in splits.items():
            if s != first:
                loaded[s], _ = read_labeled_files(spec, labels=names, **read)
        builder = LocalTextFiles(splits=loaded, label_names=names, data_dir=data_dir)
        builder.download_and_prepare()
    builder = tfds.builder_from_directory(version_dir)
    sources = {s: builder.as_data_source(split=s) for s in splits}
    names = list(builder.info.features["label"].names)
    return LabeledTextSource(sources, text_keys, "label", names, key, loaded)
