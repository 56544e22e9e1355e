"""Training throughput of any config: tokens/s, step time and model-FLOPs utilization (MFU).

    python scripts/bench_train.py --config=configs/llama_1b_bench.py [--steps=20] \
        [--peak_tflops=989] [--config.mesh.fsdp=-1 ...]

Runs the real ``lm.train.train_step`` (jitted with the config's mesh shardings, donated state)
on synthetic batches of ``train.batch_size`` x ``data.max_len`` tokens, with the model
initialized directly into its shardings. Prints one line per phase and a final JSON line.
MFU = lm.flops.flops_per_token x tokens/s / (peak TFLOP/s per chip x chips); the peak comes
from --peak_tflops, the device table in lm.flops, or (CPU) a measured matmul.
"""

import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after --warmup untimed ones).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per chip (0: look it up).")
flags.mark_flags_as_required(["config"])


def synthetic_batch(task, cfg, b, t, step):
    import numpy as np

    rng = np.random.default_rng([0, step])
    tokens = rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
    ones = np.ones((b, t), np.int32)
    if task == "causal_lm":
        pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
        return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], positions=pos,
                    segment_ids=ones, mask=ones, loss_mask=ones.astype(np.float32))  # fmt: skip
    labels = rng.integers(0, cfg.num_labels, b).astype(np.int32)
    return dict(tokens=tokens[:, :-1], mask=ones, token_types=0 * ones, labels=labels,
                weights=np.ones(b, np.float32))  # fmt: skip


def main(argv):
    del argv
    config = _CONFIG.value
    from lm import distributed

    distributed.initialize(config.get("distributed"))
    import flax.linen as nn
    import jax

    from lm import experiment, flops, sharding
    from lm.config import preset
    from lm.model import init_boxed
    from lm.optim import make_optimizer
    from lm.train import create_state, get_task, jit_train_step, mesh_context, state_shardings

    experiment.validate(config)
    task = get_task(config.task)
    if not experiment.is_preset(config.model.name):
        raise app.UsageError("bench_train.py initializes randomly: model.name must be a preset")
    cfg = experiment.model_config(config, preset(config.model.name))
    if cfg.attention_impl == "auto":  # cuDNN flash attention where it exists
        gpu = jax.default_backend() == "gpu" and cfg.dtype in ("bfloat16", "float16")
        cfg = cfg.replace(attention_impl="cudnn" if gpu else "xla")
    b, t = int(config.train.batch_size), int(config.data.max_len)
    mesh = sharding.make_mesh({a: config.mesh[a] for a in sharding.AXES})
    rules = sharding.rules_from_config(config.mesh.rules)
    tx, schedule = make_optimizer(config.optim, max(1, int(config.train.num_steps)))
    _, shardings = state_shardings(cfg, tx, mesh, rules)
    init = jax.jit(
        lambda k: create_state(nn.unbox(init_boxed(cfg, k)), tx), out_shardings=shardings
    )
    step_fn = jit_train_step(cfg, task, tx, schedule, shardings, mesh, int(config.optim.grad_accum))
    rng = jax.random.PRNGKey(0)
    rows = functools.partial(synthetic_batch, task.name, cfg, b, t)

    def batch(i):  # every process builds the global batch and feeds its own rows
        return sharding.global_batch(sharding.process_local(rows(i), mesh), mesh)

    n_dev, kind = jax.device_count(), jax.devices()[0].device_kind
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    say(f"model {config.model.name}: {cfg.num_params() / 1e6:.1f}M params, {cfg.dtype} compute, "
        f"attention {cfg.attention_impl}, remat {cfg.remat}, scan_layers {cfg.scan_layers}")  # fmt: skip
    say(f"mesh {dict(mesh.shape)} on {n_dev} x {kind}; batch {b} x {t} "
        f"({b // sharding.batch_divisor(mesh)} rows per data shard)")  # fmt: skip
    with mesh_context(mesh, rules):
        state = init(jax.random.PRNGKey(int(config.train.seed)))
        t0 = time.perf_counter()
        first = batch(0)
        compiled = step_fn.lower(state, first, rng).compile()
        compile_s = time.perf_counter() - t0
        for i in range(_WARMUP.value):
            state, m = compiled(state, batch(i), rng)
        jax.block_until_ready(state)
        inputs = [batch(i) for i in range(_STEPS.value)]
        t0 = time.perf_counter()
        for x in inputs:
            state, m = compiled(state, x, rng)
        loss = float(m["loss"])  # waits for the last step
        step_s = (time.perf_counter() - t0) / max(1, _STEPS.value)
    tokens_s = b * t / step_s
    model_tflops = flops.flops_per_token(cfg, t) * tokens_s / 1e12
    peak = _PEAK.value or flops.peak_tflops(kind, cfg.dtype)
    source = "flag" if _PEAK.value else "table"
    if peak is None:
        peak, source = flops.measured_peak_tflops(cfg.dtype), "measured matmul"
    mfu = model_tflops / (peak * n_dev)
    say(f"compile {compile_s:.1f} s; step {step_s * 1e3:.1f} ms; {tokens_s:,.0f} tokens/s "
        f"({tokens_s / n_dev:,.0f} per chip); {model_tflops:.2f} model TFLOP/s; "
        f"MFU {100 * mfu:.1f}% of {peak:g} TFLOP/s x {n_dev} ({source}); loss {loss:.3f}")  # fmt: skip
    say(json.dumps(dict(config=config.model.name, devices=n_dev, device_kind=kind, batch=b,
                        seq_len=t, step_s=step_s, tokens_per_s=tokens_s, compile_s=compile_s,
                        model_tflops=model_tflops, peak_tflops=peak, peak_source=source, mfu=mfu,
                        loss=loss)))  # fmt: skip


if __name__ == "__main__":
    app.run(main)
