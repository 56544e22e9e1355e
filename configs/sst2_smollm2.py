r"""Fine-tune SmolLM2-135M-Instruct as a sentence classifier on GLUE SST-2 (bundled).

    python scripts/finetune.py --config=configs/sst2_smollm2.py --workdir=runs/sst2_smollm2
    python scripts/finetune.py --config=configs/sst2_smollm2.py:smoke --workdir=runs/smoke_smollm2

A decoder as a classifier, as transformers' LlamaForSequenceClassification does it: a fresh
linear ``score`` layer (no bias) reads the hidden state of the last real token of each sentence
(causal attention: the only position that has seen the whole sentence). The checkpoint is the
offline GGUF copy (``smollm2-135m-instruct``, dequantized to float32 master weights); compute
dtype "auto" (bfloat16 where fast, else float32). 135M parameters make one epoch of SST-2 take
hours on 2 CPU cores, so the default trains 2,000 steps of 16 (about half an epoch) with a
smaller learning rate than MiniLM's. ``:smoke`` runs 10 steps on 320 sentences.
"""

from lm.experiment import base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.task = "classification"
    config.model.name = "smollm2-135m-instruct"
    config.model.dtype = "auto"
    config.model.param_dtype = "float32"
    config.model.dropout_rate = 0.0  # SmolLM2 is trained without dropout

    config.data.name = "sst2"
    config.data.max_len = 64
    config.data.group_batches = 20

    config.train.num_steps = 2000
    config.train.batch_size = 16
    config.train.seed = 0
    config.train.log_every = 50
    config.train.eval_every = 500
    config.train.early_stop_metric = "eval/accuracy"
    config.train.patience = 3

    config.optim.lr = 2e-5
    config.optim.weight_decay = 0.01
    config.optim.warmup_frac = 0.06
    config.optim.schedule = "linear"
    config.optim.clip_norm = 1.0

    config.checkpoint.every_steps = 500
    config.checkpoint.keep = 2

    if arg == "smoke":
        config.data.max_train_examples = 320
        config.data.max_eval_examples = 128
        config.data.max_len = 32
        config.data.buckets = (32,)
        config.train.num_steps = 10
        config.train.log_every = 5
        config.train.eval_every = 10
        config.checkpoint.every_steps = 10
        config.optim.lr = 5e-5
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; known: 'smoke'")
    return config
