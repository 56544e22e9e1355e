"""End to end through the scripts: fine-tune the real MiniLM on a slice of SST-2, then predict,
evaluate and export; the exported directory loads in transformers with the same logits."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(name, *args, check=True):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", name), *args],
        env=one_device_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and out.returncode:
        raise AssertionError(f"{name} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out


@pytest.mark.slow
def test_finetune_predict_evaluate_export(tmp_path):
    wd = str(tmp_path / "run")
    cfg = os.path.join(ROOT, "configs", "sst2_minilm.py") + ":smoke"
    out = script(
        "finetune.py",
        f"--config={cfg}",
        f"--workdir={wd}",
        "--config.train.num_steps=4",
        "--config.train.eval_every=2",
        "--config.checkpoint.every_steps=2",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["stopped"] == "finished"
    rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [2, 4]
    assert os.path.exists(os.path.join(wd, "curves.png"))

    texts = ["a gorgeous , witty , seductive movie .", "the plot is dull and the acting worse ."]
    pred = script("predict.py", f"--workdir={wd}", "--text", texts[0], "--text", texts[1])
    rows = [json.loads(x) for x in pred.stdout.strip().splitlines()]
    assert [r["text"] for r in rows] == texts
    for r in rows:
        assert set(r["probs"]) == {"0", "1"} and abs(sum(r["probs"].values()) - 1) < 1e-5
        assert r["label"] == max(r["probs"], key=r["probs"].get)

    (tmp_path / "in.tsv").write_text(
        "sentence\tlabel\n" + "\n".join(f"{t}\t0" for t in texts) + "\n"
    )
    script(
        "predict.py",
        f"--workdir={wd}",
        f"--input={tmp_path / 'in.tsv'}",
        f"--output={tmp_path / 'out.jsonl'}",
    )
    file_rows = [json.loads(x) for x in open(tmp_path / "out.jsonl")]
    assert [r["label"] for r in file_rows] == [r["label"] for r in rows]
    np.testing.assert_allclose(
        [r["probs"]["1"] for r in file_rows], [r["probs"]["1"] for r in rows], atol=1e-6
    )

    ev = json.loads(script("evaluate.py", f"--workdir={wd}").stdout.strip().splitlines()[-1])
    assert ev["num_examples"] == 256 and 0 <= ev["eval/accuracy"] <= 1
    best = [
        r
        for r in map(json.loads, open(os.path.join(wd, "metrics.jsonl")))
        if r["step"] == ev["step"] and "eval/accuracy" in r
    ]
    assert abs(best[0]["eval/accuracy"] - ev["eval/accuracy"]) < 1e-6

    hf = str(tmp_path / "hf")
    script("export.py", f"--workdir={wd}", f"--out={hf}")
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lm.classify import Classifier
    from lm.model import forward

    model = AutoModelForSequenceClassification.from_pretrained(hf).eval()
    assert model.config.id2label == {0: "0", 1: "1"}
    tok = AutoTokenizer.from_pretrained(hf)
    enc = tok(texts, padding=True, return_tensors="np")
    with torch.no_grad():
        theirs = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()
    clf = Classifier.from_workdir(wd)
    ours = forward(
        clf.cfg.replace(dtype="float32"),
        clf.params,
        enc["input_ids"],
        mask=enc["attention_mask"],
        token_types=enc["token_type_ids"],
    )["logits"]
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
    assert [model.config.id2label[i] for i in theirs.argmax(-1)] == [r["label"] for r in rows]


def test_scripts_reject_bad_config_before_any_work(tmp_path):
    cfg = os.path.join(ROOT, "configs", "sst2_minilm.py")
    out = script(
        "finetune.py",
        f"--config={cfg}",
        f"--workdir={tmp_path}",
        "--config.optim.lrr=1",
        check=False,
    )
    assert out.returncode == 2 and "did you mean optim.lr" in out.stderr
    out = script(
        "finetune.py",
        f"--config={cfg}",
        f"--workdir={tmp_path}",
        "--config.train.batch_size=lots",
        check=False,
    )
    assert out.returncode == 2 and "config.train.batch_size expects int" in out.stderr
    assert not os.path.exists(tmp_path / "checkpoints")
