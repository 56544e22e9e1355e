"""Training: tasks (batch -> loss), TrainState, pure top-level train_step / eval_step, the loop.

    state = create_state(cfg, params, tx)
    state, metrics = train_step(state, batch, rng, cfg=cfg, task=task, tx=tx, schedule=schedule)
    sums = eval_step(state.params, batch, cfg=cfg, task=task)

The steps are pure functions of their arguments; ``jit_train_step`` / ``jit_eval_step`` bind the
static parts (model config, task, optimizer) with ``functools.partial`` and jit them with
explicit shardings (lm.sharding) and a donated state. The dropout key of step ``s`` is
``fold_in(PRNGKey(seed), s)``, and batch ``s`` is a pure function of ``(seed, s)`` (lm.data), so
a resumed run repeats the uninterrupted one bit for bit.

Tasks are small plug-ins: a ``Task`` turns ``(cfg, params, batch)`` into *sums* over the batch
(``loss``, ``weight`` and whatever its metrics need), never means: sums add across micro-batches
(gradient accumulation) and across eval batches (a padded last batch carries weight 0), and the
step divides once. ``summary`` turns accumulated sums into logged metrics (host side).

Batches (numpy dicts, from lm.data):
    classification: tokens, mask, token_types int32 [B, T]; labels int32 [B]; weights f32 [B]
    causal_lm:      tokens, targets, positions, segment_ids, mask int32 [B, T];
                    loss_mask f32 [B, T]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm.config import ModelConfig
from lm.metrics import confusion_scores
from lm.model import Transformer

Array = jax.Array

# --- tasks ---------------------------------------------------------------------------------


def _apply(cfg: ModelConfig, params, batch, rng, deterministic: bool, **inputs) -> dict:
    rngs = None if deterministic or rng is None else {"dropout": rng}
    return Transformer(cfg).apply(
        {"params": params}, batch["tokens"], deterministic=deterministic, rngs=rngs, **inputs
    )


def smoothed_cross_entropy(logits: Array, labels: Array, smoothing: float = 0.0) -> Array:
    """Cross-entropy [...] of float32 logits [..., C] against int labels [...], with label
    smoothing (Szegedy et al. 2016): the target puts ``smoothing / C`` on every class."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if not smoothing:
        return nll
    return (1.0 - smoothing) * nll - smoothing * jnp.mean(logp, axis=-1)


# --- classification ------------------------------------------------------------------------


def classification_sums(cfg, params, batch, rng, deterministic, label_smoothing=0.0, eval=False):
    out = _apply(
        cfg,
        params,
        batch,
        rng,
        deterministic,
        mask=batch["mask"],
        token_types=batch.get("token_types"),
    )
    logits = out["logits"]  # [B, C] float32
    labels = batch["labels"]  # [B]
    w = batch["weights"].astype(jnp.float32)  # [B]
    ce = smoothed_cross_entropy(logits, labels, label_smoothing)
    pred = jnp.argmax(logits, axis=-1)
    sums = {
        "loss": jnp.sum(w * ce),
        "weight": jnp.sum(w),
        "correct": jnp.sum(w * (pred == labels)),
    }
    if eval:
        c = logits.shape[-1]
        onehot_true = jax.nn.one_hot(labels, c, dtype=jnp.float32) * w[:, None]
        onehot_pred = jax.nn.one_hot(pred, c, dtype=jnp.float32)
        sums["confusion"] = onehot_true.T @ onehot_pred  # [C true, C predicted]
    return sums


def classification_summary(sums: dict[str, np.ndarray]) -> dict[str, float]:
    w = float(sums["weight"])
    out = {"loss": float(sums["loss"]) / max(w, 1e-12), "accuracy": float(sums["correct"]) / w}
    if "confusion" in sums:
        out.update(confusion_scores(sums["confusion"]))
    return out


# --- causal language modelling -------------------------------------------------------------


def causal_lm_sums(cfg, params, batch, rng, deterministic, label_smoothing=0.0, eval=False):
    out = _apply(
        cfg,
        params,
        batch,
        rng,
        deterministic,
        mask=batch["mask"],
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
    )
    w = batch["loss_mask"].astype(jnp.float32)  # [B, T]
    ce = smoothed_cross_entropy(out["logits"], batch["targets"], label_smoothing)
    return {"loss": jnp.sum(w * ce), "weight": jnp.sum(w)}


def causal_lm_summary(sums: dict[str, np.ndarray]) -> dict[str, float]:
    loss = float(sums["loss"]) / max(float(sums["weight"]), 1e-12)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


