"""The experiment config: its schema, its validation, and the one conversion into ModelConfig.

An experiment is an ``ml_collections.ConfigDict`` built on ``base_config()`` by a file in
``configs/`` and overridden on the command line (``--config.optim.lr=1e-4``). Sections:

    task        "classification" | "causal_lm" (lm.train.TASKS)
    model       name (short name, HF dir, hub id, .gguf, or a preset name for random init),
                dtype, param_dtype, and any other ModelConfig field as an override
                (None: keep the checkpoint's value)
    data        lm.data's keys: local files or a TFDS name, columns, labels, max_len
    train       num_steps | num_epochs, batch_size, seed, log_every, eval_every, early stopping
    optim       lr, weight_decay, warmup_steps | warmup_frac, schedule, clip_norm, grad_accum, ...
    checkpoint  every_steps, keep
    mesh        data, fsdp, tensor (-1: all remaining devices), rules (lm.sharding)
    distributed reserved for multi-process runs

Everything is checked here, before any model is loaded or compiled: unknown keys (with close
matches), wrong types, values outside their choices. ``model_config`` is the only function that
turns the experiment config into a ModelConfig (STYLE.md principle 1).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import os
import sys
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict as cd

from lm.config import PRESETS, ModelConfig

DTYPES = ("float32", "bfloat16", "float16")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
SCHEDULES = ("linear", "cosine", "constant")
ATTENTION_IMPLS = ("xla", "native", "cudnn", "auto")
BLOCK_IMPLS = ("xla", "native")


class ConfigError(ValueError):
    """An experiment config that cannot run; the message names the key and what was expected."""


# ModelConfig fields the experiment may override, with their types (rope_scaling is a nested
# tuple and stays out: set it through a checkpoint or a preset; matmul_impl and packed_weights
# are decoding's runtime choices, and the native kernel has no gradient).
def _model_fields() -> dict[str, type]:
    out = {}
    hints = typing.get_type_hints(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        t = hints[f.name]
        if f.name in ("matmul_impl", "packed_weights"):
            continue
        if t in (int, float, bool, str):
            out[f.name] = t
        elif typing.get_origin(t) is tuple and f.name != "rope_scaling":
            out[f.name] = tuple
    return out


MODEL_FIELDS = _model_fields()


def base_config() -> ml_collections.ConfigDict:
    """Every key an experiment may set, with its default. Configs start from this."""
    c = ml_collections.ConfigDict()
    c.task = "classification"
    c.overwrite = False  # True: a workdir holding a different run is wiped and started afresh
    c.compilation_cache = "~/.cache/lm/xla"  # jax's persistent cache (lm.xla_cache); "": off

    c.model = ml_collections.ConfigDict()
    for name, t in MODEL_FIELDS.items():
        c.model[name] = cd.placeholder(t)
    c.model.name = "minilm-l6"
    c.model.dtype = "float32"  # or "auto": bfloat16 where it is fast (see auto_dtype)
    c.model.param_dtype = "float32"

    c.data = ml_collections.ConfigDict(
        dict(
            tokenizer=cd.placeholder(str),  # checkpoint whose tokenizer to use; default model.name
            name="",  # "sst2" (bundled), a TFDS registry name ("glue/sst2"), or "" for files
            train_files=cd.placeholder(str),  # one path, a glob, or a comma-separated list
            eval_files=cd.placeholder(str),
            format=cd.placeholder(str),  # "tsv" | "csv" | "jsonl" (default: from the suffix)
            has_header=True,
            text_columns=("sentence",),  # one or two; names with a header, 0-based indices without
            label_column=cd.placeholder(object),  # name or index; default "label" / last column
            labels=cd.placeholder(tuple),  # the label set; default: inferred from train_files
            max_len=128,
            too_long="truncate",  # longer examples: "truncate" (with a warning) | "error"
            train_split="train",
            eval_split="validation",
            buckets=cd.placeholder(tuple),  # padded lengths; default: default_buckets(max_len)
            group_batches=0,  # > 1: batch examples of similar length within windows of N batches
            max_train_examples=0,  # 0: all; >0 keeps the first N (smoke runs)
            max_eval_examples=0,
            cache_dir=cd.placeholder(str),
            # causal_lm (lm.causal): "chars" reads one text file (train_files; default the
            # bundled tiny Shakespeare), holding out its last eval_fraction; "sft" reads JSONL
            # conversations (train_files / eval_files, or name="sst2_instruct") and packs them.
            # max_len is the row length (context) of both.
            kind="chars",
            eval_fraction=0.1,
        )
    )
    # LoRA (lm.lora) on the Dense modules named in targets; rank 0 trains every parameter.
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets=("q", "v")))
    c.train = ml_collections.ConfigDict(
        dict(
            num_steps=0,  # > 0 wins over num_epochs
            num_epochs=1.0,
            batch_size=32,  # global batch (all devices, before grad_accum splits it)
            eval_batch_size=0,  # 0: 2 x batch_size
            seed=0,
            log_every=50,
            eval_every=500,  # 0: evaluate at the end only
            early_stop_metric="",  # "" = the task's default (classification: eval/accuracy)
            patience=0,  # evaluations without improvement before stopping; 0 = never stop
            progress=True,  # tqdm progress bar
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=5e-5,
            weight_decay=0.01,
            warmup_steps=0,
            warmup_frac=0.0,  # used when warmup_steps is 0
            schedule="linear",
            end_lr=0.0,
            clip_norm=1.0,
            grad_accum=1,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            label_smoothing=0.0,
        )
    )
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=2, async_save=True))
    c.debug = ml_collections.ConfigDict(
        dict(
            nans=False,  # jax_debug_nans: re-run the failing op eagerly and raise at the first NaN
            profile_steps=0,  # > 0: jax.profiler trace of that many steps into workdir/profile
            profile_start=2,  # the first traced step (after compilation)
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=cd.placeholder(tuple)))
    c.distributed = ml_collections.ConfigDict(
        dict(
            coordinator_address=cd.placeholder(str),
            num_processes=cd.placeholder(int),
            process_id=cd.placeholder(int),
        )
    )
    return c


# --- validation ----------------------------------------------------------------------------


def _flat(c: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in c.items() if hasattr(c, "items") else []:
        key = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict | dict) and key.count(".") < 1:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _close(key: str, known) -> str:
    near = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    if not near and "." in key:  # compare the last component too: optim.lrr -> optim.lr
        tail = key.rsplit(".", 1)[1]
        near = [k for k in known if difflib.get_close_matches(tail, [k.rsplit(".", 1)[-1]])]
        near = near[:3]
    return f"; did you mean {', '.join(near)}?" if near else ""


def _schema_types() -> dict[str, Any]:
    """key -> expected type (None: any) from base_config's defaults and placeholders."""
    base = base_config()
    types_ = {}
    for key, _ in _flat(base).items():
        section, _, name = key.partition(".")
        field = base[section].get_ref(name) if name else base.get_ref(section)
        types_[key] = field.get_type()
    return types_


