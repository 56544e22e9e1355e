"""SST-2 fine-tune recipe: ours against transformers + PyTorch, in one run, with the ratio.

    python scripts/bench_finetune.py                      # the full recipe (~1 h on 2 cores)
    python scripts/bench_finetune.py --max_steps=200      # a quick check of both
    python scripts/bench_finetune.py --only=ours --config.optim.lr=1e-4 ...

Recipe (issue 3): all-MiniLM-L6-v2, SST-2 train (67,349 sentences), 1 epoch, batch 32,
max_len 64, AdamW lr 5e-5, weight decay 0.01 (not on biases and LayerNorm), 6% warmup then
linear decay, clip 1.0, dropout 0.1; accuracy on the 872 dev sentences.

The PyTorch side is what transformers' Trainer does for this recipe: BertForSequenceClassification
in train mode, random batches padded to their longest sentence (dynamic padding), same
tokenization (lm.data's, the checkpoint's fast tokenizer) and the same batch order as ours
without length grouping. Ours is ``scripts/finetune.py --config=configs/sst2_minilm.py`` (its
defaults: buckets and length-grouped batches, compute dtype "auto") in a subprocess, with
evaluation and checkpoints only at the end. examples/s counts the whole training loop,
compilation included, and excludes evaluation.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_ours(max_steps: int, overrides: list[str], workdir: str) -> dict:
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts", "finetune.py"),
        f"--config={os.path.join(ROOT, 'configs', 'sst2_minilm.py')}",
        f"--workdir={workdir}",
        "--config.train.eval_every=0",
        "--config.checkpoint.every_steps=0",
        "--config.train.progress=False",
        "--config.overwrite=True",
    ]
    if max_steps:
        cmd.append(f"--config.train.num_steps={max_steps}")
    cmd += overrides
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        sys.exit(f"our run failed:\n{out.stderr[-3000:]}")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    with open(os.path.join(workdir, "model.json")) as f:
        info = json.load(f)
    return dict(
        accuracy=summary["eval"]["eval/accuracy"],
        examples_per_s=summary["train_examples_per_s"],
        steps=summary["step"],
        wall_s=wall,
        dtype=info["model_config"]["dtype"],
    )


def run_torch(max_steps: int, seed: int = 0) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    from lm import data as lmdata
    from lm.pretrained import resolve
    from lm.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 2)
    path = resolve("minilm-l6")
    ds = lmdata.load_classification(load_tokenizer(path), 64, **lmdata.sst2_files())
    n, bs = len(ds.train), 32
    steps = max_steps or lmdata.num_train_steps(n, bs, 1.0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model.train()
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {
            "params": [p for k, p in model.named_parameters() if not k.endswith(no_decay)],
            "weight_decay": 0.01,
        },
        {
            "params": [p for k, p in model.named_parameters() if k.endswith(no_decay)],
            "weight_decay": 0.0,
        },
    ]
    opt = torch.optim.AdamW(groups, lr=5e-5)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(0.06 * steps), steps)

    def batch(tok, idx):
        lengths = tok.lengths[idx]
        t = int(lengths.max())
        ids = np.full((len(idx), t), tok.pad_id, np.int64)
        for r, i in enumerate(idx):
            ids[r, : lengths[r]] = tok.example(int(i))[0]
        mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
        return (
            torch.from_numpy(ids),
            torch.from_numpy(mask),
            torch.from_numpy(tok.labels[idx].astype(np.int64)),
        )

    t0 = time.perf_counter()
    for step in range(steps):
        ids, mask, labels = batch(ds.train, lmdata.train_indices(n, bs, seed, step))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for idx, w in lmdata.eval_index_batches(len(ds.eval), 64):
            ids, mask, labels = batch(ds.eval, idx)
            pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
            correct += float(((pred == labels).numpy() * w).sum())
    return dict(
        accuracy=correct / len(ds.eval),
        examples_per_s=steps * bs / train_s,
        steps=steps,
        wall_s=train_s,
        dtype="float32",
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--max_steps", type=int, default=0, help="0: the full epoch (2105 steps)")
    p.add_argument("--only", choices=["both", "ours", "torch"], default="both")
    p.add_argument("--workdir", default=None, help="our run's workdir (default: a temp dir)")
    args, overrides = p.parse_known_args()
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        p.error(f"unknown arguments {bad}")
    results = {}
    if args.only in ("both", "torch"):
        results["torch"] = run_torch(args.max_steps)
        print("torch:", json.dumps(results["torch"]), flush=True)
    if args.only in ("both", "ours"):
        with tempfile.TemporaryDirectory() as tmp:
            results["ours"] = run_ours(args.max_steps, overrides, args.workdir or tmp)
        print("ours: ", json.dumps(results["ours"]), flush=True)
    if len(results) == 2:
        o, t = results["ours"], results["torch"]
        print(
            f"\nSST-2, MiniLM-L6, {o['steps']} steps of 32: "
            f"dev accuracy ours {o['accuracy']:.4f} vs torch {t['accuracy']:.4f} "
            f"({100 * (o['accuracy'] - t['accuracy']):+.2f} points); "
            f"train examples/s ours {o['examples_per_s']:.1f} vs torch {t['examples_per_s']:.1f} "
            f"= {o['examples_per_s'] / t['examples_per_s']:.2f}x"
        )


if __name__ == "__main__":
    main()
