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

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.sharding import Mesh

from lm import lora, memory, sharding, xla_cache
from lm.config import ModelConfig
from lm.metrics import confusion_scores, write_json
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
        mask=batch.get("mask"),
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


def early_stop_metric(config) -> str:
    """The eval metric that early stopping, the best checkpoint and sweep tables follow:
    ``config.train.early_stop_metric``, or the task's default ("eval/accuracy", "eval/loss")."""
    m = config.train.early_stop_metric or get_task(config.task).default_metric
    return "eval/" + m.removeprefix("eval/")


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
    frozen: dict | None = None,
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
        frozen: LoRA's frozen base parameters (``lm.lora.adapters_and_base``); then
            ``state.params`` holds the adapters alone, and only they get gradients.
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
            full = p if frozen is None else lora.combine(p, frozen)
            sums = task.sums(cfg, full, mb, key, deterministic, label_smoothing)
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


def eval_step(
    params, batch: dict[str, Array], frozen: dict | None = None, *, cfg: ModelConfig, task: Task
) -> dict:
    """The task's sums over one eval batch (dropout off); add them up, then ``task.summary``."""
    if frozen is not None:
        params = lora.combine(params, frozen)
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


# --- jitting with shardings ----------------------------------------------------------------


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules=sharding.DEFAULT_RULES):
    """Call jitted steps under ``mesh`` and the logical-axis ``rules`` (activation constraints
    apply when they are traced). Build states and shardings outside it."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield


def state_shardings(cfg: ModelConfig, tx, mesh: Mesh, rules=sharding.DEFAULT_RULES):
    """``(abstract_state, shardings)``: the TrainState's ShapeDtypeStructs and NamedShardings,
    derived from ``jax.eval_shape`` of the init (no memory is allocated)."""
    from lm.model import param_shapes

    params_struct = param_shapes(cfg)
    param_sh = sharding.param_shardings(cfg, mesh, rules)
    if cfg.lora_rank:  # the state holds (and checkpoints) the adapters alone
        params_struct = lora.adapters_and_base(params_struct)[0]
        param_sh = lora.adapters_and_base(param_sh)[0]
    abstract = jax.eval_shape(functools.partial(create_state, tx=tx), params_struct)
    opt_sh = sharding.tree_shardings_like(abstract.opt_state, param_sh, params_struct, mesh)
    shardings = TrainState(sharding.replicated(mesh), param_sh, opt_sh)
    return abstract, shardings


def jit_train_step(
    cfg,
    task,
    tx,
    schedule,
    shardings,
    mesh,
    grad_accum=1,
    label_smoothing=0.0,
    frozen_shardings=None,
):
    """``train_step`` bound to its static parts, jitted with explicit shardings; donates the
    state. Call as ``step(state, batch, rng)``, or ``step(state, batch, rng, frozen)`` with
    ``frozen_shardings`` (LoRA)."""
    fn = functools.partial(
        train_step,
        cfg=cfg,
        task=task,
        tx=tx,
        schedule=schedule,
        grad_accum=grad_accum,
        label_smoothing=label_smoothing,
    )
    # P(('data', 'fsdp')) splits the first dim of a leaf of any rank: one sharding for all.
    batch_sh = sharding.batch_sharding(mesh, 1)
    rep = sharding.replicated(mesh)
    extra = () if frozen_shardings is None else (frozen_shardings,)
    return jax.jit(
        fn,
        in_shardings=(shardings, batch_sh, rep, *extra),
        out_shardings=(shardings, rep),
        donate_argnums=0,
    )


def jit_eval_step(cfg, task, param_shardings, mesh, frozen_shardings=None):
    fn = functools.partial(eval_step, cfg=cfg, task=task)
    rep = sharding.replicated(mesh)
    extra = () if frozen_shardings is None else (frozen_shardings,)
    return jax.jit(
        fn,
        in_shardings=(param_shardings, sharding.batch_sharding(mesh, 1), *extra),
        out_shardings=rep,
    )


# --- the loop ------------------------------------------------------------------------------


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN/Inf loss); the message names the step and the checkpoint
    that is kept."""


