"""Classify texts with a fine-tuned run: label and class probabilities, as JSONL.

    python scripts/predict.py --workdir=DIR --text "a gorgeous film" [--text "..."]
    python scripts/predict.py --workdir=DIR --input=FILE --output=FILE.jsonl

FILE is .txt (one text per line) or TSV/CSV/JSONL with the run's text columns. Each output line
is ``{"text": ..., "label": <label name>, "probs": {<label name>: p, ...}}``. ``--step`` picks a
checkpoint (default: the best one).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("workdir", None, "Run directory written by finetune.py.")
flags.DEFINE_multi_string("text", [], "A text to classify (repeatable).")
flags.DEFINE_string("input", None, "File of texts (.txt, .tsv, .csv, .jsonl).")
flags.DEFINE_string("output", None, "JSONL output file (default: stdout).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the best).")
flags.DEFINE_integer("batch_size", 64, "Texts per forward pass.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from lm.classify import Classifier, WorkdirNotReady, read_texts
    from lm.data import DataError

    if bool(FLAGS.text) == bool(FLAGS.input):
        sys.exit("error: give --text (one or more) or --input=FILE")
    try:
        clf = Classifier.from_workdir(FLAGS.workdir, FLAGS.step)
        texts = list(FLAGS.text) or read_texts(FLAGS.input, clf.config)
        rows = clf.predict(texts, FLAGS.batch_size)
    except (WorkdirNotReady, DataError) as e:
        sys.exit(f"error: {e}")
    out = open(FLAGS.output, "w") if FLAGS.output else sys.stdout
    for r in rows:
        out.write(json.dumps(r, ensure_ascii=False) + "\n")
    if FLAGS.output:
        out.close()
        print(f"wrote {len(rows)} predictions to {FLAGS.output}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
