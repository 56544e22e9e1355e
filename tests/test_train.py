"""Train step, optimizer and checkpoints on a tiny model with synthetic batches (8 fake devices)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm import sharding
from lm.checkpoint import Checkpointer
from lm.config import preset
from lm.model import init_params
from lm.optim import decay_mask, make_optimizer, make_schedule
from lm.train import (
    TASKS,
    create_state,
    eval_step,
    jit_train_step,
    mesh_context,
    smoothed_cross_entropy,
    state_shardings,
)

CFG = preset("tiny-bert", head="classification", num_labels=2)
TASK = TASKS["classification"]
OPTIM = dict(lr=3e-3, weight_decay=0.01, warmup_steps=2, schedule="linear", clip_norm=1.0)


def synthetic_batch(step: int, b: int = 16, t: int = 8, seed: int = 0) -> dict:
    """Label 1 iff token 7 occurs in the (unpadded part of the) sequence."""
    rng = np.random.default_rng([seed, step])
    tokens = rng.integers(3, 20, (b, t)).astype(np.int32)
    lengths = rng.integers(3, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    tokens = tokens * mask
    labels = ((tokens == 7).any(1)).astype(np.int32)
    return dict(
        tokens=tokens,
        mask=mask,
        token_types=np.zeros_like(tokens),
        labels=labels,
        weights=np.ones(b, np.float32),
    )


def test_schedule_values():
    s = make_schedule(1.0, 100, warmup=10, kind="linear")
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(s(55)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(s(100)), 0.0, atol=1e-7)
    c = make_schedule(1.0, 110, warmup=10, kind="cosine", end_lr=0.1)
    np.testing.assert_allclose(float(c(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(c(60)), 0.55, rtol=1e-5)
    np.testing.assert_allclose(float(c(110)), 0.1, rtol=1e-5)
    k = make_schedule(2.0, 50, warmup=0, kind="constant")
    assert float(k(0)) == float(k(49)) == 2.0
    # transformers' get_linear_schedule_with_warmup, step by step.
    lam = lambda i, w=6, n=100: i / w if i < w else max(0.0, (n - i) / (n - w))
    hf = make_schedule(1.0, 100, warmup=6)
    np.testing.assert_allclose(
        [float(hf(i)) for i in range(100)], [lam(i) for i in range(100)], atol=1e-6
    )


def test_weight_decay_mask_skips_biases_and_norms():
    params = init_params(CFG)
    mask = decay_mask(params)
    layer = mask["layers_0"]
    assert layer["attn"]["q"]["kernel"] and layer["mlp"]["up"]["kernel"]
    assert not layer["attn"]["q"]["bias"] and not layer["mlp"]["down"]["bias"]
    assert not layer["attn_norm"]["scale"] and not layer["attn_norm"]["bias"]
    assert not mask["embed_norm"]["scale"] and not mask["embed_norm"]["bias"]
    assert mask["embed"]["embedding"] and mask["classifier"]["kernel"]
    assert not mask["classifier"]["bias"]
    # With zero gradients only the decayed leaves move.
    tx, _ = make_optimizer(dict(lr=0.1, weight_decay=0.5, clip_norm=0.0), 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    assert jax.tree.leaves(moved) == jax.tree.leaves(
        jax.tree.map(lambda m, p: bool(m and jnp.any(p != 0)), mask, params)
    )


def test_label_smoothing_matches_optax():
    logits = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    labels = jnp.array([0, 1, 2, 1, 0])
    ours = smoothed_cross_entropy(logits, labels, 0.1)
    ref = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(labels, 3), 0.1))
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


@functools.cache
def _compiled(grad_accum: int):
    """One optimizer and jitted step per grad_accum, shared by the tests (compiles once)."""
    mesh = sharding.make_mesh()
    tx, schedule = make_optimizer(OPTIM, 40)
    _, shardings = state_shardings(CFG, tx, mesh)
    return mesh, tx, shardings, jit_train_step(CFG, TASK, tx, schedule, shardings, mesh, grad_accum)


def _run(num_steps, grad_accum=1, start_state=None, start=0):
    mesh, tx, shardings, step = _compiled(grad_accum)
    state = start_state or jax.device_put(create_state(init_params(CFG, 0), tx), shardings)
    with mesh_context(mesh):
        rng = jax.random.PRNGKey(0)
        losses = []
        for i in range(start, num_steps):
            state, m = step(state, sharding.global_batch(synthetic_batch(i), mesh), rng)
            losses.append(float(m["loss"]))
    return state, losses, (tx, shardings, mesh)


def test_tiny_training_loss_falls():
    state, losses, _ = _run(40)
    assert int(state.step) == 40
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses


def test_grad_accum_equals_whole_batch():
    s1, l1, _ = _run(3, grad_accum=1)
    s4, l4, _ = _run(3, grad_accum=4)
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def test_eval_step_weights_ignore_padding():
    params = init_params(CFG, 0)
    batch = synthetic_batch(0)
    full = eval_step(params, batch, cfg=CFG, task=TASK)
    padded = {k: np.concatenate([v, v[:4]]) for k, v in batch.items()}
    padded["weights"][-4:] = 0
    pad = eval_step(params, padded, cfg=CFG, task=TASK)
    a, b = TASK.summary(jax.device_get(full)), TASK.summary(jax.device_get(pad))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5)
    assert float(pad["confusion"].sum()) == 16.0


def test_checkpoint_resume_is_bitwise(tmp_path):
    full, full_losses, _ = _run(8)
    # Train 5 steps, save, restore into a fresh process-like state, continue to 8.
    half, half_losses, (tx, shardings, mesh) = _run(5)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2, best_metric="eval/accuracy")
    ckpt.save(5, half, {"hello": 1}, metrics={"eval/accuracy": 0.5})
    ckpt.wait()
    ckpt2 = Checkpointer(str(tmp_path / "ckpt"), keep=2, best_metric="eval/accuracy")
    assert ckpt2.latest_step() == 5
    from lm.checkpoint import abstract_with_shardings

    abstract, _ = state_shardings(CFG, tx, mesh)
    restored, meta = ckpt2.restore(5, abstract_with_shardings(abstract, shardings))
    assert meta == {"hello": 1}
    resumed, rest_losses, _ = _run(8, start_state=restored, start=5)
    assert half_losses + rest_losses == full_losses
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpointer_keeps_last_k_and_best(tmp_path):
    ckpt = Checkpointer(
        str(tmp_path / "c"), keep=2, best_metric="eval/loss", higher_is_better=False
    )
    state = {"w": np.arange(3.0)}
    for step, loss in [(1, 0.9), (2, 0.3), (3, 0.5), (4, 0.6), (5, None), (6, 0.7)]:
        ckpt.save(step, state, {}, metrics=None if loss is None else {"eval/loss": loss})
        ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
