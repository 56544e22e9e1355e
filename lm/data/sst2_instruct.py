"""Makes the bundled SST-2 instruction data (``bundled/sst2_instruct/{train,dev}.jsonl.gz``).

Each row asks for the sentiment of one SST-2 sentence and answers "positive" or "negative":
a small SFT task whose dev accuracy can be compared with a classifier fine-tuned on the same
sentences. ``train`` is a seeded random sample of the GLUE training sentences, ``dev`` is the
whole GLUE dev set in file order. Rebuild (byte-identical output) with
``python -m lm.data.sst2_instruct``.
"""

from __future__ import annotations

import gzip
import json
import os

import numpy as np

from lm.data.files import BUNDLED_DIR, bundled_path, read_labeled_files

PROMPT = "Classify the sentiment of this movie review as positive or negative.\n\nReview: {}"
ANSWERS = {"0": "negative", "1": "positive"}


def instruct_rows(tsv_path: str, num_rows: int | None = None, seed: int = 0) -> list[dict]:
    """Prompt/response rows for SST-2 sentences: all in file order, or a seeded sample."""
    ex, names = read_labeled_files(tsv_path, text_columns="sentence", label_column="label")
    order = np.arange(len(ex))
    if num_rows is not None:
        order = np.sort(np.random.default_rng(seed).permutation(len(ex))[:num_rows])
    return [
        {"prompt": PROMPT.format(ex.text_a[i].strip()), "response": ANSWERS[names[ex.labels[i]]]}
        for i in order
    ]


def write_jsonl_gz(rows: list[dict], path: str) -> None:
    """Writes JSONL, gzip'd with mtime 0 so the bytes depend only on the rows."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as g:
        g.write(data)


def make(out_dir: str, num_train: int = 4000, seed: int = 0) -> None:
    """Writes train.jsonl.gz (num_train sampled rows) and dev.jsonl.gz (all 872) to out_dir."""
    write_jsonl_gz(
        instruct_rows(bundled_path("sst2/train.tsv.gz"), num_train, seed),
        os.path.join(out_dir, "train.jsonl.gz"),
    )
    write_jsonl_gz(
        instruct_rows(bundled_path("sst2/dev.tsv.gz")), os.path.join(out_dir, "dev.jsonl.gz")
    )


if __name__ == "__main__":
    make(os.path.join(BUNDLED_DIR, "sst2_instruct"))
