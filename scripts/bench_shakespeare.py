r"""Time the Shakespeare baby-GPT recipe: lm (scripts/finetune.py's loop) against the same model
trained with transformers + PyTorch, in one run, on the same batches, schedule and eval set.

    python scripts/bench_shakespeare.py [--steps=2000] [--only=lm|torch] [--order=lm,torch]

The reference is ``GPT2LMHeadModel`` (n_embd 128, n_layer 4, n_head 4, n_positions 64, vocab =
the 65 characters, dropout 0, tied embeddings; GPT-2 keeps its biases), AdamW (beta2 0.99,
weight decay 0.1 on matrices only), lr from lm.optim's schedule (100 warmup steps, cosine to
1e-4), global-norm clip 1.0, ``torch.set_num_threads(2)``. Both read batch ``s`` from
``lm.causal`` (12 windows of 64 characters) and are evaluated on every non-overlapping window
of the held-out 10%. Wall time: lm's is the whole ``lm.train.run`` (data, init, compile,
training, final eval, checkpoint); PyTorch's is model build + training + the same eval.
Prints one JSON line per framework and the ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs", "shakespeare_char.py"
)


def run_lm(steps: int) -> dict:
    from lm.experiment import load_config_file
    from lm.train import run

    config = load_config_file(CONFIG)
    config.train.num_steps = steps
    config.train.progress = False
    config.train.log_every = max(steps // 4, 1)
    config.checkpoint.every_steps = 0
    with tempfile.TemporaryDirectory() as wd:
        t0 = time.perf_counter()
        summary = run(config, wd)
        wall = time.perf_counter() - t0
    return dict(framework="lm (jax)", wall_s=wall, eval_loss=summary["eval"]["eval/loss"])


def run_torch(steps: int) -> dict:
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lm import causal
    from lm.experiment import load_config_file
    from lm.optim import make_schedule, warmup_steps

    torch.set_num_threads(2)
    config = load_config_file(CONFIG)
    o, t = config.optim, config.train
    data = causal.load_data(config)
    schedule = make_schedule(o.lr, steps, warmup_steps(o, steps), o.schedule, o.end_lr)
    lrs = np.asarray([float(schedule(i)) for i in range(steps)])

    t0 = time.perf_counter()
    torch.manual_seed(int(t.seed))
    hf = GPT2Config(
        vocab_size=data.vocab_size,
        n_positions=int(config.data.max_len),
        n_embd=128,
        n_layer=4,
        n_head=4,
        n_inner=512,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = GPT2LMHeadModel(hf)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.b1, o.b2),
        eps=o.eps,
    )
    for step in range(steps):
        b = data.train_batch(int(t.batch_size), int(t.seed), step)
        x = torch.from_numpy(b["tokens"]).long()
        y = torch.from_numpy(b["targets"]).long()
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        for g in opt.param_groups:
            g["lr"] = float(lrs[step])
        opt.step()
    model.eval()
    total, weight = 0.0, 0.0
    with torch.no_grad():
        for b in data.eval_batches(256):
            x = torch.from_numpy(b["tokens"]).long()
            y = torch.from_numpy(b["targets"]).long()
            w = torch.from_numpy(b["loss_mask"])
            logits = model(input_ids=x).logits
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
            )
            total += float((ce * w.reshape(-1)).sum())
            weight += float(w.sum())
    wall = time.perf_counter() - t0
    return dict(framework="transformers+pytorch", wall_s=wall, eval_loss=total / weight)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--order", default="lm,torch", help="which runs first: lm,torch or torch,lm")
    ap.add_argument("--only", choices=["both", "lm", "torch"], default="both")
    args = ap.parse_args()
    runs = {"lm": run_lm, "torch": run_torch}
    order = args.order.split(",")
    if sorted(order) != ["lm", "torch"]:
        ap.error(f"--order={args.order!r}: give lm,torch or torch,lm")
    out = {}
    for name in order:
        if args.only not in ("both", name):
            continue
        r = runs[name](args.steps)
        r.update(steps=args.steps, eval_perplexity=math.exp(r["eval_loss"]))
        print(json.dumps(r), flush=True)
        out[name] = r
    if len(out) == 2:
        print(
            json.dumps(
                dict(
                    wall_ratio_lm_over_torch=out["lm"]["wall_s"] / out["torch"]["wall_s"],
                    eval_loss_lm=out["lm"]["eval_loss"],
                    eval_loss_torch=out["torch"]["eval_loss"],
                )
            )
        )


if __name__ == "__main__":
    main()
