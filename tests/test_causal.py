"""causal_lm through the fine-tune loop: character LM (tiny Shakespeare), resume, packed SFT
with LoRA (only adapters trained and checkpointed), export of the merged model to transformers,
and decoding from a workdir."""

import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import one_device_env

from lm import lora
from lm.checkpoint import Checkpointer
from lm.decode import DecodeError
from lm.experiment import ConfigError, base_config, load_config_file, validate
from lm.metrics import read_jsonl
from lm.train import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def char_config(steps=8, **over):
    c = base_config()
    c.task = "causal_lm"
    c.model.name = "tiny-gpt2"
    c.model.max_len = 16
    c.data.kind = "chars"
    c.data.max_len = 16
    c.data.max_eval_examples = 32
    c.train.num_steps = steps
    c.train.batch_size = 8  # the 8 fake devices of conftest split it
    c.train.eval_batch_size = 16
    c.train.log_every = 2
    c.train.eval_every = 0
    c.train.progress = False
    c.optim.lr = 3e-3
    c.optim.schedule = "constant"
    c.checkpoint.every_steps = 4
    c.checkpoint.async_save = False
    for k, v in over.items():
        section, name = k.split("__")
        c[section][name] = v
    return c


def sft_config(tmp_path, steps=2, rank=4):
    c = base_config()
    c.task = "causal_lm"
    c.model.name = "tiny"  # random Llama-style trunk with SmolLM2's vocabulary and template
    c.model.vocab_size = 49152
    c.data.kind = "sft"
    c.data.tokenizer = "smollm2-135m-instruct"
    c.data.name = "sst2_instruct"
    c.data.max_len = 96
    c.data.max_train_examples = 24
    c.data.max_eval_examples = 8
    c.data.cache_dir = str(tmp_path / "cache")
    c.lora.rank = rank
    c.lora.targets = ("q", "v", "up")
    c.train.num_steps = steps
    c.train.batch_size = 8
    c.train.eval_batch_size = 8
    c.train.log_every = 1
    c.train.progress = False
    c.optim.lr = 1e-2
    c.checkpoint.async_save = False
    return c


def test_configs_load_and_validate():
    for spec in ("shakespeare_char.py", "shakespeare_char.py:smoke", "sft_smollm2.py:smoke"):
        validate(load_config_file(os.path.join(ROOT, "configs", spec)))
    c = char_config()
    c.data.kind = "words"
    with pytest.raises(ConfigError, match="data.kind"):
        validate(c)
    c = char_config()
    c.lora.rank = 4
    c.lora.targets = ("q", "qq")
    with pytest.raises(ConfigError, match="lora.targets"):
        validate(c)


@pytest.mark.slow
def test_shakespeare_smoke_learns(tmp_path):
    """The README's Shakespeare command (its :smoke config, 200 steps) through the script, in a
    process with one CPU device: here conftest's 8 fake devices made the same run ~180 s."""
    wd = str(tmp_path / "run")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "finetune.py"),
         f"--config={os.path.join(ROOT, 'configs', 'shakespeare_char.py')}:smoke",
         f"--workdir={wd}", "--config.train.num_steps=200", "--config.train.progress=False",
         "--config.data.max_eval_examples=64"],
        env=one_device_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    rows = read_jsonl(os.path.join(wd, "metrics.jsonl"))
    assert {"train/loss", "eval/loss", "eval/perplexity"} <= set().union(*rows)
    # ln(65) = 4.17 at the start; 200 steps reach ~2.5.
    [final] = [r for r in rows if "eval/loss" in r and r["step"] == 200]
    assert final["eval/loss"] < 2.9


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("chars") / "run")
    summary = run(char_config(8), wd)
    return wd, summary


def test_preset_steps_compile_once_beside_the_init(tmp_path, caplog):
    """A preset's train and eval steps are compiled while its parameters initialize (lm.train
    _precompile); the loop's calls reuse those executables: one compilation each. The result
    is the sequential run's (same init, same batches)."""
    caplog.set_level("WARNING", logger="jax._src.dispatch")
    with jax.log_compiles(True):
        summary = run(char_config(3, optim__lr=2e-3), str(tmp_path / "a"))
    compiled = [r.getMessage() for r in caplog.records if "XLA compilation of" in r.getMessage()]
    assert sum("jit(train_step)" in m for m in compiled) == 1, compiled
    assert sum("jit(eval_step)" in m for m in compiled) == 1, compiled
    assert sum("jit(create_state)" in m for m in compiled) == 1, compiled
    from lm import train as lmtrain

    orig = lmtrain._precompile
    try:
        lmtrain._precompile = lambda *a: None  # the loop compiles on first use instead
        plain = run(char_config(3, optim__lr=2e-3), str(tmp_path / "b"))
    finally:
        lmtrain._precompile = orig
    assert summary["eval"]["eval/loss"] == plain["eval"]["eval/loss"]


