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

lm decodes through lm.native's AVX-512 kernel where it is available (``LM_NATIVE=0 python
scripts/bench_decode.py`` measures XLA's dot alone). Throughput counts generated tokens over the
whole call (prefill included), as a user sees it.
Compile time is reported separately (first call of each bucket). Both sides use 2 threads;
torch runs transformers' own ``generate`` (sdpa attention, its dynamic KV cache) and, for the
prefill, one forward with ``logits_to_keep=1`` (what generate's prefill computes). The prefill
case alternates lm float32, lm bfloat16 and torch call by call, ``--repeats`` rounds, so a drift
of the shared host's speed falls on both sides.
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


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ours(m, case: str, repeats: int, new: int) -> dict:
    from lm import decode

    dtype = "bfloat16" if case.endswith("bf16") else "float32"
    cfg, params = decode.prepare(m.cfg, m.params, dtype)
    b = 16 if case.startswith("b16") else 1
    ids = [m.tokenizer(p)["input_ids"] for p in PROMPTS[:b]]
    [first, *_] = decode.generate(cfg, params, ids, new)
    s = median_time(lambda: decode.generate(cfg, params, ids, new), repeats)
    return {dtype: {"tok_s": b * new / s, "compile": first.timings["compile"]}}


def prefill(m, repeats: int, prefill_ids, state: dict, with_torch: bool) -> tuple[dict, float]:
    """The prefill case: lm float32, lm bfloat16 and torch, one call of each per round (the
    host's speed drifts by tens of percent over minutes; interleaving keeps the ratio fair).
    Returns ({dtype: {"s": median seconds, "compile": s}}, torch's median seconds or 0)."""
    from lm import decode

    runs, res = {}, {}
    for dt in ("float32", "bfloat16"):
        cfg, params = decode.prepare(m.cfg, m.params, dt)
        [g] = decode.generate(cfg, params, [prefill_ids], 1)  # compiles
        res[dt] = {"compile": g.timings["compile"]}

        def run(cfg=cfg, params=params):
            return decode.generate(cfg, params, [prefill_ids], 1)[0].timings["prefill"]

        runs[dt] = run
    if with_torch:
        import torch

        hf, x = _torch_model(m, state), torch.tensor([prefill_ids])

        def torch_run():
            t0 = time.perf_counter()
            with torch.no_grad():
                hf(x, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - t0

        torch_run()
        runs["torch"] = torch_run
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            times[k].append(run())
    for dt in ("float32", "bfloat16"):
        res[dt]["s"] = statistics.median(times[dt])
    return res, statistics.median(times["torch"]) if with_torch else 0.0


def _torch_model(m, state: dict):
    import torch
    import transformers

    torch.set_num_threads(2)
    if "hf" not in state:
        state["hf"] = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(m.path), gguf_file=os.path.basename(m.path), dtype=torch.float32
        ).eval()
    return state["hf"]


def torch_ref(m, case: str, repeats: int, new: int, state: dict) -> float:
    import torch

    hf, tok = _torch_model(m, state), m.tokenizer
    b = 16 if case.startswith("b16") else 1
    tok.padding_side = "left"
    enc = tok(PROMPTS[:b], return_tensors="pt", padding=True)

    def run():
        with torch.no_grad():
            hf.generate(
                **enc,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )

    run()
    return b * new / median_time(run, repeats)


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
    torch_fp32: dict[str, float] = {}
    rows = []
    for case in FLAGS.cases:
        base = case.split("_")[0]
        if case == "prefill":
            r, torch_fp32[base] = prefill(m, FLAGS.repeats, prefill_ids, state, FLAGS.torch)
        else:
            r = ours(m, case, FLAGS.repeats, FLAGS.new_tokens)
        if FLAGS.torch and base not in torch_fp32:
            torch_fp32[base] = torch_ref(m, case, FLAGS.repeats, FLAGS.new_tokens, state)
        ref = torch_fp32.get(base)
        for dt, v in r.items():
            if case == "prefill":
                ratio = f"{v['s'] / ref:.2f}x torch time" if ref else "-"
                line = f"prefill {FLAGS.prefill_len} {dt:8s}  {v['s']:.3f} s"
                ref_s = f"torch fp32 {ref:.3f} s" if ref else ""
            else:
                ratio = f"{v['tok_s'] / ref:.2f}x torch" if ref else "-"
                line = f"{base:3s} {dt:8s} {v['tok_s']:8.1f} tok/s"
                ref_s = f"torch fp32 {ref:.1f} tok/s" if ref else ""
            rows.append(f"{line:34s} {ref_s:24s} {ratio:20s} compile {v['compile']:.1f} s")
            print(rows[-1], flush=True)
    print("\n".join(["", "summary:", *rows]))


if __name__ == "__main__":
    app.run(main)