class Preempted(RuntimeError):
    """SIGTERM/SIGINT (or a multi-host preemption notice) arrived: the current step finished,
    a checkpoint of it was written, and a relaunch in the same workdir resumes from it."""


class _PreemptionWatch:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step.

    One process: the signal handler sets the flag (a second signal exits at once, the way a
    user expects a second Ctrl-C to). Several processes: every host must save the same step, so
    the decision comes from JAX's preemption sync point through Orbax
    (``CheckpointManager.reached_preemption``), not from local signals.
    """

    def __init__(self, ckpt, multiprocess: bool):
        self.ckpt, self.multiprocess, self.signum = ckpt, multiprocess, None
        self._old = {}

    def __enter__(self):
        if not self.multiprocess and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt(f"signal {signum} received twice")
        self.signum = signum
        print(f"\nsignal {signum}: finishing this step and writing a checkpoint", file=sys.stderr)

    def requested(self, step: int) -> bool:
        if self.multiprocess:
            return bool(self.ckpt.manager.reached_preemption(step))
        return self.signum is not None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class WorkdirError(RuntimeError):
    """The workdir holds a different run (another model, data or recipe)."""


RUN_FILES = ("checkpoints", "metrics.jsonl", "tb", "curves.png", "model.json", "tokenizer")


def check_workdir(config, workdir: str) -> bool:
    """Refuse a workdir holding a different run, unless ``config.overwrite`` (then clear it).

    Returns:
        True when the workdir holds this run already (a relaunch resumes it).
    """
    from lm.experiment import config_differences, config_to_dict

    path = os.path.join(workdir, "config.json")
    has_ckpt = os.path.isdir(os.path.join(workdir, "checkpoints")) and bool(
        os.listdir(os.path.join(workdir, "checkpoints"))
    )
    if not os.path.exists(path):
        if has_ckpt and not config.overwrite:
            raise WorkdirError(
                f"{workdir} holds checkpoints but no config.json; refusing to mix runs "
                "(use another --workdir, or --config.overwrite=True to discard them)"
            )
        diffs = ["(no config.json)"] if has_ckpt else []
    else:
        with open(path) as f:
            old = json.load(f)
        diffs = config_differences(old, config_to_dict(config))
    if not diffs:
        return os.path.exists(path)
    if not config.overwrite:
        shown = "\n  ".join(diffs[:10]) + (
            f"\n  ... {len(diffs) - 10} more" if len(diffs) > 10 else ""
        )
        raise WorkdirError(
            f"{workdir} holds another run whose config differs:\n  {shown}\n"
            "Use another --workdir, or pass --config.overwrite=True to discard that run."
        )
    for name in RUN_FILES + ("config.json",):
        p = os.path.join(workdir, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)
    return False


@functools.lru_cache(maxsize=8)
def compiled_steps(
    cfg: ModelConfig, task_name: str, optim_json: str, num_steps: int, mesh_shape, rules
):
    """Optimizer, shardings and jitted init/train/eval steps of a run, cached per process so a
    relaunch (or a sweep, or a test) in the same process compiles nothing again.

    Returns:
        ``(tx, schedule, abstract_state, state_shardings, init, train_step, eval_step,
        frozen_shardings)``; with LoRA (``cfg.lora_rank``) the state holds the adapters and
        the steps take the frozen base as a last argument (``frozen_shardings``, else None).
    """
    from lm.optim import make_optimizer

    o = json.loads(optim_json)
    task = get_task(task_name)
    mesh = sharding.make_mesh(dict(zip(sharding.AXES, mesh_shape, strict=True)))
    tx, schedule = make_optimizer(o, num_steps)
    abstract, shardings = state_shardings(cfg, tx, mesh, rules)
    frozen_sh = None
    if cfg.lora_rank:
        frozen_sh = lora.adapters_and_base(sharding.param_shardings(cfg, mesh, rules))[1]
    init = jax.jit(functools.partial(create_state, tx=tx), out_shardings=shardings)
    step_fn = jit_train_step(
        cfg,
        task,
        tx,
        schedule,
        shardings,
        mesh,
        int(o.get("grad_accum", 1)),
        float(o.get("label_smoothing", 0.0)),
        frozen_sh,
    )
    eval_fn = jit_eval_step(cfg, task, shardings.params, mesh, frozen_sh)
    return tx, schedule, abstract, shardings, init, step_fn, eval_fn, frozen_sh


def _precompile(init, step_fn, eval_fn, abstract, shardings, mesh, rules, rng, batch, eval_batch):
    """Compile ``init`` (None: skip), the train step and the eval step for the shapes of the
    first batches, as the loop calls them (same shardings and context: the jitted functions
    keep the executables, so those calls compile nothing). A later bucket's shape compiles on
    its first use, as before."""
    from lm.checkpoint import abstract_with_shardings

    state = abstract_with_shardings(abstract, shardings)
    if init is not None:
        init.lower(state.params).compile()

    def put(b):
        return sharding.global_batch(sharding.process_local(b, mesh), mesh)

    with mesh_context(mesh, rules):
        step_fn.lower(state, put(batch), rng).compile()
        if eval_batch is not None:
            eval_fn.lower(state.params, put(eval_batch)).compile()


def _eval_sums(eval_fn, params, batches, mesh, extra=()) -> dict:
    total = None
    for b in batches:
        s = eval_fn(params, sharding.global_batch(sharding.process_local(b, mesh), mesh), *extra)
        total = s if total is None else jax.tree.map(jnp.add, total, s)
    return jax.device_get(total)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def run(config, workdir: str) -> dict:
    """Fine-tune (or train) as ``config`` says, in ``workdir``; resume if it holds this run.

    Writes ``config.json``, ``model.json`` (ModelConfig, labels, steps), ``tokenizer/``,
    ``checkpoints/``, ``metrics.jsonl``, ``tb/`` and ``curves.png``.

    Returns:
        A summary: ``step``, ``best_step``, ``best`` (the early-stopping metric), ``eval`` (the
        last eval metrics), ``train_examples_per_s``, ``stopped`` (why the loop ended).

    Raises:
        ConfigError, lm.data.DataError, WorkdirError: before anything is compiled.
        TrainingError: a NaN/Inf loss (the last good checkpoint is kept).
    """
    from lm import data as lmdata
    from lm import experiment
    from lm.checkpoint import Checkpointer, abstract_with_shardings
    from lm.metrics import MetricWriter

    experiment.validate(config)
    # A relaunch of this run (resume, preemption) loads its compiled steps from disk.
    xla_cache.use(config.get("compilation_cache"))
    memory.keep_freed_memory()  # each step's buffers reused, not faulted in again (lm.memory)
    # Multi-process runs meet here (config.distributed, LM_* variables, SLURM/TPU detection),
    # before anything touches a device; a no-op on one process.
    from lm import distributed

    distributed.initialize(config.get("distributed"))
    primary = jax.process_index() == 0  # writes the run's files; every process trains
    task = get_task(config.task)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    check_workdir(config, workdir)

    # Data before the model: a bad file is reported in seconds.
    if task.name == "causal_lm":
        from lm import causal

        cdata = causal.load_data(config)
        tokenizer, labels = cdata.tokenizer, []
        num_train, num_eval = cdata.num_train, cdata.num_eval
        load_model = functools.partial(causal.load_model, config, cdata)
        cfg = causal.preset_model_config(config, cdata)
    else:
        tokenizer = experiment.load_tokenizer(config)
        ds = experiment.load_classification_data(config, tokenizer, 1 << 30)
        labels = list(ds.label_names)
        num_train, num_eval = len(ds.train), len(ds.eval) if ds.eval is not None else 0
        load_model = functools.partial(experiment.load_model, config, num_labels=len(labels))
        cfg = experiment.preset_model_config(config, num_labels=len(labels))
    has_eval = num_eval > 0
    # A preset's config is known before its parameters exist: they are initialized in a thread
    # while this one compiles the train and eval steps (_precompile). Both are mostly XLA
    # compilation, which runs outside the GIL: for the Shakespeare model the init's ~3.5 s
    # (XLA:CPU spends ~0.13 s on each random-number fusion) beside the step's ~3.9 s.
    # A checkpoint's config comes with its weights: loaded here first.
    loading = None
    if cfg is not None and not cfg.lora_rank:
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lm-init")
        loading = pool.submit(load_model)
        pool.shutdown(wait=False)  # its one task still runs; the thread ends with it
    model = None if loading else load_model()
    cfg = model.cfg if model else cfg
    if config.data.max_len > cfg.max_len:
        raise experiment.ConfigError(
            f"config.data.max_len={config.data.max_len} exceeds the model's position limit "
            f"{cfg.max_len}"
        )
    t, o = config.train, config.optim
    batch_size = int(t.batch_size)
    num_steps = int(t.num_steps) or lmdata.num_train_steps(num_train, batch_size, t.num_epochs)
    mesh = sharding.make_mesh(
        dict(data=config.mesh.data, fsdp=config.mesh.fsdp, tensor=config.mesh.tensor)
    )
    rules = sharding.rules_from_config(config.mesh.rules)
    div = sharding.batch_divisor(mesh) * int(o.grad_accum)
    if batch_size % div:
        raise experiment.ConfigError(
            f"config.train.batch_size={batch_size} must be a multiple of {div} "
            f"(data x fsdp devices {sharding.batch_divisor(mesh)} x grad_accum {o.grad_accum})"
        )
    eval_bs = _round_up(int(t.eval_batch_size) or 2 * batch_size, sharding.batch_divisor(mesh))
    metric = early_stop_metric(config)
    higher = metric.removeprefix("eval/") in HIGHER_IS_BETTER

    rng = jax.random.PRNGKey(int(t.seed))
    buckets = experiment.buckets(config)
    group = int(config.data.group_batches)

    if task.name == "causal_lm":

        def train_batch(step):
            return cdata.train_batch(batch_size, int(t.seed), step)

        def eval_batches():
            return cdata.eval_batches(eval_bs)
    else:

        def train_batch(step):
            return lmdata.classification_train_batch(
                ds.train, batch_size, int(t.seed), step, buckets, group_batches=group
            )

        def eval_batches():
            return lmdata.classification_eval_batches(ds.eval, eval_bs, buckets)

    tx, schedule, abstract, shardings, init, step_fn, eval_fn, frozen_sh = compiled_steps(
        cfg,
        task.name,
        json.dumps(o.to_dict(), sort_keys=True),
        num_steps,
        tuple(mesh.devices.shape),
        rules,
    )
    ckpt_cfg = config.checkpoint
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=ckpt_cfg.keep,
        best_metric=metric if has_eval else None,
        higher_is_better=higher,
        async_save=ckpt_cfg.async_save,
    )
    dbg = config.debug
    jax.config.update("jax_debug_nans", bool(dbg.nans))  # before any step is traced
    start = ckpt.latest_step()
    if loading is not None:
        try:
            first_eval = next(iter(eval_batches()), None) if has_eval else None
            batches = (train_batch(start or 0), first_eval)
            init_fn = init if start is None else None
            _precompile(init_fn, step_fn, eval_fn, abstract, shardings, mesh, rules, rng, *batches)
        finally:
            model = loading.result()
        if model.cfg != cfg:  # what was compiled must be what was loaded
            raise RuntimeError(f"the preset loaded as {model.cfg}, not {cfg}")
    params, extra = model.params, ()
    if cfg.lora_rank:  # train and checkpoint the adapters; the base comes from model.name
        params, frozen = lora.adapters_and_base(params)
        extra = (jax.device_put(frozen, frozen_sh),)
    if start is not None:
        state, meta = ckpt.restore(start, abstract_with_shardings(abstract, shardings))
        print(f"Resuming {workdir} from step {start}", file=sys.stderr)
    else:
        state, meta, start = init(jax.device_put(params, shardings.params)), {}, 0
    del model, params

    from lm.experiment import config_to_dict

    _write_json(os.path.join(workdir, "config.json"), config_to_dict(config))
    _write_json(
        os.path.join(workdir, "model.json"),
        dict(
            task=task.name,
            model_config=dataclasses.asdict(cfg),
            labels=labels,
            num_steps=num_steps,
            num_train_examples=num_train,
            num_eval_examples=num_eval,
            max_len=int(config.data.max_len),
        ),
    )
    if tokenizer is not None and not os.path.exists(os.path.join(workdir, "tokenizer")):
        tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))

    writer = MetricWriter(workdir, resume_step=start) if primary else _NullWriter()

    best, best_step = meta.get("best"), meta.get("best_step")
    bad_evals = int(meta.get("bad_evals", 0))
    last_eval = {}
    summary = dict(step=start, stopped="finished")
    if meta.get("done"):
        print(
            f"{workdir}: this run finished at step {start} ({meta.get('stopped')})", file=sys.stderr
        )
        ckpt.close()
        writer.close()
        return dict(summary, best=best, best_step=best_step, stopped=meta.get("stopped"))

    def save(step, metrics=None, done=False, stopped=None):
        m = dict(best=best, best_step=best_step, bad_evals=bad_evals, done=done, stopped=stopped)
        with _checkpoint_errors(ckpt):
            ckpt.save(step, state, m, metrics=metrics)

    bar = tqdm.tqdm(
        total=num_steps, initial=start, disable=not t.progress, unit="step", dynamic_ncols=True
    )
    window, prev, examples_per_s = [], None, float("nan")
    win_start, train_time, train_examples = time.perf_counter(), 0.0, 0
    step = start
    stopped = "finished"
    watch = _PreemptionWatch(ckpt, jax.process_count() > 1)
    profile = _Profile(
        os.path.join(workdir, "profile"), int(dbg.profile_start), int(dbg.profile_steps)
    )
    try:
        with mesh_context(mesh, rules), watch:
            while step < num_steps:
                profile.before(step)
                batch = train_batch(step)
                local = sharding.process_local(batch, mesh)  # this process's rows
                state, metrics = step_fn(state, sharding.global_batch(local, mesh), rng, *extra)
                step += 1
                # Check the previous step's loss while this one runs (keeps the device busy).
                if prev is not None:
                    window.append(_finite_or_raise(prev, ckpt))
                prev = (step, metrics)
                log_now = step % t.log_every == 0 or step == num_steps
                eval_now = has_eval and (
                    (t.eval_every and step % t.eval_every == 0) or step == num_steps
                )
                save_now = (ckpt_cfg.every_steps and step % ckpt_cfg.every_steps == 0) or eval_now
                if log_now or eval_now or save_now:
                    window.append(_finite_or_raise(prev, ckpt))
                    prev = None
                    elapsed = time.perf_counter() - win_start
                    n = len(window)
                    train_time += elapsed
                    train_examples += n * batch_size
                    examples_per_s = n * batch_size / max(elapsed, 1e-9)
                    if log_now and window:
                        row = {
                            f"train/{k}": float(np.mean([w[k] for w in window])) for k in window[-1]
                        }
                        row["train/lr"] = window[-1]["lr"]
                        row["train/examples_per_s"] = examples_per_s
                        writer.write(step, row)
                        bar.set_postfix(
                            loss=f"{row['train/loss']:.4f}", ex_s=f"{examples_per_s:.1f}"
                        )
                        window = []
                    bar.update(step - bar.n)
                    if eval_now:
                        last_eval = {
                            f"eval/{k}": v
                            for k, v in task.summary(
                                _eval_sums(eval_fn, state.params, eval_batches(), mesh, extra)
                            ).items()
                        }
                        writer.write(step, last_eval)
                        bar.write(
                            f"step {step}: "
                            + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items())
                        )
                        v = last_eval[metric]
                        if best is None or (v > best if higher else v < best):
                            best, best_step, bad_evals = v, step, 0
                        else:
                            bad_evals += 1
                            if v == best:  # a tie: the later checkpoint is the one kept
                                best_step = step
                        if t.patience and bad_evals >= t.patience:
                            stopped = f"early stop: {metric} did not improve for {bad_evals} evals"
                    if save_now or stopped != "finished":
                        done = step == num_steps or stopped != "finished"
                        save(step, last_eval if eval_now else None, done, stopped if done else None)
                    writer.flush()
                    win_start = time.perf_counter()
                    if stopped != "finished":
                        break
                else:
                    bar.update(step - bar.n)
                profile.after(step, state)
                if watch.requested(step) and step < num_steps:
                    if prev is not None:  # never checkpoint a state whose loss was not finite
                        window.append(_finite_or_raise(prev, ckpt))
                        prev = None
                    if window:
                        writer.write(
                            step,
                            {
                                f"train/{k}": float(np.mean([w[k] for w in window]))
                                for k in window[-1]
                            },
                        )
                        window = []
                    if step not in ckpt.all_steps():
                        save(step)
                    stopped = "preempted"
                    break
    except BaseException as e:
        # NaN, Ctrl-C, a crash: let pending saves (all of good states) finish, keep the logs.
        bar.close()
        try:
            with _checkpoint_errors(ckpt):
                ckpt.close()
        except TrainingError:
            if not isinstance(e, TrainingError):
                raise
        writer.close()
        raise
    bar.close()
    if stopped == "preempted":
        ckpt.close()
        writer.close()
        raise Preempted(
            f"preempted at step {step}: checkpoint written to {ckpt.directory}; "
            "relaunch the same command to resume"
        )
    if step not in ckpt.all_steps():
        save(step, None, True, stopped)
    with _checkpoint_errors(ckpt):
        ckpt.close()
    writer.plot(metric)
    writer.close()
    summary.update(
        step=step,
        best=best,
        best_step=best_step,
        eval=last_eval,
        train_examples_per_s=train_examples / train_time if train_time else float("nan"),
        stopped=stopped,
    )
    return summary


@contextlib.contextmanager
def _checkpoint_errors(ckpt):
    """A failed checkpoint write (disk full, quota, permissions) as one TrainingError naming
    the last complete checkpoint; Orbax only lists checkpoints whose write finished."""
    try:
        yield
    except OSError as e:
        try:
            ckpt.manager.wait_until_finished()
        except OSError:
            pass
        steps = [s for s in ckpt.all_steps()]
        last = max(steps) if steps else None
        kept = (
            f"the last complete checkpoint is step {last}" if last else "no checkpoint is complete"
        )
        raise TrainingError(f"checkpoint write failed in {ckpt.directory}: {e}; {kept}") from e


class _Profile:
    """A ``jax.profiler`` trace of steps [start, start + n) into ``directory`` (TensorBoard's
    profile plugin or Perfetto open it); n = 0 traces nothing."""

    def __init__(self, directory: str, start: int, n: int):
        self.directory, self.start, self.stop, self.active = directory, start, start + n, False
        self.enabled = n > 0 and jax.process_index() == 0

    def before(self, step: int) -> None:
        if self.enabled and not self.active and self.start <= step < self.stop:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step >= self.stop:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            print(
                f"profile of steps {self.start}..{self.stop - 1} written to {self.directory}",
                file=sys.stderr,
            )


class _NullWriter:
    """What processes other than 0 log to: process 0 writes metrics.jsonl, TB and curves."""

    def write(self, step, metrics):
        pass

    def flush(self):
        pass

    def plot(self, metric=None):
        return None

    def close(self):
        pass


def _finite_or_raise(prev, ckpt) -> dict:
    step, metrics = prev
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(host["loss"]):
        ckpt.wait()
        last = ckpt.latest_step()
        kept = f"the last good checkpoint is step {last}" if last else "no checkpoint was saved"
        raise TrainingError(
            f"loss is {host['loss']} at step {step}; training stopped, {kept} "
            "(lower optim.lr, check the data, or set optim.clip_norm)"
        )
    return host


def _write_json(path: str, obj) -> None:
    write_json(path, obj, indent=2, sort_keys=True, default=str)
