"""Metrics: classification scores from confusion matrices, and where metrics are written.

A run writes three views of the same numbers into its workdir:
    metrics.jsonl   one JSON object per line: ``step`` and namespaced metrics
                    (``train/loss``, ``train/lr``, ``train/examples_per_s``, ``eval/loss``,
                    ``eval/accuracy``, ``eval/f1``); appended, so a resumed run continues it
    events.out.*    TensorBoard scalars (tensorboardX), under ``workdir/tb``
    curves.png      train and eval loss and the eval metrics against the step
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import numpy as np


def confusion_scores(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 from a confusion matrix ``[true, predicted]`` (counts or weights).

    Macro-F1 averages the per-class F1 over classes that occur in the labels or the
    predictions (sklearn's ``f1_score(average="macro")`` with its zero_division=0 default
    for classes that occur in neither is the same for our purposes: such classes are skipped).
    """
    c = np.asarray(confusion, dtype=np.float64)
    total = c.sum()
    tp = np.diag(c)
    support, predicted = c.sum(1), c.sum(0)
    present = (support + predicted) > 0
    denom = support + predicted
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0)
    return {
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "f1": float(f1[present].mean()) if present.any() else float("nan"),
    }


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (an unfinished last line, from a kill, is skipped)."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def write_json(path: str, obj: Any, **dump_kwargs) -> None:
    """Writes ``json.dump(obj, **dump_kwargs)`` to path atomically: readers see the old file or
    the whole new one. Every process of a multi-process run writes the same config.json: each
    through a temporary of its own (a shared one was moved away under another's os.replace)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, **dump_kwargs)
    os.replace(tmp, path)


def _summary_writer():
    """tensorboardX's SummaryWriter class, imported without PyTorch.

    tensorboardX imports torch at import time when it is installed (to accept its tensors), which
    took 1.9 s of a training run's start; lm logs Python floats. With torch not yet imported it
    is hidden for that one import (``sys.modules["torch"] = None`` makes ``import torch`` raise
    ImportError) and restored at once, so later imports of torch work as usual.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Appends to ``workdir/metrics.jsonl`` and TensorBoard; plots ``curves.png`` on demand.

    On resume, rows logged after the restored step (written before a crash) are dropped first,
    so the file reads as one uninterrupted run.
    """

    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
        self.workdir = workdir
        self.path = os.path.join(workdir, "metrics.jsonl")
        rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        self._tb = None
        if tensorboard:
            try:
                self._tb = _summary_writer()(os.path.join(workdir, "tb"))
            except ImportError:  # optional: metrics.jsonl is the record
                self._tb = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": int(step)}
        row.update({k: _clean(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float | np.floating | np.integer) and math.isfinite(v):
                    self._tb.add_scalar(k, float(v), int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def plot(self, metric: str = "eval/accuracy") -> str | None:
        """Write ``curves.png``: losses on the left, eval metrics on the right."""
        return plot_curves(self.path, os.path.join(self.workdir, "curves.png"), metric)


def _clean(v):
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep it readable
    return v


def plot_curves(jsonl: str, out: str, metric: str = "eval/accuracy") -> str | None:
    rows = read_jsonl(jsonl)
    if not rows:
        return None
    # The object API with the Agg canvas, not pyplot: importing pyplot (its backend machinery)
    # took 1.0 s of a run's 1.7 s plot; nothing here needs a window.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
        return zip(*pts, strict=True) if pts else ((), ())

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for key in ("train/loss", "eval/loss"):
        xs, ys = series(key)
        if xs:
            ax1.plot(xs, ys, label=key, marker="o" if key.startswith("eval") else None)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    keys = sorted({k for r in rows for k in r if k.startswith("eval/") and k != "eval/loss"})
    for key in keys:
        xs, ys = series(key)
        if xs:
            ax2.plot(xs, ys, label=key, marker="o", linewidth=2 if key == metric else 1)
    ax2.set_xlabel("step")
    ax2.set_ylabel("eval metric")
    if keys:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    return out
