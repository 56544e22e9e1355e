"""Run a config sweep: one fine-tune per override dict, each in DIR/<run name>/.

    python scripts/sweep.py --config=configs/sst2_minilm.py:smoke --sweep=lr_batch \
        --workdir=runs/sweep [--parallel=2] [--print-commands]

A relaunch with the same --workdir skips finished runs and resumes unfinished ones. Results:
DIR/results.csv, DIR/results.md and DIR/<metric>.png. See lm/sweep.py for the sweep format.
"""

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lm import sweep  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    ap.add_argument(
        "--sweep",
        default="default",
        help="sweep file, name in configs/sweeps/, or get_sweep_<name> in the config",
    )
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time on this machine")
    ap.add_argument(
        "--print-commands",
        action="store_true",
        help="print one command per run (for a cluster scheduler) and exit",
    )
    ap.add_argument(
        "--metric",
        default=None,
        help="metric for the results table and plot (default: the config's train.early_stop_metric)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of random choices in the sweep")
    args = ap.parse_args()
    try:
        runs = sweep.load_sweep(args.config, args.sweep, args.seed)
        sweep.validate(sweep.load_config(args.config), runs, args.config)
    except sweep.SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_commands:
        for i, r in enumerate(runs):
            wd = os.path.join(args.workdir, sweep.run_name(i, r))
            print(shlex.join(sweep.command(args.config, wd, r)))
        return 0
    rows = sweep.run_sweep(args.config, runs, args.workdir, args.parallel, args.metric)
    failed = [r["run"] for r in rows if r["status"] != "done"]
    print(
        f"[sweep] {len(rows) - len(failed)}/{len(rows)} runs done; results in "
        f"{os.path.join(args.workdir, 'results.md')}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