def _type_ok(value: Any, t: Any) -> bool:
    if value is None or t is None or t is object or t is type(None):
        return True
    if t is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is tuple:
        return isinstance(value, tuple | list)
    return isinstance(value, t)


def validate(config: ml_collections.ConfigDict) -> None:
    """Check keys, types and values of an experiment config.

    Raises:
        ConfigError: listing every problem, each with its key (and close matches for unknown
            keys).
    """
    schema = _schema_types()
    errors = []
    flat = _flat(config)
    for key, value in flat.items():
        if key not in schema:
            errors.append(f"unknown config key {key!r}{_close(key, schema)}")
            continue
        if not _type_ok(value, schema[key]):
            want = getattr(schema[key], "__name__", str(schema[key]))
            errors.append(
                f"config.{key}={value!r} has type {type(value).__name__}, expected {want}"
            )
    if errors:
        raise ConfigError("Invalid config:\n  " + "\n  ".join(errors))

    from lm.train import TASKS  # local: keeps `import lm.experiment` light for configs

    def choice(key, value, choices):
        if value not in choices:
            errors.append(
                f"config.{key}={value!r} is not one of {list(choices)}{_close(str(value), choices)}"
            )

    choice("task", config.task, TASKS)
    choice("model.dtype", config.model.dtype, (*DTYPES, "auto"))
    choice("model.param_dtype", config.model.param_dtype, DTYPES)
    if config.model.attention_impl is not None:
        choice("model.attention_impl", config.model.attention_impl, ATTENTION_IMPLS)
    if config.model.block_impl is not None:
        choice("model.block_impl", config.model.block_impl, BLOCK_IMPLS)
    choice("optim.schedule", config.optim.schedule, SCHEDULES)
    choice("data.too_long", config.data.too_long, ("truncate", "error"))
    if config.debug.profile_steps < 0:
        errors.append(f"config.debug.profile_steps={config.debug.profile_steps} must be >= 0")
    t, o = config.train, config.optim
    if t.batch_size <= 0:
        errors.append(f"config.train.batch_size={t.batch_size} must be > 0")
    if t.num_steps <= 0 and t.num_epochs <= 0:
        errors.append("set config.train.num_steps or config.train.num_epochs to a positive value")
    if o.grad_accum < 1 or t.batch_size % o.grad_accum:
        errors.append(
            f"config.optim.grad_accum={o.grad_accum} must be >= 1 and divide "
            f"config.train.batch_size={t.batch_size}"
        )
    if o.lr <= 0:
        errors.append(f"config.optim.lr={o.lr} must be > 0")
    if not 0 <= o.label_smoothing < 1:
        errors.append(f"config.optim.label_smoothing={o.label_smoothing} must be in [0, 1)")
    if not 0 <= o.warmup_frac < 1:
        errors.append(f"config.optim.warmup_frac={o.warmup_frac} must be in [0, 1)")
    if t.log_every <= 0:
        errors.append(f"config.train.log_every={t.log_every} must be > 0")
    if config.task == "causal_lm":
        choice("data.kind", config.data.kind, ("chars", "sft"))
        if not 0 < config.data.eval_fraction < 1:
            errors.append(
                f"config.data.eval_fraction={config.data.eval_fraction} must be in (0, 1)"
            )
    lo = config.lora
    if lo.rank < 0:
        errors.append(f"config.lora.rank={lo.rank} must be >= 0 (0: full fine-tuning)")
    if lo.rank and lo.alpha <= 0:
        errors.append(f"config.lora.alpha={lo.alpha} must be > 0")
    if not 0 <= lo.dropout < 1:
        errors.append(f"config.lora.dropout={lo.dropout} must be in [0, 1)")
    bad = sorted(set(columns(lo.targets, True)) - set(LORA_TARGETS))
    if lo.rank and (bad or not lo.targets):
        errors.append(
            f"config.lora.targets={tuple(lo.targets)!r}: {bad or 'empty'}; choose from "
            f"{list(LORA_TARGETS)}"
        )
    if config.checkpoint.keep < 1:
        errors.append(f"config.checkpoint.keep={config.checkpoint.keep} must be >= 1")
    if t.early_stop_metric:
        metric = t.early_stop_metric.removeprefix("eval/")
        known = ("loss", "accuracy", "f1", "perplexity")
        if metric not in known:
            errors.append(
                f"config.train.early_stop_metric={t.early_stop_metric!r} is not one of "
                f"{['eval/' + k for k in known]}{_close(t.early_stop_metric, ['eval/' + k for k in known])}"
            )
    if errors:
        raise ConfigError("Invalid config:\n  " + "\n  ".join(errors))


