"""Two processes x 4 CPU devices (gloo collectives) train like one process with 8 devices.

``scripts/launch_local.py`` starts two copies of ``scripts/finetune.py`` on 127.0.0.1; they
meet through ``lm.distributed.initialize`` (called by ``lm.train.run``) (LM_COORDINATOR / LM_NUM_PROCESSES / LM_PROCESS_ID),
train a tiny BERT-shaped classifier on a small TSV, save an Orbax checkpoint, and log the same
per-step losses as ``lm.train.run`` in this (8-device) process.
"""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def write_tsv(path, n, seed):
    rng = random.Random(seed)
    pos, neg = "good great fine lovely superb".split(), "bad awful poor ugly dull".split()
    filler = "the a movie film plot acting was is very quite".split()
    with open(path, "w") as f:
        f.write("sentence\tlabel\n")
        for _ in range(n):
            label = rng.randint(0, 1)
            words = rng.choices(filler, k=rng.randint(3, 8)) + [rng.choice(pos if label else neg)]
            rng.shuffle(words)
            f.write(" ".join(words) + f"\t{label}\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny BERT as an HF directory (random weights, MiniLM's tokenizer) and a training TSV."""
    from lm.config import preset
    from lm.convert.hf import save_hf_dir
    from lm.model import init_params
    from lm.pretrained import resolve
    from lm.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("mp")
    cfg = preset("tiny-bert", vocab_size=30522, max_len=64)
    model_dir = str(root / "tinybert")
    save_hf_dir(cfg, init_params(cfg, 0), model_dir, load_tokenizer(resolve("minilm-l6")))
    train = str(root / "train.tsv")
    write_tsv(train, 128, 0)
    overrides = dict(
        model=dict(name=model_dir, dtype="float32", dropout_rate=0.0, attn_dropout_rate=0.0),
        data=dict(name="", train_files=train, max_len=32, cache_dir=str(root / "cache")),
        train=dict(num_steps=STEPS, batch_size=16, log_every=1, eval_every=0, progress=False),
        optim=dict(lr=1e-3, warmup_steps=0),
        checkpoint=dict(every_steps=STEPS, async_save=True),
    )
    return root, overrides


def make_config(overrides):
    sys.path.insert(0, REPO)
    from lm.experiment import load_config_file

    config = load_config_file(os.path.join(REPO, "configs/sst2_minilm.py"))
    for section, values in overrides.items():
        for k, v in values.items():
            config[section][k] = v
    return config


def flags(overrides):
    return [f"--config.{s}.{k}={v}" for s, vals in overrides.items() for k, v in vals.items()]


def train_losses(workdir):
    """Per-step train/loss from metrics.jsonl (process 0 alone writes it: one row per step)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if "train/loss" in line]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), steps
    return [r["train/loss"] for r in rows]


@pytest.mark.slow
def test_two_processes_match_one_process(setup):
    import jax

    from lm.train import run

    root, overrides = setup
    assert jax.device_count() == 8
    ref_dir = str(root / "one")
    run(make_config(overrides), ref_dir)
    ref = train_losses(ref_dir)
    assert len(ref) == STEPS

    work = str(root / "two")
    cmd = [
        sys.executable,
        os.path.join(REPO, "scripts/launch_local.py"),
        "--num_processes=2",
        "--devices_per_process=4",
        "--",
        os.path.join(REPO, "scripts/finetune.py"),
        f"--config={os.path.join(REPO, 'configs/sst2_minilm.py')}",
        f"--workdir={work}",
        *flags(overrides),
    ]
    from conftest import one_device_env

    # This process's compiler flags (conftest's optimization level: the reference run above
    # compiled with them); launch_local replaces the device count with 4 per process.
    env = {k: v for k, v in one_device_env().items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "[p0]" in log and "[p1]" in log
    np.testing.assert_allclose(train_losses(work), ref, rtol=0, atol=1e-5)
    # One Orbax checkpoint, written jointly and complete (Orbax renames it when every process
    # is done), holding the same parameters; it restores in this 8-device process.
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == [str(STEPS)]
    from lm.checkpoint import Checkpointer

    params, _ = Checkpointer(os.path.join(work, "checkpoints")).restore_params(STEPS)
    ref_params, _ = Checkpointer(os.path.join(ref_dir, "checkpoints")).restore_params(STEPS)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_launch_local_reports_a_failing_child(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "import os, sys\n"
        "print('id', os.environ['LM_PROCESS_ID'], os.environ['LM_NUM_PROCESSES'],\n"
        "      os.environ['LM_COORDINATOR'], os.environ['XLA_FLAGS'])\n"
        "sys.exit(3 if os.environ['LM_PROCESS_ID'] == '1' else 0)\n"
    )
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts/launch_local.py"), "--num_processes=2",
         "--devices_per_process=4", "--", str(script)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 3, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    p0 = next(line for line in lines if line.startswith("[p0] id"))
    assert "id 0 2 127.0.0.1:" in p0 and p0.endswith("--xla_force_host_platform_device_count=4")
    assert any(line.startswith("[p1] id 1 2 127.0.0.1:") for line in lines)
