"""Local data files: bundled copies, path specs, and labeled text read from TSV / CSV / JSONL.

Every problem with a file is raised as one ``DataError`` whose message starts with
``file:line:`` and says what was expected, before any tokenization or training starts.
Files ending in ``.gz`` are decompressed transparently. A file is read whole into memory:
the data sets this project fine-tunes on are megabytes, and reading bytes first lets a
non-UTF-8 byte be reported with its line number.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import glob
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence

import numpy as np

from lm.data.errors import DataError

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled")

FORMATS = ("tsv", "csv", "jsonl")
_EXTENSIONS = {
    ".tsv": "tsv",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
}
_INT = re.compile(r"^[+-]?\d+$")

Column = str | int
PathSpec = str | Sequence[str]


def bundled_path(name: str) -> str:
    """Path of a data file shipped with the repository.

    Args:
      name: path relative to ``lm/data/bundled``, e.g. ``'sst2/train.tsv.gz'``,
        ``'tinyshakespeare/input.txt.gz'``, ``'sst2_instruct/train.jsonl.gz'``.

    Returns:
      The absolute path. Raises DataError listing what is bundled if it does not exist.
    """
    path = os.path.join(BUNDLED_DIR, name)
    if not os.path.isfile(path):
        have = sorted(
            os.path.relpath(os.path.join(d, f), BUNDLED_DIR)
            for d, _, fs in os.walk(BUNDLED_DIR)
            for f in fs
            if not f.endswith(".md")
        )
        raise DataError(f"no bundled data file {name!r}; bundled files: {have}")
    return path


def expand_paths(spec: PathSpec) -> list[str]:
    """Data files named by a path, a glob, a list of them, or a comma-separated string.

    Args:
      spec: ``'a.tsv'``, ``'data/*.csv'``, ``'a.tsv,b.tsv'`` or ``['a.tsv', 'more/*.tsv']``.
        Globs expand in sorted order; ``**`` recurses. In a list, items are not split on commas.

    Returns:
      Existing file paths, in the order given.
    """
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    parts = [os.path.expanduser(p) for p in parts if p]
    if not parts:
        raise DataError(f"no data files given (got {spec!r})")
    paths = []
    for p in parts:
        if glob.has_magic(p):
            matches = sorted(m for m in glob.glob(p, recursive=True) if os.path.isfile(m))
            if not matches:
                raise DataError(f"{p}: no files match this pattern")
            paths.extend(matches)
        elif os.path.isdir(p):
            raise DataError(f"{p}: is a directory, expected a data file (or a glob like {p}/*)")
        elif not os.path.exists(p):
            raise DataError(f"{p}: no such file")
        else:
            paths.append(p)
    return paths


def read_text(path: str) -> str:
    """The whole file as text: UTF-8 (a BOM is dropped), ``.gz`` decompressed.

    Line endings are kept as they are (the csv module handles CRLF itself).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if path.endswith(".gz"):
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a data file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read the file ({e})") from e
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {col}); "
            "save the file as UTF-8"
        ) from None


