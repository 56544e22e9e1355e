"""Optimizer and learning-rate schedules built from the experiment config's ``optim`` section.

The recipe is BERT's fine-tuning one (Devlin et al. 2019) as transformers' Trainer runs it:
global-norm clipping, then AdamW (Loshchilov & Hutter 2019) with decoupled weight decay that
skips biases and norm parameters, under a warmup + linear (or cosine) decay schedule.

    tx, schedule = make_optimizer(config.optim, num_steps)

Gradient accumulation is not an optax wrapper here: ``lm.train.train_step`` scans over
micro-batches and applies one update, so a global batch gives the same update whatever
``grad_accum`` is.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("linear", "cosine", "constant")


def warmup_steps(optim: Any, num_steps: int) -> int:
    """``optim.warmup_steps`` if set (> 0), else ``round(optim.warmup_frac * num_steps)``."""
    steps = int(optim.get("warmup_steps", 0) or 0)
    if steps > 0:
        return steps
    return int(round(float(optim.get("warmup_frac", 0.0) or 0.0) * num_steps))


def make_schedule(
    lr: float, num_steps: int, warmup: int = 0, kind: str = "linear", end_lr: float = 0.0
) -> optax.Schedule:
    """Learning rate as a function of the update count (0-based, as optax counts).

    warmup: lr rises linearly from 0 over ``warmup`` updates (as transformers'
        ``get_linear_schedule_with_warmup``: the first update uses lr 0 when warmup > 0).
    kind: after warmup, "linear" decays to ``end_lr`` at ``num_steps``, "cosine" follows half a
        cosine to ``end_lr`` (Loshchilov & Hutter 2017), "constant" stays at ``lr``.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"optim.schedule={kind!r} is not one of {SCHEDULES}")
    warmup = max(0, min(int(warmup), int(num_steps)))
    decay = max(1, int(num_steps) - warmup)
    if kind == "linear":
        after = optax.linear_schedule(lr, end_lr, decay)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, decay, alpha=end_lr / lr if lr else 0.0)
    else:
        after = optax.constant_schedule(lr)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def decay_mask(params) -> Any:
    """True for parameters that get weight decay: matrices (kernels, embedding tables).

    Biases and norm scales/biases are vectors and are left alone, as in BERT's and
    transformers' recipe (``no_decay = ["bias", "LayerNorm.weight"]``).
    """
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(
    optim: Any, num_steps: int, trainable=None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain for ``optim`` (a ConfigDict/dict), and its schedule.

    Args:
        optim: keys ``lr, weight_decay, warmup_steps | warmup_frac, schedule, end_lr,
            clip_norm, b1, b2, eps``.
        num_steps: total number of updates (the schedule's horizon).
        trainable: optional pytree of bools (or a function params -> such a tree); frozen
            parameters get zero updates and no optimizer state (LoRA trains adapters only).

    Returns:
        ``(tx, schedule)``: the GradientTransformation and lr(step).
    """
    lr = float(optim.get("lr", 1e-3))
    schedule = make_schedule(
        lr,
        num_steps,
        warmup_steps(optim, num_steps),
        optim.get("schedule", "linear"),
        float(optim.get("end_lr", 0.0) or 0.0),
    )
    parts = []
    clip = optim.get("clip_norm", 0.0)
    if clip:
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(optim.get("b1", 0.9)),
            b2=float(optim.get("b2", 0.999)),
            eps=float(optim.get("eps", 1e-8)),
            weight_decay=float(optim.get("weight_decay", 0.0)),
            mask=decay_mask,
        )
    )
    tx = optax.chain(*parts)
    if trainable is not None:
        frozen = (
            (lambda p: jax.tree.map(lambda t: not t, trainable(p)))
            if callable(trainable)
            else jax.tree.map(lambda t: not t, trainable)
        )
        tx = optax.chain(optax.masked(tx, trainable), optax.masked(optax.set_to_zero(), frozen))
    return tx, schedule
