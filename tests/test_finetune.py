"""The fine-tune loop end to end on a tiny model and local files: training, resume, bad input.

A tiny BERT (random init, MiniLM's tokenizer) learns "does the sentence say good or bad" from
TSV files written here, so every test runs the real loop (data -> jit -> checkpoints -> logs)
in seconds.
"""

import json
import os

import numpy as np
import pytest

from lm import data as lmdata
from lm import experiment
from lm.experiment import ConfigError, base_config, check_overrides, validate
from lm.metrics import read_jsonl
from lm.train import TrainingError, WorkdirError, run

GOOD = ["good", "great", "fine", "nice", "superb", "lovely"]
BAD = ["bad", "awful", "poor", "dull", "boring", "weak"]
FILL = ["the", "film", "plot", "was", "really", "quite", "a", "story", "actors", "show"]


def write_tsv(path, n, seed, header=True, extra_rows=()):
    rng = np.random.default_rng(seed)
    lines = ["sentence\tlabel"] if header else []
    for _ in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(GOOD if label else BAD, int(rng.integers(2, 6))))
        words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(FILL)))
        lines.append(" ".join(words) + ("\tpos" if label else "\tneg"))
    lines.extend(extra_rows)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def files(tmp_path):
    return (
        write_tsv(tmp_path / "train.tsv", 256, 0),
        write_tsv(tmp_path / "dev.tsv", 64, 1),
    )


def tiny_config(train, dev, tmp_path, **over):
    c = base_config()
    c.model.name = "tiny-bert"
    c.model.vocab_size = 30522
    c.model.num_labels = 2
    c.model.dropout_rate = 0.1
    c.data.tokenizer = "minilm-l6"
    c.data.train_files = train
    c.data.eval_files = dev
    c.data.max_len = 16
    c.data.cache_dir = str(tmp_path / "cache")
    c.train.num_steps = 24
    c.train.batch_size = 16
    c.train.log_every = 1
    c.train.eval_every = 6
    c.train.progress = False
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 2
    c.checkpoint.every_steps = 4
    c.checkpoint.keep = 2
    for k, v in over.items():
        section, _, key = k.partition(".")
        c[section][key] = v
    return c


def losses(workdir):
    return [
        r["train/loss"]
        for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if "train/loss" in r
    ]


