r"""A baby GPT trained from scratch on tiny Shakespeare, character level (nanoGPT's CPU recipe).

    python scripts/finetune.py --config=configs/shakespeare_char.py --workdir=runs/shakespeare
    python scripts/decode.py --config=configs/decode.py --config.model=runs/shakespeare \
        --config.prompt="ROMEO:" --config.sampling=sample --config.temperature=0.8 \
        --config.max_new_tokens=500 --config.slide=True  # past the 64-character context
    python scripts/finetune.py --config=configs/shakespeare_char.py:smoke --workdir=runs/shakes_smoke

nanoGPT's "I only have a macbook" command (config/train_shakespeare_char.py with
``--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0``): 4 layers, 4 heads, d_model 128, MLP 512, context 64,
learned positions, pre-LayerNorm, no biases, tied embeddings, GELU; batch 12, 2000 steps,
AdamW lr 1e-3 (beta2 0.99, weight decay 0.1 on matrices), 100 warmup steps then cosine decay
to 1e-4, global-norm clip 1.0. nanoGPT reports eval loss 1.88. The vocabulary is the text's 65
characters; the last 10% of the text is held out. Evaluation here is deterministic: every
non-overlapping 64-character window of the held-out text (1,742 windows, ~111k targets)
instead of nanoGPT's 20 random batches. ``:smoke`` trains 300 steps (about a minute).
"""

from lm.experiment import base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.task = "causal_lm"
    # A preset initializes randomly; every size is set here (vocab_size: the text's characters).
    config.model.name = "tiny-gpt2"
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.num_kv_heads = 4
    config.model.head_dim = 32
    config.model.d_model = 128
    config.model.mlp_dim = 512
    config.model.max_len = 64
    config.model.qkv_bias = False
    config.model.out_bias = False
    config.model.mlp_bias = False
    config.model.activation = "gelu_tanh"
    config.model.dropout_rate = 0.0
    config.model.dtype = "float32"  # a 0.8M-parameter model: bf16 buys nothing at this size
    # lm.native's fused attention + gradient (x86 CPU, AVX-512 or AVX2; elsewhere as "xla"):
    # at T = 64 XLA's attention ops took ~20 ms of a ~64 ms step.
    config.model.attention_impl = "native"
    # lm.native's fused norm + q/k/v and norm + MLP + residual calls with their gradients: the
    # four MLPs and their norms took ~35 ms of a ~66 ms step as XLA's small ops.
    config.model.block_impl = "native"

    config.data.kind = "chars"  # data.train_files unset: the bundled tiny Shakespeare
    config.data.max_len = 64
    config.data.eval_fraction = 0.1

    config.train.num_steps = 2000
    config.train.batch_size = 12
    config.train.eval_batch_size = 256
    config.train.seed = 1337
    config.train.log_every = 100
    config.train.eval_every = 0  # evaluate at the end
    config.train.early_stop_metric = "eval/loss"

    config.optim.lr = 1e-3
    config.optim.end_lr = 1e-4
    config.optim.weight_decay = 0.1
    config.optim.b1 = 0.9
    config.optim.b2 = 0.99
    config.optim.warmup_steps = 100
    config.optim.schedule = "cosine"
    config.optim.clip_norm = 1.0

    config.checkpoint.every_steps = 1000
    config.checkpoint.keep = 1

    if arg == "smoke":
        config.train.num_steps = 300
        config.train.log_every = 50
        config.data.max_eval_examples = 256
        config.checkpoint.every_steps = 0
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; known: 'smoke'")
    return config
