"""Sweeps: override builders, validation before any run, results tables, relaunch after a kill."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import one_device_env

from lm import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "sst2_minilm.py")
CHARS = os.path.join(ROOT, "configs", "shakespeare_char.py")


def test_builders():
    h = sweep.Hyper(seed=0)
    runs = h.product(
        [h.sweep("config.optim.lr", [1e-4, 5e-5]), h.sweep("train.batch_size", [8, 16])]
    )
    assert runs == [
        {"config.optim.lr": 1e-4, "train.batch_size": 8},
        {"config.optim.lr": 1e-4, "train.batch_size": 16},
        {"config.optim.lr": 5e-5, "train.batch_size": 8},
        {"config.optim.lr": 5e-5, "train.batch_size": 16},
    ]
    assert h.zip([h.sweep("a", [1, 2]), h.sweep("b", [3, 4])]) == [
        {"a": 1, "b": 3},
        {"a": 2, "b": 4},
    ]
    with pytest.raises(sweep.SweepError, match="equal length"):
        h.zip([h.sweep("a", [1, 2]), h.sweep("b", [3])])
    a = sweep.Hyper(seed=3).loguniform("lr", 1e-5, 1e-3, 4)
    assert a == sweep.Hyper(seed=3).loguniform("lr", 1e-5, 1e-3, 4)
    assert all(1e-5 <= r["lr"] <= 1e-3 for r in a)
    assert len({r["x"] for r in sweep.Hyper(1).choice("x", [1, 2, 3], 20)}) > 1


def test_named_sweep_loads_and_validates():
    runs = sweep.load_sweep(CONFIG + ":smoke", "lr_batch")
    assert len(runs) == 4 and runs[0] == {"optim.lr": 1e-4, "train.batch_size": 16}
    sweep.validate(sweep.load_config(CONFIG + ":smoke"), runs, CONFIG)


def test_unknown_key_refused_before_any_run(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_sweep(h):\n    return h.sweep('config.optim.lrate', [1e-4])\n")
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts/sweep.py"),
            f"--config={CONFIG}:smoke",
            f"--sweep={bad}",
            f"--workdir={tmp_path / 'w'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "config has no key 'optim.lrate'" in r.stderr and "did you mean lr?" in r.stderr
    assert not (tmp_path / "w").exists()  # nothing started


def test_print_commands(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts/sweep.py"),
            f"--config={CONFIG}:smoke",
            "--sweep=lr_batch",
            f"--workdir={tmp_path}",
            "--print-commands",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 4
    assert "--config.optim.lr=5e-05" in lines[2] and "--config.train.batch_size=16" in lines[2]


def test_results_tables_from_metrics(tmp_path):
    runs = [{"optim.lr": 1e-4}, {"optim.lr": 5e-5}]
    names = [sweep.run_name(i, r) for i, r in enumerate(runs)]
    for name, accs in zip(names, [[0.6, 0.8, 0.7], [0.5, 0.55, 0.9]]):
        wd = tmp_path / name
        wd.mkdir()
        with open(wd / "metrics.jsonl", "w") as f:
            for i, a in enumerate(accs):
                f.write(
                    json.dumps({"step": 10 * (i + 1), "eval/accuracy": a, "eval/loss": 1 - a})
                    + "\n"
                )
        (wd / "sweep_status.json").write_text(json.dumps({"status": "done", "wall_s": 3.0}))
    rows = sweep.collect(str(tmp_path), names, runs, "eval/accuracy")
    sweep.write_results(str(tmp_path), rows, "eval/accuracy")
    assert [r["best eval/accuracy"] for r in rows] == [0.8, 0.9]
    assert [r["final eval/accuracy"] for r in rows] == [0.7, 0.9]
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (tmp_path / "eval_accuracy.png").stat().st_size > 1000
    assert "| 000-lr=0.0001 |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_sweep_killed_half_way_and_relaunched_finishes(tmp_path):
    """The runner and its fine-tune killed together (kill -9 of the process group) once the
    second run has a checkpoint; a relaunch skips the finished run and resumes the other. The
    Shakespeare config (a tiny GPT, ~9 s a launch against MiniLM's ~25 s): its runs' metric is
    the config's early_stop_metric, eval/loss."""
    sweep_file = tmp_path / "two.py"
    sweep_file.write_text(
        "def get_sweep(h):\n"
        "    return h.product([h.sweep('config.optim.lr', [2e-3, 1e-3]),\n"
        "                      h.fixed('config.train.num_steps', 4),\n"
        "                      h.fixed('config.train.eval_every', 2),\n"
        "                      h.fixed('config.checkpoint.every_steps', 1),\n"
        "                      h.fixed('config.data.max_eval_examples', 32),\n"
        "                      h.fixed('config.train.progress', False)])\n"
    )
    wd = tmp_path / "sweep"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts/sweep.py"),
        f"--config={CHARS}:smoke",
        f"--sweep={sweep_file}",
        f"--workdir={wd}",
    ]
    names = [sweep.run_name(i, r) for i, r in enumerate(sweep.load_sweep(CHARS, str(sweep_file)))]
    env = one_device_env()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    deadline = time.time() + 600
    # Kill the whole sweep (runner and its fine-tune) once the second run has made progress.
    while time.time() < deadline:
        if (
            sweep.read_status(str(wd / names[0])).get("status") == "done"
            and (wd / names[1] / "checkpoints").exists()
        ):
            break
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sweep.read_status(str(wd / names[1])).get("status") == "running"

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"{names[0]}: finished earlier, skipped" in r.stdout
    assert f"{names[1]}: resuming" in r.stdout
    with open(wd / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["status"] for row in rows] == ["done", "done"]
    assert all(int(row["steps"]) == 4 for row in rows)
    for name, row in zip(names, rows):  # the table's best is the lowest eval/loss logged
        losses = [r["eval/loss"] for r in map(json.loads, open(wd / name / "metrics.jsonl"))
                  if "eval/loss" in r]  # fmt: skip
        assert len(losses) == 2 and float(row["best eval/loss"]) == min(losses) < 4.17  # ln 65
    assert (wd / "eval_loss.png").stat().st_size > 1000
