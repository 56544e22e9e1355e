"""Preemption and kill -9: a resumed run is bitwise the uninterrupted run (CPU, fp32).

The run is the real ``scripts/finetune.py`` in a subprocess on a tiny BERT (random init,
MiniLM's tokenizer) and small TSV files, so every launch costs seconds.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import one_device_env

from lm.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30

CONFIG = """
from lm.experiment import base_config


def get_config(arg=None):
    c = base_config()
    c.model.name = "tiny-bert"
    c.model.vocab_size = 30522
    c.model.num_labels = 2
    c.model.dropout_rate = 0.1
    c.data.tokenizer = "minilm-l6"
    c.data.train_files = {train!r}
    c.data.eval_files = {dev!r}
    c.data.max_len = 16
    c.data.cache_dir = {cache!r}
    c.train.num_steps = {steps}
    c.train.batch_size = 16
    c.train.log_every = 1
    c.train.eval_every = 10
    c.train.progress = False
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 2
    c.checkpoint.every_steps = 3
    c.checkpoint.keep = 2
    return c
"""


def _write_tsv(path, n, seed):
    rng = np.random.default_rng(seed)
    words = {1: ["good", "great", "fine", "nice"], 0: ["bad", "awful", "poor", "dull"]}
    lines = ["sentence\tlabel"]
    for _ in range(n):
        y = int(rng.integers(2))
        lines.append(" ".join(rng.choice(words[y], 3)) + " film" + ("\tpos" if y else "\tneg"))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("preempt")
    cfg = d / "tiny_config.py"
    cfg.write_text(
        CONFIG.format(
            train=_write_tsv(d / "train.tsv", 200, 0),
            dev=_write_tsv(d / "dev.tsv", 48, 1),
            cache=str(d / "cache"),
            steps=STEPS,
        )
    )
    ref = str(d / "reference")
    r = subprocess.run(_cmd(cfg, ref), capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return cfg, ref


def _cmd(cfg, workdir):
    return [
        sys.executable,
        os.path.join(ROOT, "scripts/finetune.py"),
        f"--config={cfg}",
        f"--workdir={workdir}",
    ]


# One CPU device in the runs: conftest's 8 fake devices made every launch 1.5-2x slower on 2
# cores (kill -9: 224 against 124 s; sharded checkpoints resuming bitwise: test_finetune's
# in-process run).
ENV = one_device_env()


def _losses(workdir):
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _evals(workdir):
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}


def _final_params(workdir):
    import jax

    from lm.classify import Classifier

    return [np.asarray(x) for x in jax.tree.leaves(Classifier.from_workdir(workdir, STEPS).params)]


def _assert_same_run(workdir, ref):
    assert _losses(workdir) == _losses(ref)  # every logged loss, bitwise
    assert _evals(workdir) == _evals(ref)
    for a, b in zip(_final_params(workdir), _final_params(ref), strict=True):
        np.testing.assert_array_equal(a, b)


def _logged_steps(workdir):
    try:
        return max(_losses(workdir), default=0)
    except (OSError, ValueError):
        return 0


def _writing_checkpoint(workdir):
    d = os.path.join(workdir, "checkpoints")
    return os.path.isdir(d) and any("tmp" in name for name in os.listdir(d))


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_exits_3_and_resumes_bitwise(setup, tmp_path):
    cfg, ref = setup
    wd = str(tmp_path / "run")
    proc = subprocess.Popen(
        _cmd(cfg, wd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    deadline = time.time() + 300
    while _logged_steps(wd) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    assert "preempted at step" in err
    step = int(err.split("preempted at step ")[1].split(":")[0])
    assert 4 <= step < STEPS
    ckpts = [int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()]
    assert step in ckpts  # the step it stopped at was written, whatever every_steps says
    r = subprocess.run(_cmd(cfg, wd), capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_run(wd, ref)


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_bitwise(setup, tmp_path):
    cfg, ref = setup
    wd = str(tmp_path / "run")
    rnd = random.Random(0)
    kills, during_write, launches = 0, 0, 0
    while True:
        launches += 1
        assert launches < 30, "the run never finished"
        proc = subprocess.Popen(
            _cmd(cfg, wd),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=ENV,
        )
        if kills >= 5 and during_write:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err.decode()[-3000:]
            break
        start_step = _logged_steps(wd)
        target = start_step + rnd.randint(1, 4)
        killed = False
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if not during_write and _writing_checkpoint(wd):
                os.killpg(proc.pid, signal.SIGKILL)  # mid-way through an (async) checkpoint write
                killed, during_write = True, during_write + 1
                break
            if during_write and _logged_steps(wd) >= target:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.002)
        proc.wait()
        if killed:
            kills += 1
        elif proc.returncode == 0:
            break  # finished before we got to kill it
        else:
            raise AssertionError(proc.stderr.read().decode()[-3000:])
    assert kills >= 5 and during_write >= 1, (kills, during_write)
    # Nothing half-written is left behind as a restorable checkpoint, and the run is the same.
    _assert_same_run(wd, ref)
    assert json.load(open(os.path.join(wd, "model.json")))["num_steps"] == STEPS
