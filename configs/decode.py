"""Decode (generate text) with a causal LM.

    python scripts/decode.py --config=configs/decode.py --config.prompt="Once upon a time"
    python scripts/decode.py --config=configs/decode.py --config.chat=True \
        --config.prompt="What is the capital of France?"
    python scripts/decode.py --config=configs/decode.py --config.prompt_file=prompts.txt \
        --config.sampling=sample --config.temperature=0.8 --config.top_p=0.95 \
        --config.output=out.jsonl
    python scripts/decode.py --config=configs/decode.py --config.chat=True   # interactive

``get_config("smoke")`` shrinks the budget for a quick check.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Short name, HF directory, hub id, .gguf file, or a fine-tuning workdir.
    c.model = "smollm2-135m-instruct"
    # One of prompt / prompt_file (one prompt per line, UTF-8); neither: interactive mode.
    c.prompt = ""
    c.prompt_file = ""
    c.chat = False  # apply the tokenizer's chat template (user turn + generation prompt)
    c.system = ""  # system message for chat (empty: the template's default)

    c.sampling = "greedy"  # "greedy" | "sample"
    c.temperature = 1.0  # > 0 (sample only)
    c.top_k = 0  # 0: off (sample only)
    c.top_p = 1.0  # in (0, 1]; 1.0: off (sample only)
    c.seed = 0

    c.max_new_tokens = 128
    c.stop_strings = ()  # e.g. --config.stop_strings="('\n\n',)"; cut from the completion
    c.eos_ids = ()  # extra end-of-sequence ids besides the tokenizer's/checkpoint's

    c.output = ""  # JSONL file; empty: completions to stdout (streamed for a single prompt)
    c.dtype = "float32"  # "float32" | "bfloat16" (weights and activations, f32 accumulation)
    c.max_len = 0  # context limit, prompt + new tokens (0: the model's max_len)
    c.truncate = False  # cut over-long prompts from the left instead of failing
    # Past the context: each new token from the last max_len tokens (a sliding window, as
    # nanoGPT's sample.py; a forward pass over the window per token, no KV cache).
    c.slide = False
    c.batch_size = 8  # prompts per compiled batch
    # XLA's persistent compilation cache: a second run with the same shapes skips compiling.
    c.compilation_cache = "~/.cache/lm/xla"  # jax's persistent cache (lm.xla_cache); "": off

    if arg == "smoke":
        c.max_new_tokens = 16
    elif arg:
        raise ValueError(f"configs/decode.py: unknown argument {arg!r}; expected 'smoke' or none")
    return c
