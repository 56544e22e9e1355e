"""Evaluate a fine-tuned run; prints its metrics as one JSON line.

    python scripts/evaluate.py --workdir=DIR [--split=eval|train|FILE] [--step=N]

``--split=eval`` (default) is the run's eval data; a FILE must have the run's format, columns
and labels. The checkpoint is the best one unless ``--step`` says otherwise.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("workdir", None, "Run directory written by finetune.py.")
flags.DEFINE_string("split", "eval", "eval, train, or a labeled data file.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the best).")
flags.DEFINE_integer("batch_size", 64, "Examples per forward pass.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from lm.classify import Classifier, WorkdirNotReady
    from lm.data import DataError

    try:
        clf = Classifier.from_workdir(FLAGS.workdir, FLAGS.step)
        metrics = clf.evaluate(FLAGS.split, FLAGS.batch_size)
    except (WorkdirNotReady, DataError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(metrics))


if __name__ == "__main__":
    app.run(main)
