"""TFDS without TensorFlow: local files converted once to array_record; the registry path."""

import os

import numpy as np
import pytest

import lm.data.tfds_builder as tb
from lm.data import DataError, bundled_path, prepare_local_files, prepare_registry

import tensorflow_datasets as tfds  # isort: skip  (after lm.data, which bridges importlib_resources)


def _csv(path, rows):
    path.write_text("".join(f'"{label}","{title}","{body}"\n' for label, title, body in rows))
    return str(path)


AG = [("3", "Oil, again", "Prices rise"), ("1", "Talks", "In Cairo"), ("4", "Rocket", "A launch")]


def test_local_files_roundtrip_random_access(tmp_path):
    train = _csv(tmp_path / "train.csv", AG)
    test = _csv(tmp_path / "test.csv", AG[:2])
    src = prepare_local_files(
        {"train": train, "test": test},
        text_columns=[1, 2],
        label_column=0,
        has_header=False,
        cache_dir=str(tmp_path / "cache"),
    )
    assert src.label_names == ["1", "3", "4"]
    assert len(src.sources["train"]) == 3 and len(src.sources["test"]) == 2
    # Random access, file order kept (disable_shuffling), texts and labels as written.
    rec = src.sources["train"][2]
    assert (rec["text_a"], rec["text_b"], int(rec["label"])) == (b"Rocket", b"A launch", 2)
    fresh = tb.LabeledTextSource(
        src.sources, src.text_keys, src.label_key, src.label_names, src.key
    )
    ex = fresh.examples("train")  # read back from the array_record files
    assert ex.text_a == ["Oil, again", "Talks", "Rocket"] and ex.text_b[0] == "Prices rise"
    assert ex.labels.tolist() == [1, 0, 2]
    # The same files are readable by tfds alone (no lm class needed).
    (version_dir,) = {os.path.dirname(p) for p in _files(tmp_path / "cache", "dataset_info.json")}
    assert len(tfds.builder_from_directory(version_dir).as_data_source("test")) == 2


def _files(root, name):
    return [os.path.join(d, name) for d, _, fs in os.walk(root) if name in fs]


def test_local_files_cached_by_path_mtime_size(tmp_path, monkeypatch):
    train = _csv(tmp_path / "train.csv", AG)
    kwargs = dict(
        text_columns=[1, 2], label_column=0, has_header=False, cache_dir=str(tmp_path / "c")
    )
    first = prepare_local_files({"train": train}, **kwargs)

    def no_reading(*a, **k):
        raise AssertionError("files were read again")

    monkeypatch.setattr(tb, "read_labeled_files", no_reading)
    again = prepare_local_files({"train": train}, **kwargs)
    assert again.key == first.key and len(again.sources["train"]) == 3
    monkeypatch.undo()
    _csv(tmp_path / "train.csv", AG + [("2", "New", "Row")])  # size changes -> new key
    changed = prepare_local_files({"train": train}, **kwargs)
    assert changed.key != first.key and changed.label_names == ["1", "2", "3", "4"]
    other_cols = prepare_local_files({"train": train}, **(kwargs | {"text_columns": [2]}))
    assert other_cols.key != changed.key and other_cols.text_keys == ("text_a",)


def test_local_eval_labels_must_be_train_labels(tmp_path):
    train = _csv(tmp_path / "train.csv", AG[:2])
    test = _csv(tmp_path / "test.csv", AG)
    with pytest.raises(
        DataError, match=r"test.csv:3: label '4' is not one of the labels \['1', '3'\]"
    ):
        prepare_local_files(
            {"train": train, "test": test},
            text_columns=[1, 2],
            label_column=0,
            has_header=False,
            cache_dir=str(tmp_path / "c"),
        )


def test_sst2_dev_through_array_record(tmp_path):
    src = prepare_local_files(
        {"train": bundled_path("sst2/dev.tsv.gz")},
        text_columns="sentence",
        label_column="label",
        cache_dir=str(tmp_path),
    )
    src._loaded.clear()  # force reading the records back
    ex = src.examples("train")
    assert len(ex) == 872 and np.bincount(ex.labels).tolist() == [428, 444]
    assert ex.text_a[0] == "it 's a charming and often affecting journey . "


class LmDataTestToy(tfds.core.GeneratorBasedBuilder):
    """A registry dataset that needs no download, to exercise ``tfds.data_source`` offline."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {
            "sentence": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=["neg", "pos"]),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "validation": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"sentence": f"sentence {i}", "label": i % 2}


def test_registry_dataset_via_data_source(tmp_path):
    src = prepare_registry(
        "lm_data_test_toy", ["train", "validation"], text_columns="sentence", data_dir=str(tmp_path)
    )
    assert src.label_names == ["neg", "pos"]
    ex = src.examples("train")
    assert sorted(ex.text_a) == [f"sentence {i}" for i in range(6)]
    assert all(int(t[-1]) % 2 == y for t, y in zip(ex.text_a, ex.labels))
    assert len(src.examples("validation")) == 2
    with pytest.raises(DataError, match="has no feature 'text'"):
        prepare_registry("lm_data_test_toy", ["train"], text_columns="text", data_dir=str(tmp_path))


def test_registry_errors_name_dataset_and_data_dir(tmp_path):
    with pytest.raises(DataError, match="unknown TFDS dataset 'no_such_dataset_xyz'"):
        prepare_registry("no_such_dataset_xyz", ["train"], text_columns="x", data_dir=str(tmp_path))
    # glue is an old-style builder: found only after its category module is imported.
    with pytest.raises(DataError, match=rf"'glue/sst2' is not prepared in data_dir {tmp_path}"):
        prepare_registry(
            "glue/sst2", ["train"], text_columns="sentence", data_dir=str(tmp_path), download=False
        )
