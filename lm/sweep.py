"""Config sweeps: a list of override dicts, each run as its own fine-tune in its own workdir.

A sweep is Python beside the config it sweeps (in the config file or ``configs/sweeps/<name>.py``):
a function ``get_sweep(h)`` that returns a list of override dicts, built with the helpers of
``Hyper`` in the style of big_vision's ``get_hyper``::

    def get_sweep(h):
        return h.product([
            h.sweep("config.optim.lr", [1e-4, 5e-5]),
            h.sweep("config.train.batch_size", [16, 32]),
        ])

A plain list of dicts (``[{"config.optim.lr": 1e-4}, ...]``) works too. Each run gets
``DIR/<run name>/``; ``DIR/results.csv`` and ``DIR/results.md`` hold one row per run and
``DIR/<metric>.png`` plots the swept metric. A relaunch skips finished runs and resumes the
others (fine-tuning resumes from its workdir); a failed run is recorded and the sweep goes on.
"""

from __future__ import annotations

import csv
import difflib
import importlib.util
import itertools
import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from lm.metrics import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SweepError(ValueError):
    """A sweep that cannot start: bad file, unknown config key, bad value."""


class Hyper:
    """Builders for lists of override dicts (big_vision ``get_hyper`` style)."""

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    @staticmethod
    def sweep(key: str, values: Iterable[Any]) -> list[dict[str, Any]]:
        """One override dict per value of ``key``."""
        return [{key: v} for v in values]

    @staticmethod
    def fixed(key: str, value: Any) -> list[dict[str, Any]]:
        return [{key: value}]

    @staticmethod
    def product(lists: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Cartesian product: every combination of one dict from each list."""
        out = []
        for combo in itertools.product(*lists):
            merged: dict[str, Any] = {}
            for d in combo:
                merged.update(d)
            out.append(merged)
        return out

    @staticmethod
    def zip(lists: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Element-wise: the i-th dicts of every list merged (lists must have equal length)."""
        lengths = {len(x) for x in lists}
        if len(lengths) > 1:
            raise SweepError(f"h.zip needs lists of equal length, got {sorted(lengths)}")
        return [dict(itertools.chain.from_iterable(d.items() for d in row)) for row in zip(*lists)]

    def choice(self, key: str, values: Sequence[Any], n: int) -> list[dict[str, Any]]:
        """``n`` seeded random choices of ``key`` from ``values``."""
        return [{key: self._rng.choice(list(values))} for _ in range(n)]

    def loguniform(self, key: str, low: float, high: float, n: int) -> list[dict[str, Any]]:
        """``n`` seeded log-uniform samples in [low, high] (learning rates)."""
        import math

        return [
            {key: float(f"{math.exp(self._rng.uniform(math.log(low), math.log(high))):.3g}")}
            for _ in range(n)
        ]


# ----------------------------------------------------------------------------------------------
# loading


def _load_module(path: str, name: str):
    if not os.path.exists(path):
        raise SweepError(f"sweep file {path} does not exist")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - report any error in the user's file
        raise SweepError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from e
    return module


def load_sweep(config_path: str, sweep: str, seed: int = 0) -> list[dict[str, Any]]:
    """The override dicts of ``sweep``: a file path, a name in ``configs/sweeps/``, or the name
    of a ``get_sweep*`` function in the config file itself ("default" = ``get_sweep``)."""
    config_file = config_path.split(":")[0]
    if sweep.endswith(".py") or os.path.sep in sweep:
        module, fn = _load_module(sweep, "lm_sweep"), "get_sweep"
    else:
        candidate = os.path.join(
            os.path.dirname(os.path.abspath(config_file)), "sweeps", f"{sweep}.py"
        )
        if os.path.exists(candidate):
            module, fn = _load_module(candidate, "lm_sweep"), "get_sweep"
        else:
            module = _load_module(config_file, "lm_sweep_config")
            fn = "get_sweep" if sweep == "default" else f"get_sweep_{sweep}"
            if not hasattr(module, fn):
                raise SweepError(
                    f"no sweep {sweep!r}: neither {candidate} nor {fn}() in {config_file}"
                )
    obj = getattr(module, fn, None)
    if obj is None:
        raise SweepError(f"{getattr(module, '__file__', sweep)} defines no {fn}(h)")
    runs = obj(Hyper(seed)) if callable(obj) else obj
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise SweepError(f"{fn} must return a list of override dicts, got {type(runs).__name__}")
    if not runs:
        raise SweepError(f"{fn} returned no runs")
    return [{_normalize_key(k): v for k, v in r.items()} for r in runs]


def _normalize_key(key: str) -> str:
    return key[len("config.") :] if key.startswith("config.") else key


def load_config(config_path: str):
    """The experiment config (ConfigDict) of ``configs/x.py[:arg]``."""
    path, _, arg = config_path.partition(":")
    module = _load_module(path, "lm_sweep_cfg")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except TypeError:
        return module.get_config(arg or None)


def validate(config, runs: list[dict[str, Any]], config_path: str) -> None:
    """Every override key must exist in the config; refuse the whole sweep before any run."""
    problems = []
    for i, run in enumerate(runs):
        for key in run:
            node, parts = config, key.split(".")
            for j, part in enumerate(parts):
                keys = list(node.keys()) if hasattr(node, "keys") else []
                if part not in keys:
                    near = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
                    where = ".".join(parts[:j]) or "<top>"
                    hint = f" (did you mean {', '.join(near)}?)" if near else ""
                    problems.append(
                        f"run {i}: config has no key {key!r}: no {part!r} under {where}{hint}"
                    )
                    break
                node = node[part]
            else:
                if isinstance(node, dict) or hasattr(node, "keys"):
                    problems.append(f"run {i}: {key!r} is a section, not a value")
    if problems:
        raise SweepError(f"sweep does not fit {config_path}: " + "; ".join(sorted(set(problems))))


# ----------------------------------------------------------------------------------------------
# running


def _cli_value(v: Any) -> str:
    if isinstance(v, list | tuple):
        return ",".join(_cli_value(x) for x in v)
    return str(v)


def run_name(index: int, overrides: dict[str, Any]) -> str:
    parts = [f"{k.split('.')[-1]}={_cli_value(v)}" for k, v in overrides.items()]
    name = f"{index:03d}-" + "_".join(parts)
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", name)[:120]


def command(config_path: str, workdir: str, overrides: dict[str, Any]) -> list[str]:
    path, sep, arg = config_path.partition(":")
    if os.path.exists(path):  # runs start in the repo root; keep the user's relative path valid
        config_path = os.path.abspath(path) + sep + arg
    workdir = os.path.abspath(workdir)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts", "finetune.py"),
        f"--config={config_path}",
        f"--workdir={workdir}",
    ]
    cmd += [f"--config.{k}={_cli_value(v)}" for k, v in overrides.items()]
    return cmd