def check_overrides(config: ml_collections.ConfigDict, argv: list[str]) -> None:
    """Check ``--config.<key>=<value>`` command-line overrides against ``config`` before
    ml_collections applies them, so an unknown key gets close matches instead of a traceback.

    Raises:
        ConfigError: naming the flag and the close matches.
    """
    flat = _flat(config)
    errors = []
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key, _, value = arg[len("--config.") :].partition("=")
        if key not in flat:
            # Deeper keys inside a dict-valued entry (e.g. mesh.rules) are left to ml_collections.
            if not any(key.startswith(k + ".") for k in flat):
                errors.append(f"{arg}: unknown config key {key!r}{_close(key, flat)}")
            continue
        ref = config[key.split(".")[0]]
        if "." in key:
            t = ref.get_ref(key.split(".", 1)[1]).get_type()
        else:
            t = config.get_ref(key).get_type()
        if t in (int, float) and value:
            try:
                float(value) if t is float else int(value)
            except ValueError:
                errors.append(f"{arg}: config.{key} expects {t.__name__}, got {value!r}")
        if t is bool and value and value.lower() not in ("true", "false", "1", "0"):
            errors.append(f"{arg}: config.{key} expects True or False, got {value!r}")
    if errors:
        raise ConfigError("Invalid command line:\n  " + "\n  ".join(errors))


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``path/to/config.py[:arg]`` -> ``get_config(arg)`` (the loading config_flags does)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} not found")
    name = "_lm_config_" + os.path.splitext(os.path.basename(path))[0]
    spec_ = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec_)
    sys.modules[name] = module
    spec_.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


