"""Learning rate x batch size for configs/sst2_minilm.py (4 runs; add :smoke for a quick sweep).

python scripts/sweep.py --config=configs/sst2_minilm.py:smoke --sweep=lr_batch --workdir=runs/sweep_lr_batch
"""


def get_sweep(h):
    return h.product(
        [
            h.sweep("config.optim.lr", [1e-4, 5e-5]),
            h.sweep("config.train.batch_size", [16, 32]),
        ]
    )