def _status_path(workdir: str) -> str:
    return os.path.join(workdir, "sweep_status.json")


def read_status(workdir: str) -> dict[str, Any]:
    try:
        with open(_status_path(workdir)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_status(workdir: str, status: dict[str, Any]) -> None:
    os.makedirs(workdir, exist_ok=True)
    write_json(_status_path(workdir), status)


def run_sweep(
    config_path: str,
    runs: list[dict[str, Any]],
    root: str,
    parallel: int = 1,
    metric: str | None = None,
    log=print,
) -> list[dict[str, Any]]:
    """Run (or resume) every run; returns the result rows (also written to results.csv/md).
    ``metric`` (the tables' and plot's) defaults to the config's early-stopping metric."""
    if metric is None:
        from lm.train import early_stop_metric  # jax and the model code: only for a real sweep

        metric = early_stop_metric(load_config(config_path))
    os.makedirs(root, exist_ok=True)
    names = [run_name(i, r) for i, r in enumerate(runs)]
    with open(os.path.join(root, "sweep.json"), "w") as f:
        json.dump({"config": config_path, "runs": runs, "names": names}, f, indent=2)
    pending = []
    for name, overrides in zip(names, runs):
        wd = os.path.join(root, name)
        if read_status(wd).get("status") == "done":
            log(f"[sweep] {name}: finished earlier, skipped")
            continue
        pending.append((name, overrides, wd))
    active: list[tuple[str, subprocess.Popen, float, str, Any]] = []
    while pending or active:
        while pending and len(active) < max(1, parallel):
            name, overrides, wd = pending.pop(0)
            os.makedirs(wd, exist_ok=True)
            prev = read_status(wd)
            log(f"[sweep] {name}: {'resuming' if prev else 'starting'}")
            _write_status(
                wd, {"status": "running", "overrides": overrides, "wall_s": prev.get("wall_s", 0.0)}
            )
            logf = open(os.path.join(wd, "sweep_run.log"), "a")
            proc = subprocess.Popen(
                command(config_path, wd, overrides), stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT
            )
            active.append((name, proc, time.time(), wd, (overrides, logf, prev)))
        time.sleep(0.2)
        for item in list(active):
            name, proc, start, wd, (overrides, logf, prev) = item
            if proc.poll() is None:
                continue
            active.remove(item)
            logf.close()
            wall = prev.get("wall_s", 0.0) + time.time() - start
            if proc.returncode == 0:
                _write_status(wd, {"status": "done", "overrides": overrides, "wall_s": wall})
                log(f"[sweep] {name}: done in {wall:.0f} s")
            else:
                err = _last_error(os.path.join(wd, "sweep_run.log"))
                _write_status(
                    wd,
                    {
                        "status": "failed",
                        "overrides": overrides,
                        "wall_s": wall,
                        "returncode": proc.returncode,
                        "error": err,
                    },
                )
                log(f"[sweep] {name}: FAILED (exit {proc.returncode}): {err}")
    rows = collect(root, names, runs, metric)
    write_results(root, rows, metric)
    return rows


def _last_error(log_path: str) -> str:
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return "no log"
    for ln in reversed(lines):
        if ln.lower().startswith(("error", "traceback")) or "Error" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def collect(root: str, names: list[str], runs: list[dict[str, Any]], metric: str) -> list[dict]:
    rows = []
    for name, overrides in zip(names, runs):
        wd = os.path.join(root, name)
        st = read_status(wd)
        final: dict[str, float] = {}
        best: dict[str, float] = {}
        step = 0
        try:
            with open(os.path.join(wd, "metrics.jsonl")) as f:
                for line in f:
                    rec = json.loads(line)
                    step = max(step, int(rec.get("step", 0)))
                    for k, v in rec.items():
                        if k == "step" or not isinstance(v, int | float):
                            continue
                        final[k] = v
                        lower_better = "loss" in k or "perplexity" in k
                        if k not in best or (v < best[k] if lower_better else v > best[k]):
                            best[k] = v
        except (OSError, ValueError):
            pass
        row = {
            "run": name,
            **{k: _cli_value(v) for k, v in overrides.items()},
            "status": st.get("status", "not started"),
            "steps": step,
            "wall_s": round(st.get("wall_s", 0.0), 1),
            f"final {metric}": final.get(metric, ""),
            f"best {metric}": best.get(metric, ""),
            "final eval/loss": final.get("eval/loss", ""),
            "error": st.get("error", ""),
        }
        rows.append(row)
    return rows


def write_results(root: str, rows: list[dict], metric: str) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(os.path.join(root, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    with open(os.path.join(root, "results.md"), "w") as f:
        f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        for r in rows:
            f.write("| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |\n")
    _plot(root, rows, metric)


def _plot(root: str, rows: list[dict], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vals = [(r["run"], r[f"best {metric}"]) for r in rows if r[f"best {metric}"] != ""]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(rows) + 2), 3.5))
    ax.bar(range(len(vals)), [v for _, v in vals])
    ax.set_xticks(range(len(vals)), [n for n, _ in vals], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"sweep: best {metric} per run")
    fig.tight_layout()
    fig.savefig(os.path.join(root, metric.replace("/", "_") + ".png"), dpi=100)
    plt.close(fig)