def file_format(path: str, fmt: str | None = None) -> str:
    """'tsv', 'csv' or 'jsonl': ``fmt`` if given, else from the extension (``.gz`` ignored)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise DataError(f"unknown data format {fmt!r}; expected one of {FORMATS}")
        return fmt
    stem = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(stem)[1].lower()
    if ext not in _EXTENSIONS:
        raise DataError(
            f"{path}: cannot tell the format from the extension {ext!r}; "
            f"name it .tsv/.csv/.jsonl or pass the format (one of {FORMATS})"
        )
    return _EXTENSIONS[ext]


def read_jsonl(path: str) -> Iterator[tuple[int, object]]:
    """Yields (line number, parsed JSON value) for each non-blank line of a JSONL file."""
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})"
            ) from None


@dataclasses.dataclass(frozen=True)
class Examples:
    """Labeled texts (single sentences or sentence pairs), in file order.

    Attributes:
      text_a: N first texts.
      text_b: N second texts for pair tasks, else None.
      labels: int32 [N], index into the label list returned beside the examples.
    """

    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.text_a)


def as_columns(text_columns: Column | Sequence[Column]) -> tuple[Column, ...]:
    """Normalizes ``'sentence'``, ``1``, ``'1,2'``, ``['title', 'description']`` to a tuple."""
    if isinstance(text_columns, int):
        cols = (text_columns,)
    elif isinstance(text_columns, str):
        cols = tuple(c.strip() for c in text_columns.split(",") if c.strip())
    else:
        cols = tuple(text_columns)
    if len(cols) not in (1, 2):
        raise DataError(f"text_columns must name 1 or 2 columns, got {text_columns!r}")
    return cols


def label_names(labels: Sequence[str | int] | str) -> list[str]:
    """Label list given by the user (``['neg', 'pos']``, ``[1, 2, 3, 4]`` or ``'neg,pos'``)."""
    names = labels.split(",") if isinstance(labels, str) else list(labels)
    names = [str(n).strip() for n in names]
    if not names or any(not n for n in names):
        raise DataError(f"labels must be a non-empty list of non-empty names, got {labels!r}")
    if len(set(names)) != len(names):
        raise DataError(f"labels contain duplicates: {names}")
    return names


def infer_label_names(values: Sequence[str]) -> list[str]:
    """Sorted distinct labels; integers sort numerically (so '10' comes after '9')."""
    distinct = set(values)
    if distinct and all(_INT.match(v) for v in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def read_labeled_files(
    files: PathSpec,
    *,
    text_columns: Column | Sequence[Column],
    label_column: Column,
    has_header: bool = True,
    labels: Sequence[str | int] | str | None = None,
    fmt: str | None = None,
) -> tuple[Examples, list[str]]:
    """Reads labeled texts from TSV, CSV or JSONL files.

    TSV is GLUE style: tab-separated with no quoting at all (SST-2 sentences contain bare
    quotes). CSV follows the csv module (quoted fields may hold commas and newlines).
    JSONL holds one object per line; columns are its keys.

    Args:
      files: a path, glob, list, or comma-separated string (see ``expand_paths``).
      text_columns: one column (single texts) or two (pairs): header names, or 0-based
        indices (ints or digit strings such as ``'1'``) for files without a header.
      label_column: name or 0-based index of the label column.
      has_header: whether the first row of each TSV/CSV file names its columns.
      labels: the label list; label i of the result is ``labels[i]``. If None, the sorted
        distinct labels of these files (numeric order when all are integers).
      fmt: 'tsv', 'csv' or 'jsonl'; by default from each file's extension.

    Returns:
      (examples, label names). Raises DataError naming file:line on any bad row.
    """
    cols = as_columns(text_columns)
    names = label_names(labels) if labels is not None else None
    text_a, text_b, raw_labels, where = [], [] if len(cols) == 2 else None, [], []
    for path in expand_paths(files):
        for line, texts, label in _read_file(
            path, file_format(path, fmt), cols, label_column, has_header
        ):
            text_a.append(texts[0])
            if text_b is not None:
                text_b.append(texts[1])
            raw_labels.append(label)
            where.append((path, line))
    if names is None:
        names = infer_label_names(raw_labels)
    index = {n: i for i, n in enumerate(names)}
    ids = np.empty(len(raw_labels), np.int32)
    for k, value in enumerate(raw_labels):
        if value not in index:
            path, line = where[k]
            raise DataError(f"{path}:{line}: label {value!r} is not one of the labels {names}")
        ids[k] = index[value]
    return Examples(text_a, text_b, ids), names


def _read_file(path, fmt, cols, label_column, has_header):
    """Yields (line, texts, label string) for each data row of one file."""
    if fmt == "jsonl":
        rows = _jsonl_rows(path)
    else:
        rows = _delimited_rows(path, fmt, has_header)
    first = next(rows, None)
    if first is None:
        only_header = " (only a header)" if has_header and fmt != "jsonl" else ""
        raise DataError(f"{path}: no data rows{only_header}")
    header, row = first[2], first[1]
    ncols = len(header) if header is not None else len(row) if isinstance(row, list) else None
    text_keys = [_column_key(path, c, header, ncols, first[1]) for c in cols]
    label_key = _column_key(path, label_column, header, ncols, first[1])
    for line, row, _ in _chain(first, rows):
        if ncols is not None and isinstance(row, list) and len(row) != ncols:
            source = "the header" if header else "the first row"
            raise DataError(
                f"{path}:{line}: expected {ncols} columns (as in {source}), got {len(row)}"
            )
        texts = []
        for c, key in zip(cols, text_keys):
            text = _cell(path, line, row, key, c)
            if not isinstance(text, str):
                raise DataError(
                    f"{path}:{line}: text field {c!r} is {type(text).__name__}, expected a string"
                )
            if not text.strip():
                raise DataError(f"{path}:{line}: empty text in column {c!r}")
            texts.append(text)
        label = _label_string(_cell(path, line, row, label_key, label_column))
        if not label:
            raise DataError(f"{path}:{line}: empty label in column {label_column!r}")
        yield line, texts, label


def _chain(first, rest):
    yield first
    yield from rest


def _delimited_rows(path, fmt, has_header):
    """Yields (first line of the row, fields, header or None) for TSV/CSV data rows."""
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if fmt == "tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
    header, end = None, 0
    try:
        for row in reader:
            # A quoted CSV field may span lines: report the line the row starts on.
            line, end = end + 1, reader.line_num
            if not row:
                continue
            if has_header and header is None:
                header = [h.strip() for h in row]
                continue
            yield line, row, header
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed {fmt.upper()} ({e})") from None


def _jsonl_rows(path):
    for line, obj in read_jsonl(path):
        if not isinstance(obj, (dict, list)):
            raise DataError(
                f"{path}:{line}: expected a JSON object per line, got {type(obj).__name__}"
            )
        yield line, obj, None


def _column_key(path, column, header, ncols, first_row):
    """Resolves a column given by name or index to a list index (TSV/CSV) or a key (JSONL)."""
    if isinstance(first_row, dict):
        return str(column)  # JSONL objects: columns are keys; a missing key fails per row.
    as_int = column if isinstance(column, int) else int(column) if _INT.match(str(column)) else None
    if header is not None and isinstance(column, str) and column in header:
        return header.index(column)
    if as_int is None:
        if header is None:
            raise DataError(
                f"{path}: column {column!r} is a name, but the file has no header "
                "(has_header is false); give 0-based column indices instead"
            )
        raise DataError(f"{path}: unknown column {column!r}; the header has columns {header}")
    if not 0 <= as_int < ncols:
        raise DataError(f"{path}: column index {as_int} is out of range; rows have {ncols} columns")
    return as_int


def _cell(path, line, row, key, column):
    if isinstance(row, dict):
        if key not in row:
            raise DataError(
                f"{path}:{line}: missing field {column!r}; the object has {sorted(row)}"
            )
        return row[key]
    if isinstance(key, str):
        raise DataError(f"{path}:{line}: row is a JSON array; give column {column!r} as an index")
    if key >= len(row):
        raise DataError(f"{path}:{line}: row has {len(row)} fields, no column {key}")
    return row[key]


def _label_string(value) -> str:
    if isinstance(value, bool):  # JSON true/false; bool is an int subclass, so test it first.
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return str(value).strip()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value)