@dataclasses.dataclass(frozen=True)
class Task:
    """A task plug-in.

    Attributes:
        name: the ``config.task`` string.
        head: the model head it needs (``ModelConfig.head``).
        sums: ``(cfg, params, batch, rng, deterministic, label_smoothing, eval) -> dict`` of
            jnp scalars/arrays that add over batches; must contain ``loss`` and ``weight``.
        summary: accumulated numpy sums -> metrics (``loss`` and the task's scores).
        default_metric: the eval metric early stopping and "best checkpoint" use by default,
            and whether larger is better.
    """

    name: str
    head: str
    sums: Callable
    summary: Callable
    default_metric: str = "loss"
    higher_is_better: bool = False


TASKS: dict[str, Task] = {
    "classification": Task(
        "classification",
        "classification",
        classification_sums,
        classification_summary,
        "accuracy",
        True,
    ),
    "causal_lm": Task("causal_lm", "lm", causal_lm_sums, causal_lm_summary, "loss", False),
}

# Eval metrics where larger is better (everything else, e.g. loss/perplexity, is minimized).
HIGHER_IS_BETTER = {"accuracy", "f1"}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not one of {sorted(TASKS)}")
    return TASKS[name]


# --- state and steps -----------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: the update count, parameters and optimizer state."""

    step: Array  # int32 scalar: updates applied so far
    params: Any
    opt_state: Any


def create_state(params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _split_micro(x: Array, n: int) -> Array:
    # Micro-batch j takes rows j, j + n, j + 2n, ...: with the batch split over devices, every
    # micro-batch stays spread over all of them.
    if x.shape[0] % n:
        raise ValueError(f"batch of {x.shape[0]} rows does not split into grad_accum={n}")
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)


def train_step(
    state: TrainState,
    batch: dict[str, Array],
    rng: Array,
    *,
    cfg: ModelConfig,
    task: Task,
    tx: optax.GradientTransformation,
    schedule: Callable | None = None,
    grad_accum: int = 1,
    label_smoothing: float = 0.0,
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update from one global batch.

    Args:
        state: the current TrainState (donated by the jitted caller).
        batch: the task's batch dict, leading dimension = global batch.
        rng: the run's base key; this step's dropout key is ``fold_in(rng, state.step)``.
        grad_accum: split the batch into this many micro-batches, scanned sequentially (less
            memory); the summed gradient is divided once by the total weight, so the update
            equals the one from the whole batch.

    Returns:
        The new state, and scalar metrics of the batch: ``loss``, ``lr``, ``grad_norm`` and
        the task's own (e.g. ``accuracy``).
    """
    rng = jax.random.fold_in(rng, state.step)
    deterministic = cfg.dropout_rate == 0 and cfg.attn_dropout_rate == 0 and cfg.lora_dropout == 0

    def grads_of(mb, key):
        def f(p):
            sums = task.sums(cfg, p, mb, key, deterministic, label_smoothing)
            return sums["loss"], sums

        return jax.grad(f, has_aux=True)(state.params)

    if grad_accum == 1:
        grads, sums = grads_of(batch, rng)
    else:
        micro = jax.tree.map(lambda x: _split_micro(x, grad_accum), batch)
        first = jax.tree.map(lambda x: x[0], micro)
        zero = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grads_of, first, rng)
        )

        def body(carry, xs):
            mb, i = xs
            return _tree_add(carry, grads_of(mb, jax.random.fold_in(rng, i))), None

        (grads, sums), _ = jax.lax.scan(body, zero, (micro, jnp.arange(grad_accum)))
    weight = jnp.maximum(sums["weight"], 1e-12)
    grads = jax.tree.map(lambda g: g / weight.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": sums["loss"] / weight, "grad_norm": optax.global_norm(grads)}
    if "correct" in sums:
        metrics["accuracy"] = sums["correct"] / weight
    if schedule is not None:
        metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(params, batch: dict[str, Array], *, cfg: ModelConfig, task: Task) -> dict:
    """The task's sums over one eval batch (dropout off); add them up, then ``task.summary``."""
    return task.sums(cfg, params, batch, None, True, 0.0, True)


def predict_step(params, batch: dict[str, Array], *, cfg: ModelConfig) -> Array:
    """Class probabilities [B, C] (float32) of a classification batch."""
    out = Transformer(cfg).apply(
        {"params": params},
        batch["tokens"],
        mask=batch["mask"],
        token_types=batch.get("token_types"),
        deterministic=True,
    )
    return jax.nn.softmax(out["logits"], axis=-1)
