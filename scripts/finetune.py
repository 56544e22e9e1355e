"""Fine-tune a model from a config file; re-running with the same workdir resumes.

    python scripts/finetune.py --config=configs/sst2_minilm.py[:smoke] --workdir=DIR \
        [--config.optim.lr=1e-4 ...]

Exit status: 0 done, 1 training stopped (NaN/Inf loss), 2 bad config / data / workdir,
3 preempted (SIGTERM/SIGINT: the current step finished and was checkpointed; relaunch resumes).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lm import experiment  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from lm.data import DataError
    from lm.train import Preempted, TrainingError, WorkdirError, run

    try:
        summary = run(_CONFIG.value, _WORKDIR.value)
    except (experiment.ConfigError, DataError, WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(3)
    print(experiment.summary_line(summary))


if __name__ == "__main__":
    try:
        # Unknown keys and wrong types, with close matches, before ml_collections parses them.
        experiment.check_argv(sys.argv)
    except experiment.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    app.run(main)
