r"""Instruction-tune SmolLM2-135M-Instruct with LoRA on the bundled SST-2 instruction set.

    python scripts/finetune.py --config=configs/sft_smollm2.py --workdir=runs/sft_smollm2
    python scripts/finetune.py --config=configs/sft_smollm2.py:smoke --workdir=runs/sft_smoke
    python scripts/export.py --workdir=runs/sft_smollm2 --out=runs/sft_smollm2_hf
    python scripts/decode.py --config=configs/decode.py --config.model=runs/sft_smollm2 \
        --config.chat=True --config.prompt="Classify the sentiment of this movie review as \
positive or negative.

Review: a gorgeous, witty film"

Data: ``lm/data/bundled/sst2_instruct`` (4,000 training prompts "Classify the sentiment ...
Review: <sentence>" -> "positive" / "negative", the 872 GLUE dev sentences for eval), rendered
with the tokenizer's chat template, loss on the assistant reply (and its end-of-turn token)
only, packed into rows of ``data.max_len`` tokens with per-example segment ids and positions.
LoRA (Hu et al. 2021) rank 8, alpha 16 on q/k/v/o: only the adapters are trained, held in the
optimizer state and checkpointed; the base comes from the pretrained checkpoint at every
(re)start, and export merges the adapters. ``--config.lora.rank=0`` fine-tunes every weight.
``:smoke`` trains 4 steps of 4 rows of 96 tokens on 64 conversations (about a minute).
"""

from lm.experiment import base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.task = "causal_lm"
    config.model.name = "smollm2-135m-instruct"  # offline GGUF copy, dequantized to float32
    config.model.dtype = "auto"  # bfloat16 compute where it is fast (AMX), else float32
    config.model.param_dtype = "float32"
    config.model.dropout_rate = 0.0

    config.data.kind = "sft"
    config.data.name = "sst2_instruct"
    config.data.max_len = 256

    config.lora.rank = 8
    config.lora.alpha = 16.0
    config.lora.dropout = 0.0
    config.lora.targets = ("q", "k", "v", "o")

    config.train.num_steps = 300
    config.train.batch_size = 8
    config.train.eval_batch_size = 16
    config.train.seed = 0
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.early_stop_metric = "eval/loss"

    config.optim.lr = 2e-4  # LoRA takes a larger lr than full fine-tuning (1e-5 .. 5e-5)
    config.optim.weight_decay = 0.0
    config.optim.warmup_steps = 20
    config.optim.schedule = "cosine"
    config.optim.clip_norm = 1.0

    config.checkpoint.every_steps = 100
    config.checkpoint.keep = 2

    if arg == "smoke":
        config.model.dtype = "float32"
        config.data.max_len = 96
        config.data.max_train_examples = 64
        config.data.max_eval_examples = 16
        config.train.num_steps = 4
        config.train.batch_size = 4
        config.train.eval_batch_size = 4
        config.train.log_every = 2
        config.train.eval_every = 4
        config.checkpoint.every_steps = 2
        config.optim.warmup_steps = 1
        config.optim.lr = 1e-3
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; known: 'smoke'")
    return config