def test_char_resume_equals_uninterrupted(char_run, tmp_path, monkeypatch):
    from lm import data as lmdata

    wd, full = char_run
    part = str(tmp_path / "part")
    real = lmdata.char_train_batch

    def dying(data, bs, context, seed, step):
        if step == 5:  # killed after step 5; the checkpoint of step 4 is complete
            raise KeyboardInterrupt("simulated kill")
        return real(data, bs, context, seed, step)

    monkeypatch.setattr(lmdata, "char_train_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        run(char_config(8), part)
    monkeypatch.setattr(lmdata, "char_train_batch", real)
    resumed = run(char_config(8), part)
    assert resumed["eval"]["eval/loss"] == pytest.approx(full["eval"]["eval/loss"], abs=1e-6)
    a = {r["step"]: r for r in read_jsonl(os.path.join(wd, "metrics.jsonl")) if "train/loss" in r}
    b = {r["step"]: r for r in read_jsonl(os.path.join(part, "metrics.jsonl")) if "train/loss" in r}
    assert a[8]["train/loss"] == pytest.approx(b[8]["train/loss"], abs=1e-6)
    assert os.path.exists(os.path.join(wd, "tokenizer", "char_vocab.json"))


def test_decode_from_char_workdir(char_run):

    from lm.decode import load_for_decode

    wd, _ = char_run
    m = load_for_decode(wd)
    assert (
        m.cfg.vocab_size == 65 and m.tokenizer.decode(m.tokenizer("To be")["input_ids"]) == "To be"
    )
    from test_decode_smollm2 import load_script

    script = load_script()  # one module per process: its absl flags can be defined once
    config = load_config_file(os.path.join(ROOT, "configs", "decode.py"))
    config.model = wd
    config.prompt = "ROMEO:"
    config.sampling = "sample"
    config.max_new_tokens = 8
    config.compilation_cache = ""
    out = io.StringIO()
    [row] = script.run(config, out=out, pretrained=m)
    assert len(row["token_ids"]) == 8 and row["completion"] and out.getvalue().strip()
    # Past the 16-character context: refused, or written on a sliding window (slide=True).
    config.max_new_tokens = 40
    with pytest.raises(DecodeError, match="sliding window"):
        script.run(config, out=io.StringIO(), pretrained=m)
    config.slide = True
    [row] = script.run(config, out=io.StringIO(), pretrained=m)
    assert len(row["token_ids"]) == 40 and len(row["completion"]) == 40


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    wd = str(tmp / "run")
    summary = run(sft_config(tmp), wd)
    return tmp, wd, summary


def test_sft_lora_trains_adapters_only(lora_run):
    tmp, wd, summary = lora_run
    assert np.isfinite(summary["eval"]["eval/loss"])
    ckpt = Checkpointer(os.path.join(wd, "checkpoints"))
    try:
        target = ckpt.host_target(ckpt.latest_step())
    finally:
        ckpt.close()
    names = {
        jax.tree_util.keystr(p)[-9:]
        for p, _ in jax.tree_util.tree_flatten_with_path(target["params"])[0]
    }
    assert names == {"'lora_a']", "'lora_b']"}  # the checkpoint holds adapters only
    opt_leaves = jax.tree.leaves(target["opt_state"])
    n_adapter = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(target["params"]))
    assert sum(int(np.prod(x.shape)) for x in opt_leaves) <= 2 * n_adapter + 16
    from lm.workdir import load_workdir

    m = load_workdir(wd)  # merged: base + A B alpha / r
    from lm.experiment import load_model

    base = load_model(sft_config(tmp)).params
    changed = [
        jax.tree_util.keystr(p)
        for (p, x), y in zip(
            jax.tree_util.tree_flatten_with_path(m.params)[0],
            jax.tree.leaves(lora.adapters_and_base(base)[1]),
        )
        if not np.array_equal(np.asarray(x), np.asarray(y))
    ]
    # Only kernels that carry adapters moved (q, v, up), nothing else.
    assert changed and all(any(t in c for t in ("'q'", "'v'", "'up'")) for c in changed)


def test_lora_export_matches_transformers_greedy(lora_run):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from lm.decode import generate
    from lm.workdir import export_workdir

    tmp, wd, _ = lora_run
    out, m = export_workdir(wd, str(tmp / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    tok = m.tokenizer
    for prompt in ("Review: a gorgeous film", "Classify the sentiment: dull and slow"):
        ids = tok(prompt)["input_ids"]
        [g] = generate(m.cfg, m.params, [ids], max_new_tokens=8, eos_ids=[])
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                pad_token_id=0,
            )[0, len(ids):].tolist()  # fmt: skip
        assert list(g.token_ids) == ref


def test_sft_bad_input(tmp_path):
    c = sft_config(tmp_path)
    c.data.name = ""
    with pytest.raises(ConfigError, match="train_files"):
        run(c, str(tmp_path / "x"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi"}) + "\n")
    c.data.train_files = str(bad)
    from lm.data import DataError

    with pytest.raises(DataError, match="bad.jsonl:1"):
        run(c, str(tmp_path / "y"))
