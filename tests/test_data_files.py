"""Local files: bundled data, layouts (TSV/CSV/JSONL, headers, indices), and every input error."""

import gzip
import os

import numpy as np
import pytest

from lm.data import DataError, bundled_path, expand_paths, read_labeled_files, read_text


def _write(path, text: str | bytes):
    data = text if isinstance(text, bytes) else text.encode()
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return str(path)


def test_bundled_sst2_counts():
    train, names = read_labeled_files(
        bundled_path("sst2/train.tsv.gz"), text_columns="sentence", label_column="label"
    )
    dev, dev_names = read_labeled_files(
        bundled_path("sst2/dev.tsv.gz"), text_columns="sentence", label_column="label", labels=names
    )
    assert (len(train), len(dev)) == (67_349, 872)
    assert names == dev_names == ["0", "1"]
    # Label counts from SOURCE.md; SST-2 sentences keep GLUE's trailing space and bare quotes.
    assert np.bincount(train.labels).tolist() == [29_780, 37_569]
    assert np.bincount(dev.labels).tolist() == [428, 444]
    assert train.text_a[0] == "hide new secretions from the parental units "
    assert train.text_b is None and train.labels.dtype == np.int32


def test_bundled_files_exist_and_list_on_miss():
    assert read_text(bundled_path("tinyshakespeare/input.txt.gz")).startswith("First Citizen:")
    for name in ("sst2/SOURCE.md", "tinyshakespeare/SOURCE.md", "sst2_instruct/SOURCE.md"):
        assert os.path.isfile(
            os.path.join(os.path.dirname(bundled_path("sst2/dev.tsv.gz")), "..", name)
        )
    with pytest.raises(DataError, match="sst2/dev.tsv.gz"):
        bundled_path("nope.tsv")


def test_ag_news_layout_headerless_csv(tmp_path):
    # AG News: class (1-4), title, description; quoted fields with commas, quotes and newlines.
    path = _write(
        tmp_path / "test.csv",
        '"3","Fears for T N pension","Unions say they are ""disappointed"", after talks."\n'
        '"4","Race is On","A second\nteam of rocketeers"\n'
        '"1","Peace talks","Leaders, meeting in Cairo"\n'
        '"10","Ten","class ten sorts after nine"\n',
    )
    ex, names = read_labeled_files(path, has_header=False, text_columns=[1, 2], label_column=0)
    assert names == ["1", "3", "4", "10"]  # integers sort numerically
    assert ex.labels.tolist() == [1, 2, 0, 3]
    assert ex.text_b[0] == 'Unions say they are "disappointed", after talks.'
    assert ex.text_b[1] == "A second\nteam of rocketeers"
    # Digit strings are indices when there is no header; given labels fix the order.
    ex2, names2 = read_labeled_files(
        path, has_header=False, text_columns="1,2", label_column="0", labels=[1, 3, 4, 10]
    )
    assert names2 == ["1", "3", "4", "10"] and ex2.labels.tolist() == [1, 2, 0, 3]


def test_string_labels_header_pairs_jsonl_and_globs(tmp_path):
    a = _write(tmp_path / "a.tsv.gz", "premise\thypothesis\tgold\nA man.\tA person.\tentail\n")
    _write(tmp_path / "b.tsv", 'premise\thypothesis\tgold\nIt "is".\tIt is not.\tcontra\n')
    ex, names = read_labeled_files(
        str(tmp_path / "*.tsv*"), text_columns=["premise", "hypothesis"], label_column="gold"
    )
    assert names == ["contra", "entail"] and ex.labels.tolist() == [1, 0]
    assert ex.text_a == ["A man.", 'It "is".'] and ex.text_b == ["A person.", "It is not."]
    j = _write(tmp_path / "c.jsonl", '{"text": "good", "y": 1}\n\n{"text": "bad", "y": 0}\n')
    ex, names = read_labeled_files(j, text_columns="text", label_column="y")
    assert names == ["0", "1"] and ex.labels.tolist() == [1, 0]
    assert expand_paths(f"{a}, {j}") == [a, j]
    assert expand_paths([a, str(tmp_path / "b.*")]) == [a, str(tmp_path / "b.tsv")]


@pytest.mark.parametrize(
    "name, content, kwargs, match",
    [
        ("empty.tsv", "", {}, r"empty.tsv: file is empty"),
        ("header.tsv", "sentence\tlabel\n", {}, r"header.tsv: no data rows \(only a header\)"),
        (
            "cols.tsv",
            "sentence\tlabel\nok\t1\ntoo\tmany\t1\n",
            {},
            r"cols.tsv:3: expected 2 columns .*got 3",
        ),
        (
            "name.tsv",
            "sentence\tlabel\nok\t1\n",
            {"text_columns": "text"},
            r"unknown column 'text'.*\['sentence', 'label'\]",
        ),
        (
            "lab.tsv",
            "sentence\tlabel\nok\t1\nbad\t7\n",
            {"labels": ["0", "1"]},
            r"lab.tsv:3: label '7' is not one of the labels \['0', '1'\]",
        ),
        (
            "txt.tsv",
            "sentence\tlabel\nok\t1\n  \t0\n",
            {},
            r"txt.tsv:3: empty text in column 'sentence'",
        ),
        ("emptylab.tsv", "sentence\tlabel\nok\t\n", {}, r"emptylab.tsv:2: empty label"),
        (
            "noheader.csv",
            "1,hi\n",
            {"has_header": False},
            r"column 'sentence' is a name, but the file has no header",
        ),
        (
            "range.csv",
            "1,hi\n",
            {"has_header": False, "text_columns": 5, "label_column": 0},
            r"column index 5 is out of range",
        ),
        (
            "bad.jsonl",
            '{"sentence": "a", "label": 1}\n{"sentence": "b",\n',
            {},
            r"bad.jsonl:2: not valid JSON",
        ),
        ("miss.jsonl", '{"sentence": "a"}\n', {}, r"miss.jsonl:1: missing field 'label'"),
        ("what.txt", "a\t1\n", {}, r"cannot tell the format"),
    ],
)
def test_errors_name_file_and_line(tmp_path, name, content, kwargs, match):
    path = _write(tmp_path / name, content)
    args = dict(text_columns="sentence", label_column="label") | kwargs
    with pytest.raises(DataError, match=match):
        read_labeled_files(path, **args)


def test_quoted_csv_error_reports_start_line(tmp_path):
    path = _write(tmp_path / "q.csv", 'text,label\n"multi\nline",1\n"x","y","z"\n')
    with pytest.raises(DataError, match=r"q.csv:4: expected 2 columns"):
        read_labeled_files(path, text_columns="text", label_column="label")


def test_missing_unreadable_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match=r"nope.tsv: no such file"):
        read_labeled_files(str(tmp_path / "nope.tsv"), text_columns="s", label_column="l")
    with pytest.raises(DataError, match=r"\*.csv: no files match"):
        read_labeled_files(str(tmp_path / "*.csv"), text_columns="s", label_column="l")
    bad_gz = _write(tmp_path / "broken.tsv", b"not gzip")
    os.rename(bad_gz, bad_gz + ".gz")
    with pytest.raises(DataError, match=r"broken.tsv.gz: cannot read the file"):
        read_text(bad_gz + ".gz")
    latin = _write(tmp_path / "latin.tsv", "s\tl\nok\t1\ncaf\xe9\t0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.tsv:3: not UTF-8 text \(byte 0xe9"):
        read_labeled_files(latin, text_columns="s", label_column="l")
    with pytest.raises(DataError, match="is a directory"):
        read_labeled_files(str(tmp_path), text_columns="s", label_column="l")