# --- the one conversion --------------------------------------------------------------------


def model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ModelConfig fields the experiment sets (everything in ``model`` that is not None)."""
    out = {}
    for name in MODEL_FIELDS:
        v = config.model.get(name)
        if v is not None:
            out[name] = tuple(v) if isinstance(v, list | tuple) else v
    return out


def model_config(config: ml_collections.ConfigDict, base: ModelConfig) -> ModelConfig:
    """The ModelConfig of an experiment: ``base`` (the checkpoint's or preset's config) with the
    experiment's head, numerics and overrides. The only place experiment keys reach a model."""
    from lm.train import get_task

    task = get_task(config.task)
    fields = model_overrides(config)
    fields.setdefault("head", task.head)
    if fields.get("dtype") == "auto":
        fields["dtype"] = auto_dtype()
    lo = config.get("lora")
    if lo is not None and lo.rank:
        fields.update(
            lora_rank=int(lo.rank),
            lora_alpha=float(lo.alpha),
            lora_dropout=float(lo.dropout),
            lora_targets=tuple(columns(lo.targets, True)),
        )
    return base.replace(**fields)


def auto_dtype() -> str:
    """The compute dtype that is fast here: bfloat16 on GPUs/TPUs and on CPUs with AMX (bf16
    matmuls with float32 accumulation, ~5x fp32 there), float32 on other CPUs, where XLA's
    bfloat16 matmuls are slower than float32 ones (measured on an AVX-512 CPU without AMX:
    ~40 against ~60 GFLOP/s)."""
    import jax

    if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm"):
        return "bfloat16"
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return "float32"
    return "bfloat16" if "amx_bf16" in flags else "float32"


def is_preset(name: str) -> bool:
    """A preset name that is not also a pretrained short name: random initialization."""
    from lm.pretrained import SHORT_NAMES

    return name in PRESETS and name not in SHORT_NAMES and not os.path.exists(name)


# --- workdir identity ----------------------------------------------------------------------

