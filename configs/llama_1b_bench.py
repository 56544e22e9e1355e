r"""Training throughput of a ~1.2B-parameter Llama-style decoder (Llama-3.2-1B sizes), for MFU.

    # one GPU (H100/H200): tokens/s, step time, MFU
    python scripts/bench_train.py --config=configs/llama_1b_bench.py --steps=20
    # 8 GPUs of one host, FSDP over all of them
    python scripts/bench_train.py --config=configs/llama_1b_bench.py --config.mesh.data=1 \
        --config.mesh.fsdp=-1
    # CPU smoke run (CI): the same code path on the tiny preset
    python scripts/bench_train.py --config=configs/llama_1b_bench.py:tiny --steps=2

Numerics: bfloat16 compute with float32 master weights and float32 accumulation; attention
``auto`` (cuDNN flash attention on NVIDIA GPUs, XLA elsewhere, resolved by bench_train.py);
``remat=dots`` saves the matmul outputs and recomputes the rest in the backward pass;
``scan_layers`` compiles one block for all 16 layers. Data: synthetic token ids (throughput only;
the step is the real ``lm.train.train_step`` with the causal-LM loss).
"""

from lm.experiment import base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.task = "causal_lm"
    config.model.name = "llama-1b"  # preset: random init, no download
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.attention_impl = "auto"
    config.model.remat = "dots"
    config.model.scan_layers = True

    config.data.name = "synthetic"
    config.data.max_len = 2048  # sequence length of every row

    config.train.batch_size = 8  # global; 16k tokens per step
    config.train.num_steps = 20
    config.train.seed = 0

    config.optim.lr = 3e-4
    config.optim.weight_decay = 0.1
    config.optim.warmup_steps = 2
    config.optim.schedule = "cosine"
    config.optim.clip_norm = 1.0
    config.optim.b2 = 0.95

    # Default mesh: data parallel over every device (fits ~1B in fp32 master + Adam on 80 GB);
    # --config.mesh.data=1 --config.mesh.fsdp=-1 shards parameters and optimizer state instead.
    config.mesh.data = -1

    if arg == "tiny":  # the same switches (bf16, remat, scan) on the tiny preset
        config.model.name = "tiny"
        config.data.max_len = 64
        config.train.batch_size = 8
        config.train.num_steps = 3
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; known: 'tiny'")
    return config
