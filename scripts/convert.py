"""Convert a checkpoint (short name, HF directory, hub id or GGUF file) into an HF directory.

    python scripts/convert.py --model=smollm2-135m-instruct --out=/tmp/smollm2-hf

The output (config.json, model.safetensors, tokenizer files) loads with
``transformers.AutoModelForCausalLM.from_pretrained(out)`` (or the matching Auto class).
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("model", None, "short name, HF directory, hub id or .gguf file", required=True)
flags.DEFINE_string("out", None, "output directory", required=True)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import lm

    try:
        m = lm.load(FLAGS.model)
        lm.save_hf_dir(m.cfg, m.params, FLAGS.out, tokenizer=m.tokenizer, labels=m.labels)
    except lm.CheckpointError as e:
        sys.exit(f"error: {e}")
    n = sum(x.size for x in __import__("jax").tree.leaves(m.params))
    print(f"wrote {FLAGS.out}: {m.cfg.family} ({n / 1e6:.1f}M parameters, head={m.cfg.head})")


if __name__ == "__main__":
    app.run(main)