# Keys that may change between launches in one workdir (resume with more steps, another mesh,
# other logging); everything else must match the run already there.
MUTABLE = (
    "overwrite",
    "compilation_cache",
    "train.num_steps",
    "train.num_epochs",
    "train.log_every",
    "train.eval_every",
    "train.eval_batch_size",
    "train.progress",
    "train.patience",
    "checkpoint",
    "mesh",
    "distributed",
    "data.cache_dir",
)


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def config_differences(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two resolved configs, ignoring ``MUTABLE`` keys."""
    a, b = _flat_any(old), _flat_any(new)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if any(k == m or k.startswith(m + ".") for m in MUTABLE):
            continue
        if a.get(k) != b.get(k):
            diffs.append(f"{k}: {a.get(k)!r} in the workdir, {b.get(k)!r} now")
    return diffs


def _flat_any(d: Any, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_any(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


__all__ = [
    "ConfigError",
    "base_config",
    "check_overrides",
    "config_differences",
    "load_config_file",
    "model_config",
    "validate",
]


# --- model and data ------------------------------------------------------------------------


@dataclasses.dataclass
class Model:
    """What a run starts from: its ModelConfig and initial parameters (numpy or jax)."""

    cfg: ModelConfig
    params: Any
    tokenizer: Any = None
    labels: list[str] | None = None


def load_model(config: ml_collections.ConfigDict, num_labels: int | None = None) -> Model:
    """The model named by ``config.model.name`` with the experiment's head and overrides.

    A preset name (``lm.PRESETS``) initializes randomly from ``config.train.seed``; anything
    else is a checkpoint (``lm.load``): a classification task puts a fresh classifier of
    ``num_labels`` outputs on it unless the checkpoint already has one of that size.
    """
    from lm.model import init_params
    from lm.pretrained import load
    from lm.train import get_task

    task = get_task(config.task)
    name = config.model.name
    cfg = preset_model_config(config, num_labels)
    if cfg is not None:
        return Model(cfg, init_params(cfg, int(config.train.seed)), None, None)
    m = load(
        name,
        head=task.head,
        num_labels=num_labels,
        dtype=config.model.param_dtype,
        tokenizer=False,
    )
    cfg = model_config(config, m.cfg)
    params = m.params
    if cfg.lora_rank:  # fresh adapters (B = 0) on the pretrained weights
        from lm.lora import add_adapters

        params = add_adapters(cfg, params, int(config.train.seed))
    return Model(cfg, params, None, m.labels)


def preset_model_config(
    config: ml_collections.ConfigDict, num_labels: int | None = None
) -> ModelConfig | None:
    """The ModelConfig ``load_model`` gives a preset (known before its parameters exist), or
    None for a checkpoint (its config comes with its weights)."""
    if not is_preset(config.model.name):
        return None
    from lm.config import preset

    base = preset(config.model.name)
    if num_labels:
        base = base.replace(num_labels=num_labels)
    return model_config(config, base)


def load_tokenizer(config: ml_collections.ConfigDict):
    """The tokenizer of ``config.data.tokenizer`` or else ``config.model.name`` (None for a
    preset without ``data.tokenizer``: its data brings its own, e.g. characters)."""
    name = config.data.get("tokenizer") or config.model.name
    if is_preset(name):
        return None
    from lm.pretrained import resolve
    from lm.tokenizer import load_tokenizer as load_tok

    return load_tok(resolve(name))


def columns(value, has_header: bool) -> tuple:
    """Command-line column specs (``1,2`` -> (1, 2); ``"a,b"`` -> ("a", "b")) as lm.data wants."""
    items = value if isinstance(value, tuple | list) else (value,)
    out = []
    for v in items:
        parts = v.split(",") if isinstance(v, str) else [v]
        for p in parts:
            p = p.strip() if isinstance(p, str) else p
            if isinstance(p, str) and p.isdigit() and not has_header:
                p = int(p)
            out.append(p)
    return tuple(out)


def data_kwargs(config: ml_collections.ConfigDict) -> dict:
    """``lm.data.load_classification`` keyword arguments from ``config.data``."""
    from lm import data as lmdata

    d = config.data
    if d.name == "sst2":
        kw = lmdata.sst2_files()
    elif d.name:
        kw = dict(
            tfds_name=d.name,
            train_split=d.train_split,
            eval_split=d.eval_split or None,
            text_columns=columns(d.text_columns, True),
            label_column=d.label_column if d.label_column is not None else "label",
        )
    else:
        if not d.train_files:
            raise ConfigError(
                "config.data: set data.name (e.g. 'sst2', 'glue/sst2') or data.train_files"
            )
        label = d.label_column
        if label is None:
            if not d.has_header:
                raise ConfigError(
                    "config.data.label_column: files without a header need the label "
                    "column's 0-based index, e.g. --config.data.label_column=0"
                )
            label = "label"
        if isinstance(label, str) and label.isdigit() and not d.has_header:
            label = int(label)
        kw = dict(
            train_files=d.train_files,
            eval_files=d.eval_files or None,
            has_header=d.has_header,
            text_columns=columns(d.text_columns, d.has_header),
            label_column=label,
            fmt=d.format or None,
        )
        if d.labels is not None:
            kw["labels"] = list(columns(d.labels, True))
    kw["cache_dir"] = d.cache_dir
    return kw


def default_buckets(max_len: int) -> tuple[int, ...]:
    """Padded lengths for batches: 8, 12, 16, 20, 24, then steps of ~1.4x (32, 48, 64, 96,
    128, ...), and max_len.

    Fine at the short end, where most sentences of classification sets are: on SST-2 at
    max_len 64, length-grouped batches of 32 (``data.group_batches=20``) pad to 17.6 tokens on
    average against 21.8 with (16, 24, 32, 48, 64), a ~12% shorter epoch for 3 more compiled
    shapes (~10 s each for MiniLM on 2 cores).
    """
    out, n = [], 8
    while n < max_len:
        out.append(n)
        if n < 24:
            n += 4
        else:
            n = n * 3 // 2 if (n & (n - 1)) == 0 else n * 4 // 3
    return (*out, max_len)


def buckets(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """``config.data.buckets`` (sorted, capped at max_len) or ``default_buckets(max_len)``."""
    max_len = int(config.data.max_len)
    if config.data.buckets:
        b = sorted({int(x) for x in columns(config.data.buckets, False) if int(x) < max_len})
        return (*b, max_len)
    return default_buckets(max_len)


def _head(tok, n: int):
    """The first ``n`` examples of an ``lm.data.Tokenized``."""
    if not n or n >= len(tok):
        return tok
    end = int(tok.offsets[n])
    return dataclasses.replace(
        tok,
        ids=tok.ids[:end],
        type_ids=tok.type_ids[:end],
        offsets=tok.offsets[: n + 1],
        labels=tok.labels[:n],
    )


def load_classification_data(config: ml_collections.ConfigDict, tokenizer, max_positions: int):
    """Validated, tokenized (and cached) classification data for ``config.data``.

    Raises:
        lm.data.DataError: a missing, empty or malformed file, naming file and line.
        ConfigError: data settings the model cannot take (max_len over its position limit).
    """
    from lm import data as lmdata

    if config.data.max_len > max_positions:
        raise ConfigError(
            f"config.data.max_len={config.data.max_len} exceeds the model's position limit "
            f"{max_positions}"
        )
    ds = lmdata.load_classification(tokenizer, int(config.data.max_len), **data_kwargs(config))
    train = _head(ds.train, config.data.max_train_examples)
    evals = _head(ds.eval, config.data.max_eval_examples) if ds.eval is not None else None
    if len(train) == 0:
        raise lmdata.DataError("the training data is empty")
    for split, part in (("train", train), ("eval", evals)):
        n = int(getattr(part, "num_truncated", 0) or 0) if part is not None else 0
        if not n:
            continue
        msg = (
            f"{n} of {len(part)} {split} examples are longer than data.max_len="
            f"{config.data.max_len} tokens"
        )
        if config.data.too_long == "error":
            raise lmdata.DataError(
                msg + " (data.too_long='error'; raise data.max_len, up to the model's "
                f"{max_positions}, or set data.too_long='truncate')"
            )
        print(f"warning: {msg}; they are truncated (data.too_long='truncate')", file=sys.stderr)
    return dataclasses.replace(ds, train=train, eval=evals)


def check_argv(argv: list[str]) -> None:
    """For scripts: load ``--config=FILE[:arg]`` and check the ``--config.*`` overrides."""
    spec = None
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    if spec is None:
        return
    try:
        config = load_config_file(spec)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken config file: show what and where
        raise ConfigError(f"config file {spec!r} failed to load: {type(e).__name__}: {e}") from e
    check_overrides(config, argv)


def summary_line(summary: dict) -> str:
    """The final summary of a run as one JSON line."""
    return json.dumps(summary, sort_keys=True, default=str)
