"""Export a fine-tuned classifier or causal LM as a Hugging Face directory.

    python scripts/export.py --workdir=DIR --out=HFDIR [--step=N]

``transformers.AutoModelForSequenceClassification.from_pretrained(HFDIR)`` loads it with the
same logits and the run's label names (``id2label``); the tokenizer is saved beside it. A
causal-LM run (``task: causal_lm``) exports for ``AutoModelForCausalLM``, LoRA adapters merged
into the base weights.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("workdir", None, "Run directory written by finetune.py.")
flags.DEFINE_string("out", None, "Output HF directory.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the best).")
flags.mark_flags_as_required(["workdir", "out"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from lm.classify import Classifier, WorkdirNotReady
    from lm.workdir import export_workdir, is_causal_run

    if is_causal_run(FLAGS.workdir):  # causal LM: LoRA adapters merged, AutoModelForCausalLM
        from lm.convert.hf import CheckpointError

        try:
            out, m = export_workdir(FLAGS.workdir, FLAGS.out, FLAGS.step)
        except CheckpointError as e:
            sys.exit(f"error: {e}")
        print(f"exported causal LM ({m.cfg.family}, LoRA merged if any) to {out}")
        return
    try:
        clf = Classifier.from_workdir(FLAGS.workdir, FLAGS.step)
    except WorkdirNotReady as e:
        sys.exit(f"error: {e}")
    out = clf.export(FLAGS.out)
    print(f"exported step {clf.step} ({len(clf.labels)} labels: {clf.labels}) to {out}")


if __name__ == "__main__":
    app.run(main)
