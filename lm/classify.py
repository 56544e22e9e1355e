"""A fine-tuned classifier from its workdir: predict, evaluate, export.

    clf = Classifier.from_workdir("runs/sst2_minilm")        # best checkpoint
    clf.predict(["a gorgeous film", "dull"])                  # [{"label": "1", "probs": {...}}]
    clf.evaluate()                                            # {"eval/accuracy": ...}
    clf.export("hf_dir")                                      # transformers-loadable

A workdir holds everything needed: ``config.json`` (the experiment), ``model.json``
(ModelConfig, labels, max_len), ``tokenizer/`` and ``checkpoints/``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from lm.config import ModelConfig


class WorkdirNotReady(FileNotFoundError):
    """The workdir holds no finished classifier run (no config, model.json or checkpoint)."""


def read_run(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
    """``(experiment config, model.json dict)`` of a run directory."""
    paths = [os.path.join(workdir, n) for n in ("config.json", "model.json")]
    for p in paths:
        if not os.path.exists(p):
            raise WorkdirNotReady(f"{workdir}: no {os.path.basename(p)}; is this a run directory?")
    from lm.experiment import base_config

    with open(paths[0]) as f:
        raw = json.load(f)
    config = base_config()
    config.unlock()
    _update(config, raw)
    with open(paths[1]) as f:
        info = json.load(f)
    return config, info


def _update(config, raw: dict) -> None:
    for k, v in raw.items():
        if isinstance(v, dict) and k in config and isinstance(config[k], ml_collections.ConfigDict):
            _update(config[k], v)
        else:
            try:
                config[k] = tuple(v) if isinstance(v, list) else v
            except TypeError:
                with config.ignore_type():
                    config[k] = tuple(v) if isinstance(v, list) else v


def model_config_from_dict(d: dict) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    kw = {k: v for k, v in d.items() if k in fields}
    for k in ("lora_targets",):
        if k in kw and isinstance(kw[k], list):
            kw[k] = tuple(kw[k])
    if kw.get("rope_scaling"):
        kw["rope_scaling"] = tuple(tuple(x) for x in kw["rope_scaling"])
    return ModelConfig(**kw)


def restore_params(workdir: str, cfg: ModelConfig, config, step: int | None):
    """Parameters of checkpoint ``step`` (default: the best) on the default device."""
    from lm.checkpoint import Checkpointer
    from lm.model import param_shapes
    from lm.train import early_stop_metric

    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=10**6, best_metric=early_stop_metric(config)
    )
    try:
        step = ckpt.best_step() if step is None else step
        if step is None:
            raise WorkdirNotReady(f"{workdir}: no complete checkpoint yet")
        if step not in ckpt.all_steps():
            raise WorkdirNotReady(
                f"{workdir}: no checkpoint at step {step}; have {ckpt.all_steps()}"
            )
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), param_shapes(cfg)
        )
        return ckpt.restore_params(step, abstract)
    finally:
        ckpt.close()


@dataclasses.dataclass
class Classifier:
    """A classifier restored from a run directory."""

    cfg: ModelConfig
    params: Any
    tokenizer: Any
    labels: list[str]
    max_len: int
    config: ml_collections.ConfigDict
    step: int
    workdir: str = ""

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None) -> Classifier:
        config, info = read_run(workdir)
        if info.get("task") != "classification":
            raise WorkdirNotReady(f"{workdir}: task is {info.get('task')!r}, not classification")
        cfg = model_config_from_dict(info["model_config"])
        params, step = restore_params(workdir, cfg, config, step)
        from lm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer"))
        return cls(
            cfg,
            params,
            tokenizer,
            list(info["labels"]),
            int(info["max_len"]),
            config,
            step,
            workdir,
        )

    # --- scoring ---------------------------------------------------------------------------

    @functools.cached_property
    def _predict_fn(self):
        from lm.train import predict_step

        return jax.jit(functools.partial(predict_step, cfg=self.cfg))

    @functools.cached_property
    def _eval_fn(self):
        from lm.train import eval_step, get_task

        return jax.jit(functools.partial(eval_step, cfg=self.cfg, task=get_task("classification")))

    def _buckets(self):
        from lm.experiment import buckets

        return buckets(self.config)

    def tokenize(self, text_a: Sequence[str], text_b: Sequence[str] | None = None, labels=None):
        from lm.data import Examples, tokenize_examples

        labels = np.zeros(len(text_a), np.int32) if labels is None else np.asarray(labels, np.int32)
        ex = Examples(list(text_a), None if text_b is None else list(text_b), labels)
        return tokenize_examples(self.tokenizer, ex, self.max_len, use_cache=False)

    def probabilities(self, texts, batch_size: int = 64) -> np.ndarray:
        """Class probabilities float32 [N, C]; ``texts`` are strings or (a, b) pairs."""
        from lm.data import classification_eval_batches

        if not len(texts):
            return np.zeros((0, len(self.labels)), np.float32)
        if isinstance(texts[0], tuple | list):
            tok = self.tokenize([t[0] for t in texts], [t[1] for t in texts])
        else:
            tok = self.tokenize(texts)
        out = []
        for batch in classification_eval_batches(tok, batch_size, self._buckets()):
            probs = np.asarray(self._predict_fn(self.params, batch))
            out.append(probs[batch["weights"] > 0])
        return np.concatenate(out)

    def predict(self, texts, batch_size: int = 64) -> list[dict]:
        """One dict per text: ``text``, ``label`` (its name) and ``probs`` (name -> p)."""
        probs = self.probabilities(texts, batch_size)
        rows = []
        for t, p in zip(texts, probs, strict=True):
            rows.append(
                dict(
                    text=t if isinstance(t, str) else list(t),
                    label=self.labels[int(np.argmax(p))],
                    probs={name: float(x) for name, x in zip(self.labels, p, strict=True)},
                )
            )
        return rows

    def evaluate(self, split: str = "eval", batch_size: int = 64) -> dict[str, float]:
        """Loss, accuracy and macro-F1 on ``split``: "eval" or "train" (the run's data), or a
        labeled file in the run's format and columns."""
        from lm.data import classification_eval_batches, read_labeled_files
        from lm.experiment import data_kwargs, load_classification_data
        from lm.train import get_task

        if split in ("eval", "validation", "dev", "train"):
            ds = load_classification_data(self.config, self.tokenizer, self.cfg.max_len)
            tok = ds.train if split == "train" else ds.eval
            if tok is None:
                raise WorkdirNotReady(f"{self.workdir}: the run has no eval data; pass a file")
        else:
            kw = data_kwargs(self.config)
            ex, _ = read_labeled_files(
                split,
                text_columns=kw["text_columns"],
                label_column=kw.get("label_column", "label"),
                has_header=kw.get("has_header", True),
                labels=self.labels,
                fmt=kw.get("fmt"),
            )
            tok = self.tokenize(ex.text_a, ex.text_b, ex.labels)
        total = None
        for batch in classification_eval_batches(tok, batch_size, self._buckets()):
            s = jax.device_get(self._eval_fn(self.params, batch))
            total = s if total is None else jax.tree.map(np.add, total, s)
        out = get_task("classification").summary(total)
        return {
            "split": split,
            "step": self.step,
            "num_examples": len(tok),
            **{f"eval/{k}": v for k, v in out.items()},
        }

    def export(self, out_dir: str) -> str:
        """The classifier as an HF directory (float32 weights, label names, tokenizer)."""
        from lm.convert.hf import save_hf_dir

        cfg = self.cfg.replace(dtype="float32", param_dtype="float32")
        params = jax.tree.map(lambda x: np.asarray(x, np.float32), self.params)
        return save_hf_dir(cfg, params, out_dir, self.tokenizer, self.labels)


# --- reading texts to predict --------------------------------------------------------------


def read_texts(path: str, config) -> list:
    """Texts to classify from a file: ``.txt`` (one per line), or TSV/CSV/JSONL with the run's
    ``data.text_columns`` (and ``data.has_header``); a label column, if any, is ignored.

    Raises:
        lm.data.DataError: naming the file and line.
    """
    from lm.data import DataError, read_text
    from lm.experiment import columns, data_kwargs

    text = read_text(path)
    stem = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(stem)[1].lower()
    if ext == ".txt":
        return [line for line in text.splitlines() if line.strip()]
    kw = data_kwargs(config)
    has_header = kw.get("has_header", True)
    cols = columns(kw["text_columns"], has_header)
    fmt = config.data.format or {
        ".tsv": "tsv",
        ".csv": "csv",
        ".jsonl": "jsonl",
        ".json": "jsonl",
    }.get(ext)
    if fmt is None:
        raise DataError(f"{path}: unknown extension {ext!r}; use .txt, .tsv, .csv or .jsonl")
    out = []
    if fmt == "jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
            try:
                vals = [obj[c] for c in cols]
            except (KeyError, IndexError, TypeError):
                raise DataError(f"{path}:{i}: missing text field(s) {list(cols)}") from None
            out.append(vals[0] if len(vals) == 1 else tuple(vals))
        return out
    reader = csv.reader(
        io.StringIO(text, newline=""),
        delimiter="\t" if fmt == "tsv" else ",",
        quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL,
    )
    header = None
    for row in reader:
        if not row:
            continue
        if has_header and header is None:
            header = [h.strip() for h in row]
            missing = [c for c in cols if isinstance(c, str) and c not in header]
            if missing:
                raise DataError(f"{path}:1: no column(s) {missing}; the header has {header}")
            continue
        idx = [header.index(c) if isinstance(c, str) else int(c) for c in cols]
        if max(idx) >= len(row):
            raise DataError(
                f"{path}:{reader.line_num}: {len(row)} columns, text column {max(idx)} missing"
            )
        vals = [row[j] for j in idx]
        out.append(vals[0] if len(vals) == 1 else tuple(vals))
    return out
