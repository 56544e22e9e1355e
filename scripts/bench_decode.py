"""Decode speed of lm against transformers + PyTorch (CPU), measured in one run.

    python scripts/bench_decode.py                      # all cases, 3 repeats, medians
    python scripts/bench_decode.py --cases=b1_fp32,prefill --repeats=5

Cases (SmolLM2-135M-Instruct, greedy, ``--new_tokens`` new tokens, no early stop):
    b1_fp32   batch 1, float32 weights           target >= 1.3x torch fp32
    b1_bf16   batch 1, bfloat16 weights          target >= 2.5x torch fp32
    b16_fp32  batch 16, float32                  target >= 3x torch fp32 (bf16 line: same ref)
    b16_bf16  batch 16, bfloat16
    prefill   one 512-token prompt: the forward pass that fills the cache, float32 and bfloat16
              (target <= 0.8x torch's time)

lm decodes through lm.native's kernels (AVX-512 or AVX2 + FMA) where they are available (``LM_NATIVE=0 python
scripts/bench_decode.py`` measures XLA's dot alone). Throughput counts generated tokens over the
whole call (prefill included), as a user sees it.
Compile time is reported separately (first call of each bucket). Both sides use 2 threads;
torch runs transformers' own ``generate`` (sdpa attention, its dynamic KV cache) and, for the
prefill, one forward with ``logits_to_keep=1`` (what generate's prefill computes). Each batch
size alternates its cases (lm float32, lm bfloat16, torch) call by call for ``--repeats``
rounds, so a drift of the shared host's speed falls on both sides.
"""

import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = ["b1_fp32", "b1_bf16", "b16_fp32", "b16_bf16", "prefill"]
flags.DEFINE_list("cases", CASES, f"subset of {CASES}")
flags.DEFINE_integer("new_tokens", 128, "tokens generated per prompt")
flags.DEFINE_integer("repeats", 3, "timed repeats per case (median reported)")
flags.DEFINE_integer("prefill_len", 512, "prompt length of the prefill case")
flags.DEFINE_bool("torch", True, "also run transformers + PyTorch")
flags.DEFINE_string("model", "smollm2-135m-instruct", "checkpoint (a Llama-family decoder)")
FLAGS = flags.FLAGS

PROMPTS = [
    "The history of the printing press begins",
    "Write a short poem about the sea.",
    "In machine learning, a transformer is",
    "The recipe for a good loaf of bread",
    "Once upon a time in a quiet village,",
    "The main causes of the French Revolution were",
    "Explain why the sky is blue.",
    "def quicksort(arr):",
    "The best way to learn a new language is",
    "A list of interesting facts about octopuses:",
    "The city of Rome was founded",
    "Photosynthesis is the process by which",
    "My favourite book is",
    "The rules of chess are simple:",
    "To make a cup of tea, first",
    "The theory of relativity states that",
]


def lm_run(m, dtype: str, rows: int, new: int, prefill_ids):
    """One lm case: (a function timing one call in seconds, its compile seconds). rows 0 is
    the prefill case (its time: the prefill alone), else ``rows`` prompts decoding ``new``
    tokens each (the whole call)."""
    from lm import decode

    cfg, params = decode.prepare(m.cfg, m.params, dtype)
    ids = [prefill_ids] if rows == 0 else [m.tokenizer(p)["input_ids"] for p in PROMPTS[:rows]]
    n = 1 if rows == 0 else new
    [first, *_] = decode.generate(cfg, params, ids, n)  # compiles the bucket

    def run():
        t0 = time.perf_counter()
        [g, *_] = decode.generate(cfg, params, ids, n)
        return g.timings["prefill"] if rows == 0 else time.perf_counter() - t0

    return run, first.timings["compile"]


def torch_run(m, rows: int, new: int, prefill_ids, state: dict):
    """transformers + PyTorch fp32 for the same case: a function timing one call (seconds)."""
    import torch
    import transformers

    torch.set_num_threads(2)
    if "hf" not in state:
        state["hf"] = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(m.path), gguf_file=os.path.basename(m.path), dtype=torch.float32
        ).eval()
    hf, tok = state["hf"], m.tokenizer
    if rows == 0:
        x = torch.tensor([prefill_ids])

        def call():
            hf(x, use_cache=True, logits_to_keep=1)
    else:
        tok.padding_side = "left"
        enc = tok(PROMPTS[:rows], return_tensors="pt", padding=True)

        def call():
            hf.generate(
                **enc,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )

    def run():
        t0 = time.perf_counter()
        with torch.no_grad():
            call()
        return time.perf_counter() - t0

    run()  # warm-up
    return run


def main(argv):
    del argv
    import numpy as np

    import lm

    unknown = set(FLAGS.cases) - set(CASES)
    if unknown:
        sys.exit(f"error: unknown cases {sorted(unknown)}; choose from {CASES}")
    m = lm.load(FLAGS.model)
    rng = np.random.default_rng(0)
    prefill_ids = rng.integers(100, m.cfg.vocab_size - 100, FLAGS.prefill_len).tolist()
    state: dict = {}
    rows_out = []
    for base, rows in (("b1", 1), ("b16", 16), ("prefill", 0)):
        cases = [c for c in FLAGS.cases if c.split("_")[0] == base]
        if not cases:
            continue
        dtypes = (
            ["float32", "bfloat16"]
            if base == "prefill"
            else ["bfloat16" if c.endswith("bf16") else "float32" for c in cases]
        )
        runs = {dt: lm_run(m, dt, rows, FLAGS.new_tokens, prefill_ids) for dt in dtypes}
        if FLAGS.torch:
            runs["torch"] = (torch_run(m, rows, FLAGS.new_tokens, prefill_ids, state), 0.0)
        # One call of each per round: the shared host's speed drifts by tens of percent over
        # minutes, so lm and torch are timed in the same phases.
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(FLAGS.repeats):
            for k, (run, _) in runs.items():
                times[k].append(run())
        med = {k: statistics.median(v) for k, v in times.items()}
        ref = med.get("torch")
        for dt in dtypes:
            s, compile_s = med[dt], runs[dt][1]
            if rows == 0:
                ratio = f"{s / ref:.2f}x torch time" if ref else "-"
                line = f"prefill {FLAGS.prefill_len} {dt:8s}  {s:.3f} s"
                ref_s = f"torch fp32 {ref:.3f} s" if ref else ""
            else:
                tok_s, ref_tok = rows * FLAGS.new_tokens / s, rows * FLAGS.new_tokens / (ref or 1)
                ratio = f"{tok_s / ref_tok:.2f}x torch" if ref else "-"
                line = f"{base:3s} {dt:8s} {tok_s:8.1f} tok/s"
                ref_s = f"torch fp32 {ref_tok:.1f} tok/s" if ref else ""
            rows_out.append(f"{line:34s} {ref_s:24s} {ratio:20s} compile {compile_s:.1f} s")
            print(rows_out[-1], flush=True)
    print("\n".join(["", "summary:", *rows_out]))


if __name__ == "__main__":
    app.run(main)
