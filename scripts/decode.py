"""Generate text with a causal LM: one prompt (streamed), a prompt file (batched), or a chat.

    python scripts/decode.py --config=configs/decode.py --config.model=smollm2-135m-instruct \
        (--config.prompt="..." | --config.prompt_file=F) [--config.chat=True] \
        [--config.sampling=greedy|sample] [--config.temperature=..] [--config.top_k=..] \
        [--config.top_p=..] [--config.seed=..] [--config.max_new_tokens=N] [--config.output=FILE]

With ``output``, writes JSONL (prompt, completion, token_ids, num_prompt_tokens, finish_reason,
timings); without, prints completions (streamed token by token for a single prompt). With
neither prompt nor prompt_file, reads chat messages from stdin. See configs/decode.py.
"""

import json
import os
import sys
import time

from absl import app, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", "configs/decode.py", "decode config")


def prompts_of(config) -> list[str] | None:
    """The prompts of the config (None: interactive), checked before any model loads."""
    from lm.chat import check_text, read_prompts
    from lm.decode import DecodeError

    if config.prompt and config.prompt_file:
        raise DecodeError("give config.prompt or config.prompt_file, not both")
    if config.prompt_file:
        return read_prompts(config.prompt_file)
    if config.prompt:
        return [check_text(config.prompt, "config.prompt")]
    if config.output:
        raise DecodeError("config.output needs config.prompt or config.prompt_file")
    return None


def run(config, out=sys.stdout, stdin=sys.stdin, pretrained=None) -> list[dict]:
    from lm import xla_cache
    from lm.chat import TextDecoder, settings_from_config

    settings_from_config(config)  # bad settings fail before the model loads
    prompts = prompts_of(config)
    xla_cache.use(config.get("compilation_cache"))
    t0 = time.perf_counter()
    dec = TextDecoder.from_config(config, pretrained)
    print(f"[loaded {config.model} in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    if prompts is None:
        dec.interactive(stdin, out)
        return []
    if len(prompts) == 1 and not config.output:
        rows = [dec.stream(prompts[0], lambda s: (out.write(s), out.flush()))]
        out.write("\n")
    else:
        rows = dec.complete(prompts)
    if config.output:
        with open(config.output, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif len(rows) > 1:
        for row in rows:
            out.write(row["completion"] + "\n\n")
    for row in rows[:1]:
        print(f"[timings of the first batch: {row['timings']}]", file=sys.stderr)
    return rows


def main(argv):
    logging.set_verbosity(logging.WARNING)  # keep jax's backend-probing INFO lines off stderr
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}; use --config.KEY=VALUE")
    from lm.convert.hf import CheckpointError
    from lm.decode import DecodeError

    try:
        run(_CONFIG.value)
    except (DecodeError, CheckpointError, NotImplementedError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
