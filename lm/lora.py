"""LoRA adapters (Hu et al. 2021, arXiv:2106.09685) on top of a pretrained parameter tree.

With ``cfg.lora_rank = r`` every Dense named in ``cfg.lora_targets`` gets ``lora_a`` [in, r]
and ``lora_b`` [r, out] (zero-initialized), and computes ``x W + (x A B) * alpha / r``. Only the
adapters are trained: ``trainable_mask`` marks them, ``split``/``join`` keep optimizer state and
checkpoints to the adapters alone, and ``merge`` folds them into W for export.
"""

from __future__ import annotations

import jax
import numpy as np

from lm.config import ModelConfig

ADAPTER_KEYS = ("lora_a", "lora_b")


def with_lora(
    cfg: ModelConfig,
    rank: int,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: tuple[str, ...] = ("q", "v"),
) -> ModelConfig:
    """``cfg`` with LoRA adapters of ``rank`` on the Dense modules named in ``targets``."""
    valid = {"q", "k", "v", "o", "gate", "up", "down"}
    bad = sorted(set(targets) - valid)
    if bad:
        raise ValueError(
            f"LoRA targets {bad} are not Dense modules of a block; choose from {sorted(valid)}"
        )
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return cfg.replace(
        lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout, lora_targets=tuple(targets)
    )


def add_adapters(cfg: ModelConfig, base_params: dict, rng: jax.Array | int = 0) -> dict:
    """Base parameters plus freshly initialized adapters (A random, B zero) for ``cfg``.

    The model with these parameters computes exactly what the base model computes. Only the
    adapters are drawn (A ~ N(0, 1/in) as the layer's initializer, B = 0), from the shapes of
    ``jax.eval_shape``: no full init is compiled (minutes for a 135M model on a CPU).
    """
    import jax.numpy as jnp

    from lm.model import param_shapes

    key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    shapes = param_shapes(cfg)
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    index = {jax.tree_util.keystr(p): i for i, p in enumerate(paths)}

    def pick(path, s):
        name = path[-1].key
        if name == "lora_a":
            k = jax.random.fold_in(key, index[jax.tree_util.keystr(path)])
            return np.asarray(
                jax.random.normal(k, s.shape, jnp.float32) / np.sqrt(s.shape[0]), s.dtype
            )
        if name == "lora_b":
            return np.zeros(s.shape, s.dtype)
        return _get(base_params, path)

    return jax.tree_util.tree_map_with_path(pick, shapes)


def trainable_mask(params: dict) -> dict:
    """True for adapter leaves, False elsewhere (for optax.masked / multi_transform)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key in ADAPTER_KEYS, params)


def split(params: dict) -> tuple[dict, dict]:
    """(adapters, frozen base) as two trees with the same structure; absent leaves are None."""
    mask = trainable_mask(params)
    adapters = jax.tree.map(lambda m, x: x if m else None, mask, params)
    base = jax.tree.map(lambda m, x: None if m else x, mask, params)
    return adapters, base


def join(adapters: dict, base: dict) -> dict:
    """Inverse of ``split``."""
    return jax.tree.map(
        lambda a, b: a if a is not None else b, adapters, base, is_leaf=lambda x: x is None
    )


def merge(cfg: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """Fold adapters into the base kernels: W' = W + A B * alpha / r. Returns a LoRA-free model."""
    if not cfg.lora_rank:
        return cfg, params
    scale = cfg.lora_alpha / cfg.lora_rank

    def walk(tree):
        if not isinstance(tree, dict):
            return tree
        if "lora_a" in tree:
            out = {k: v for k, v in tree.items() if k not in ADAPTER_KEYS}
            a = np.asarray(tree["lora_a"], np.float32)
            b = np.asarray(tree["lora_b"], np.float32)
            w = np.asarray(tree["kernel"], np.float32)
            out["kernel"] = (w + a @ b * scale).astype(np.asarray(tree["kernel"]).dtype)
            return out
        return {k: walk(v) for k, v in tree.items()}

    return cfg.replace(lora_rank=0), walk(params)


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def prune(tree):
    """``tree`` without None leaves and the dicts they leave empty: ``split``'s halves as plain
    trees that jit, optax and Orbax take (``combine`` puts two halves back together)."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        v = prune(v)
        if v is None or (isinstance(v, dict) and not v):
            continue
        out[k] = v
    return out


def adapters_and_base(params: dict) -> tuple[dict, dict]:
    """``split`` with both halves pruned: (adapter leaves only, everything else)."""
    a, b = split(params)
    return prune(a), prune(b)


def combine(adapters: dict, base: dict) -> dict:
    """The union of two disjoint pruned trees (inverse of ``adapters_and_base``); works on
    traced values inside jit."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = combine(v, base[k]) if isinstance(v, dict) and k in base else v
    return out