@pytest.mark.slow
def test_tiny_run_learns_logs_and_resumes_bitwise(files, tmp_path, monkeypatch):
    train, dev = files
    # lr 2e-2: at 1e-2 this random-init model is still on the loss plateau after 24 steps for
    # some dropout streams; at 2e-2 the loss falls to ~0.1-0.2x for every seed tried.
    cfg = tiny_config(train, dev, tmp_path, **{"optim.lr": 2e-2})
    full = str(tmp_path / "full")
    out = run(cfg, full)
    assert out["step"] == 24 and out["stopped"] == "finished"
    ls = losses(full)
    assert len(ls) == 24 and np.mean(ls[-4:]) < 0.8 * np.mean(ls[:4]), ls
    for name in ("config.json", "model.json", "metrics.jsonl", "curves.png", "tokenizer"):
        assert os.path.exists(os.path.join(full, name)), name
    assert any(f.startswith("events.out") for f in os.listdir(os.path.join(full, "tb")))
    rows = read_jsonl(os.path.join(full, "metrics.jsonl"))
    assert {"train/loss", "train/lr", "train/examples_per_s"} <= set(rows[0])
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [6, 12, 18, 24]
    assert {"eval/loss", "eval/accuracy", "eval/f1"} <= set(evals[0])
    # keep=2 last + the best by eval/accuracy
    steps = sorted(int(s) for s in os.listdir(os.path.join(full, "checkpoints")) if s.isdigit())
    best = max(evals, key=lambda r: (r["eval/accuracy"], r["step"]))["step"]
    assert steps == sorted({20, 24, best})

    # The same run, killed after step 9 (a checkpoint exists at 8), then relaunched.
    part = str(tmp_path / "part")
    real = lmdata.classification_train_batch

    def dying(data, bs, seed, step, *a, **k):
        if step == 9:
            raise KeyboardInterrupt("simulated kill")
        return real(data, bs, seed, step, *a, **k)

    monkeypatch.setattr(lmdata, "classification_train_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, part)
    monkeypatch.setattr(lmdata, "classification_train_batch", real)
    assert run(cfg, part)["step"] == 24
    assert losses(part) == ls  # bitwise: same batches, same dropout keys, same updates
    from lm.classify import Classifier

    a, b = Classifier.from_workdir(full, 24), Classifier.from_workdir(part, 24)
    for x, y in zip(_leaves(a.params), _leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)
    # A relaunch of a finished run does nothing.
    assert run(cfg, part)["stopped"] == "finished"


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(files, tmp_path, monkeypatch):
    train, dev = files
    cfg = tiny_config(train, dev, tmp_path)
    real = lmdata.classification_train_batch

    def poisoned(data, bs, seed, step, *a, **k):
        batch = real(data, bs, seed, step, *a, **k)
        if step == 5:  # the 6th update
            batch["weights"] = np.full_like(batch["weights"], np.nan)
        return batch

    monkeypatch.setattr(lmdata, "classification_train_batch", poisoned)
    wd = str(tmp_path / "nan")
    with pytest.raises(TrainingError, match=r"nan at step 6.*last good checkpoint is step 4"):
        run(cfg, wd)
    steps = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
    assert steps == [4]


@pytest.mark.slow
def test_workdir_with_another_run_is_refused_unless_overwrite(files, tmp_path):
    train, dev = files
    wd = str(tmp_path / "w")
    run(tiny_config(train, dev, tmp_path), wd)
    other = tiny_config(train, dev, tmp_path, **{"model.name": "tiny-gpt2"})
    with pytest.raises(
        WorkdirError, match=r"model.name: 'tiny-bert' in the workdir, 'tiny-gpt2' now"
    ):
        run(other, wd)
    other = tiny_config(train, dev, tmp_path, **{"train.seed": 1})
    with pytest.raises(WorkdirError, match=r"train.seed: 0 in the workdir, 1 now"):
        run(other, wd)
    other.overwrite = True
    assert run(other, wd)["step"] == 24
    with open(os.path.join(wd, "config.json")) as f:
        assert json.load(f)["train"]["seed"] == 1


def test_config_errors_name_key_and_close_matches():
    c = base_config()
    with pytest.raises(ConfigError, match=r"'optim.lrr'; did you mean optim.lr"):
        check_overrides(c, ["--config.optim.lrr=3"])
    with pytest.raises(ConfigError, match=r"config.train.batch_size expects int, got 'big'"):
        check_overrides(c, ["--config.train.batch_size=big"])
    with pytest.raises(ConfigError, match=r"did you mean train.seed"):
        check_overrides(c, ["--config.trian.seed=1"])
    c.optim.schedule = "cosin"
    with pytest.raises(ConfigError, match=r"'cosin' is not one of .*did you mean cosine"):
        validate(c)
    c = base_config()
    c.model.attention_impl = "natve"
    with pytest.raises(ConfigError, match=r"model.attention_impl='natve' is not one of .*native"):
        validate(c)
    c = base_config()
    c.model.block_impl = "nativ"
    with pytest.raises(ConfigError, match=r"model.block_impl='nativ' is not one of .*native"):
        validate(c)
    c = base_config()
    c.train.typo_key = 3
    with pytest.raises(ConfigError, match=r"unknown config key 'train.typo_key'"):
        validate(c)
    c = base_config()
    with pytest.raises(TypeError):  # ml_collections keeps types: a str where an int belongs
        c.train.batch_size = "32"
    c.optim.grad_accum = 3
    with pytest.raises(ConfigError, match=r"grad_accum=3 must be >= 1 and divide"):
        validate(c)


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("missing", r"nope.tsv: no such file"),
        ("empty", r"empty.tsv: file is empty"),
        ("columns", r"bad.tsv:4"),
        ("label", r"bad.tsv:4.*'meh'"),
        ("utf8", r"latin.tsv:3: not UTF-8"),
    ],
)
def test_bad_data_is_reported_before_training(files, tmp_path, case, pattern):
    train, dev = files
    over = {}
    if case == "missing":
        over["data.train_files"] = str(tmp_path / "nope.tsv")
    elif case == "empty":
        (tmp_path / "empty.tsv").write_text("")
        over["data.train_files"] = str(tmp_path / "empty.tsv")
    elif case == "columns":
        over["data.train_files"] = write_tsv(tmp_path / "bad.tsv", 2, 0, extra_rows=["just text"])
    elif case == "label":
        over["data.train_files"] = write_tsv(tmp_path / "bad.tsv", 2, 0, extra_rows=["so so\tmeh"])
        over["data.labels"] = ("neg", "pos")
    else:
        (tmp_path / "latin.tsv").write_bytes(b"sentence\tlabel\nok film\tpos\ncaf\xe9 film\tneg\n")
        over["data.train_files"] = str(tmp_path / "latin.tsv")
    cfg = tiny_config(train, dev, tmp_path, **over)
    with pytest.raises(lmdata.DataError, match=pattern):
        run(cfg, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_headerless_csv_with_two_text_columns_through_overrides(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(64):
        y = int(rng.integers(2))
        rows.append(
            f'{"yes" if y else "no"},"{rng.choice(FILL)}, {rng.choice(GOOD if y else BAD)}","{rng.choice(FILL)}"'
        )
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    c = tiny_config(str(tmp_path / "d.csv"), str(tmp_path / "d.csv"), tmp_path)
    c.data.has_header = False
    c.data.text_columns = (1, 2)
    c.data.label_column = 0
    out = run(c, str(tmp_path / "w"))
    assert out["step"] == 24
    with open(tmp_path / "w" / "model.json") as f:
        assert json.load(f)["labels"] == ["no", "yes"]
    assert experiment.data_kwargs(c)["text_columns"] == (1, 2)


def test_early_stopping_on_eval_loss(files, tmp_path):
    train, dev = files
    cfg = tiny_config(
        train, dev, tmp_path, **{"train.early_stop_metric": "eval/loss", "train.patience": 1}
    )
    wd = str(tmp_path / "es")
    out = run(cfg, wd)
    evals = [r for r in read_jsonl(os.path.join(wd, "metrics.jsonl")) if "eval/loss" in r]
    # Stops at the first evaluation whose loss is not below the best so far.
    worse = next(
        i
        for i in range(1, len(evals))
        if evals[i]["eval/loss"] >= min(e["eval/loss"] for e in evals[:i])
    )
    assert out["step"] == evals[worse]["step"] < 24
    assert out["stopped"].startswith("early stop: eval/loss")
    assert out["best_step"] == min(evals[: worse + 1], key=lambda e: e["eval/loss"])["step"]
    assert run(cfg, wd)["stopped"] == out["stopped"]  # a relaunch does not train on
