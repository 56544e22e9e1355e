r"""Fine-tune all-MiniLM-L6-v2 on GLUE SST-2 (bundled): the default classification job.

    python scripts/finetune.py --config=configs/sst2_minilm.py --workdir=runs/sst2_minilm
    python scripts/finetune.py --config=configs/sst2_minilm.py:smoke --workdir=runs/smoke

The recipe is BERT's fine-tuning one as transformers' Trainer runs it (and as
scripts/bench_finetune.py compares against): 1 epoch, batch 32, max_len 64, AdamW lr 5e-5,
weight decay 0.01 (not on biases and norms), 6% warmup then linear decay, clip 1.0, dropout 0.1.
Two choices of ours make it fast: batches are drawn at random and then grouped by length within
windows of 20 batches (``data.group_batches``), so a batch pads to ~18 tokens instead of the ~40
of random batches; and ``model.dtype="auto"`` computes in bfloat16 (float32 master weights and
accumulation) where the hardware has a fast bfloat16 path (GPU, TPU, CPU with AMX) and in float32
elsewhere. ``:smoke`` trains 20 steps on 640 examples (one padded length, so two compiles) and
evaluates on 256 dev sentences: about a minute on 2 cores.

Your own files through overrides alone, e.g. a headerless CSV with two text columns:

    python scripts/finetune.py --config=configs/sst2_minilm.py --workdir=runs/mine \
      --config.data.name= --config.data.train_files=train.csv --config.data.eval_files=dev.csv \
      --config.data.has_header=False --config.data.text_columns=1,2 --config.data.label_column=0
"""

from lm.experiment import base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.task = "classification"
    config.model.name = "minilm-l6"
    config.model.dtype = "auto"
    config.model.param_dtype = "float32"
    config.model.dropout_rate = 0.1
    config.model.attn_dropout_rate = 0.1

    config.data.name = "sst2"
    config.data.max_len = 64
    config.data.group_batches = 20

    config.train.num_epochs = 1.0
    config.train.batch_size = 32
    config.train.seed = 0
    config.train.log_every = 50
    config.train.eval_every = 500
    config.train.early_stop_metric = "eval/accuracy"
    config.train.patience = 0

    config.optim.lr = 5e-5
    config.optim.weight_decay = 0.01
    config.optim.warmup_frac = 0.06
    config.optim.schedule = "linear"
    config.optim.clip_norm = 1.0

    config.checkpoint.every_steps = 500
    config.checkpoint.keep = 2

    if arg == "smoke":
        config.data.max_train_examples = 640
        config.data.max_eval_examples = 256
        config.data.max_len = 32
        config.data.buckets = (32,)
        config.train.num_steps = 20
        config.train.log_every = 5
        config.train.eval_every = 10
        config.checkpoint.every_steps = 10
        config.optim.lr = 2e-4
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; known: 'smoke'")
    return config
