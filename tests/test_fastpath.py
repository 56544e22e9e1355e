"""Accelerator fast paths selected from the config keep the numbers; FLOPs/MFU and the benchmark.

Switches: ``model.attention_impl`` (cudnn | xla), ``model.dtype=bfloat16`` with
``model.param_dtype=float32`` (master weights), ``model.remat`` (none | full | dots),
``model.scan_layers`` (one nn.scan over the blocks).
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import experiment, flops, sharding
from lm.config import preset
from lm.model import forward, init_params, param_shapes
from lm.optim import make_optimizer
from lm.train import TASKS, create_state, jit_train_step, mesh_context, state_shardings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = preset("tiny")
TASK = TASKS["causal_lm"]


def batch(step=0, b=8, t=16):
    rng = np.random.default_rng([3, step])
    seq = rng.integers(3, CFG.vocab_size, (b, t + 1)).astype(np.int32)
    ones = np.ones((b, t), np.int32)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    return dict(tokens=seq[:, :-1], targets=seq[:, 1:], positions=pos, segment_ids=ones,
                mask=ones, loss_mask=ones.astype(np.float32))  # fmt: skip


def losses_of(cfg, params, mesh_sizes=None, steps=3):
    mesh = sharding.make_mesh(mesh_sizes or {})
    tx, schedule = make_optimizer(dict(lr=1e-2, clip_norm=1.0), steps)
    _, shardings = state_shardings(cfg, tx, mesh)
    params = jax.device_get(params)  # host copy: the step donates its device buffers
    state = jax.device_put(create_state(params, tx), shardings)
    step = jit_train_step(cfg, TASK, tx, schedule, shardings, mesh)
    out = []
    with mesh_context(mesh):
        for i in range(steps):
            state, m = step(state, sharding.global_batch(batch(i), mesh), jax.random.PRNGKey(0))
            out.append(float(m["loss"]))
    return out, state


@functools.cache
def reference_losses():
    """The plain run (float32, unrolled, no remat, one device) every switch is compared with."""
    return losses_of(CFG, init_params(CFG, 0))[0]


def test_switches_reach_the_model_config():
    config = experiment.base_config()
    config.task = "causal_lm"
    config.model.name = "tiny"
    config.model.update(
        dtype="bfloat16", param_dtype="float32", attention_impl="cudnn", remat="dots",
        scan_layers=True,
    )  # fmt: skip
    experiment.validate(config)
    cfg = experiment.model_config(config, preset("tiny"))
    assert (cfg.dtype, cfg.param_dtype, cfg.attention_impl) == ("bfloat16", "float32", "cudnn")
    assert (cfg.remat, cfg.scan_layers) == ("dots", True)
    config.model.remat = "some"
    with pytest.raises(ValueError, match="remat='some' is not none, full or dots"):
        experiment.model_config(config, preset("tiny"))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_the_losses(remat):
    got, _ = losses_of(CFG.replace(remat=remat), init_params(CFG, 0))
    np.testing.assert_allclose(got, reference_losses(), rtol=0, atol=1e-6)


def test_bf16_compute_keeps_fp32_master_weights():
    cfg = CFG.replace(dtype="bfloat16", param_dtype="float32")
    ref = reference_losses()
    got, state = losses_of(cfg, init_params(cfg, 0), dict(data=2, fsdp=2, tensor=2))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    np.testing.assert_allclose(got, ref, rtol=2e-2)  # bf16 activations, fp32 accumulation
    assert got != ref


def test_scan_layers_same_logits_and_losses():
    import lm.model

    if not hasattr(lm.model, "stack_layers"):
        pytest.skip("scan_layers has not landed in lm/model.py")
    cfg = CFG.replace(scan_layers=True)
    unrolled = init_params(CFG, 0)
    stacked = lm.model.stack_layers(cfg, unrolled)
    assert jax.tree.map(lambda s: s.shape, param_shapes(cfg)) == jax.tree.map(jnp.shape, stacked)
    tokens = batch()["tokens"]
    np.testing.assert_allclose(
        forward(cfg, stacked, tokens)["logits"], forward(CFG, unrolled, tokens)["logits"],
        atol=1e-5,
    )  # fmt: skip
    # Training the stacked model on a (2,2,2) mesh: the 'layers' axis stays unsplit.
    ref = reference_losses()
    got, state = losses_of(cfg.replace(remat="dots"), stacked, dict(data=2, fsdp=2, tensor=2))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    q = state.params["layers"]["block"]["attn"]["q"]["kernel"]  # [L, embed, heads]
    assert q.addressable_shards[0].data.shape == (CFG.num_layers, 16, 16)


def test_flops_per_token():
    # Llama-3.2-1B sizes: 1.236B parameters, tied head; PaLM's 6N + 12LHQT.
    cfg = preset("llama-1b")
    n = flops.matmul_params(cfg)
    assert n == cfg.num_params()  # tied: the embedding is counted once, as the output matmul
    assert abs(n / 1e9 - 1.236) < 0.01
    want = 6 * n + 12 * 16 * 32 * 64 * 2048
    assert flops.flops_per_token(cfg, 2048) == want
    assert flops.flops_per_token(cfg, 2048, training=False) == want / 3
    # Learned position and token-type tables are lookups, not matmuls.
    bert = preset("bert-base")
    lookups = (bert.vocab_size + bert.max_len + bert.type_vocab_size) * bert.d_model
    assert flops.matmul_params(bert) == bert.num_params() - lookups
    assert flops.peak_tflops("NVIDIA H200") == 989.0
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert flops.peak_tflops("TPU v4") == 275.0
    assert flops.peak_tflops("TPU v5 lite") == 197.0
    assert flops.peak_tflops("TPU v5p") == 459.0
    assert flops.peak_tflops("cpu") is None


def test_bench_train_runs_on_cpu():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts/bench_train.py"),
         "--config=" + os.path.join(REPO, "configs/llama_1b_bench.py:tiny"),
         "--steps=2", "--warmup=1", "--peak_tflops=0.5", "--config.train.batch_size=4"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2 and result["batch"] == 4 and result["seq_len"] == 64
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1
    assert result["peak_source"] == "flag" and np.isfinite(result["loss"])
    assert "MFU" in out.stdout
