"""Device mesh, logical-axis rules, and shardings derived from ``jax.eval_shape`` of the init.

Current JAX replaces ``pmap`` with ``jax.jit`` over a ``NamedSharding`` mesh. The mesh has three
axes, sized from ``config.mesh``:

    data    pure data parallelism: batch split, parameters replicated (what pmap users had)
    fsdp    batch split AND parameters/optimizer state split along their ``embed`` axis
            (ZeRO-3 / FSDP, Rajbhandari et al. 2020)
    tensor  parameters split along heads / mlp / vocab (Megatron, Shoeybi et al. 2019)

Parameters carry logical axis names (``vocab, embed, heads, kv, mlp``, see lm.layers); the rules
below map them to mesh axes, so the same model code runs on 1 CPU, 8 fake devices or a pod.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lm.config import ModelConfig

AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("layers", None),  # the stacked axis of scan_layers: every device holds all layers
    ("embed", "fsdp"),
    ("embed2", None),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("table", None),  # position / token-type tables: small, replicated along their rows
)


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolve ``{data, fsdp, tensor}`` sizes (one of them may be -1: all remaining devices).

    Raises:
        ValueError: when the sizes do not multiply to the device count.
    """
    shape = [int(sizes.get(a, 1 if a != "data" else -1)) for a in AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(AXES, shape))}")
    known = int(np.prod([s for s in shape if s != -1]))
    if free:
        if num_devices % known:
            raise ValueError(
                f"mesh: {dict(zip(AXES, shape))} does not divide {num_devices} devices"
            )
        shape[free[0]] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(
            f"mesh: {dict(zip(AXES, shape))} needs {int(np.prod(shape))} devices, "
            f"{num_devices} are available"
        )
    return tuple(shape)


def make_mesh(sizes: dict[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A ``Mesh`` with axes (data, fsdp, tensor); default: data parallel over all devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(dict(sizes or {}), len(devices))
    from jax.experimental import mesh_utils

    try:
        # Topology-aware placement on GPUs/TPUs (keeps tensor-parallel groups on fast links).
        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, AssertionError, NotImplementedError):
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, AXES)


def rules_from_config(rules) -> tuple:
    """Rules from config (list of [logical, mesh-axis-or-list-or-None]) or the defaults."""
    if not rules:
        return DEFAULT_RULES
    out = []
    for logical, axes in rules:
        out.append((logical, tuple(axes) if isinstance(axes, list | tuple) else axes))
    return tuple(out)


def logical_to_sharding(specs, mesh: Mesh, rules=DEFAULT_RULES):
    """Map a pytree of logical PartitionSpecs to NamedShardings on ``mesh``."""
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedSharding per parameter, derived from the logical axes of ``jax.eval_shape(init)``."""
    from lm.model import logical_axes, param_shapes

    shardings = logical_to_sharding(logical_axes(cfg), mesh, rules)
    check_divisible(param_shapes(cfg), shardings)
    return shardings


def check_divisible(shapes, shardings) -> None:
    """Raise a ValueError naming every parameter whose dimensions do not split evenly.

    JAX refuses such arrays too, but names neither the parameter nor the rule to change.
    """
    bad = []
    flat_sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, s), sh in zip(jax.tree_util.tree_flatten_with_path(shapes)[0], flat_sh, strict=True):
        for dim, axes in zip(s.shape, sh.spec):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            n = int(np.prod([sh.mesh.shape[a] for a in axes])) if axes else 1
            if dim % n:
                name = "/".join(_path_key(path))
                bad.append(f"{name} {tuple(s.shape)}: dimension {dim} over mesh axes {axes} ({n})")
    if bad:
        raise ValueError(
            "sharding: these parameters do not split evenly over the mesh:\n  "
            + "\n  ".join(bad)
            + "\nChoose mesh sizes that divide them, or map their logical axis to None in "
            "config.mesh.rules."
        )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp; other dimensions replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble this process's rows into global arrays split over (data, fsdp).

    On one process the local batch is the global batch; on several, each process passes its
    own rows (``jax.make_array_from_process_local_data``), in process order.
    """
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in local.items()
    }


def process_rows(mesh: Mesh, global_rows: int) -> slice:
    """The rows of a global batch of ``global_rows`` that this process feeds to ``global_batch``.

    Every process builds the same (seed, step) batch; each passes only the rows its devices
    hold (all of them on one process, or when the batch is not split across processes).

    Raises:
        ValueError: when this process's rows are not one contiguous block (a mesh whose
            data/fsdp order interleaves processes).
    """
    index = batch_sharding(mesh, 1).addressable_devices_indices_map((global_rows,))
    blocks = sorted(
        {(i[0].start or 0, global_rows if i[0].stop is None else i[0].stop) for i in index.values()}
    )
    lo, hi = blocks[0][0], blocks[-1][1]
    if sum(b - a for a, b in blocks) != hi - lo:
        raise ValueError(
            f"process {jax.process_index()} holds batch rows {blocks}, not one contiguous block; "
            "order the mesh devices by process"
        )
    return slice(lo, hi)


def process_local(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, np.ndarray]:
    """This process's part of a global host batch (the batch itself on one process)."""
    if jax.process_count() == 1:
        return batch
    rows = process_rows(mesh, len(next(iter(batch.values()))))
    return {k: np.asarray(v)[rows] for k, v in batch.items()}


def batch_divisor(mesh: Mesh) -> int:
    """The global batch must be a multiple of this (devices along data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def tree_shardings_like(tree, param_sharding, params_struct, mesh: Mesh):
    """Shardings for a pytree (e.g. an optax state) whose sub-trees mirror the params.

    Leaves whose shape matches the parameter at the same path suffix get that parameter's
    sharding; everything else (step counters, scalars) is replicated.
    """
    flat_params = {
        _path_key(p): (s.shape, sh)
        for (p, s), sh in zip(
            jax.tree_util.tree_flatten_with_path(params_struct)[0],
            jax.tree.leaves(param_sharding),
            strict=True,
        )
    }

    def pick(path, leaf):
        key = _path_key(path)
        for pkey, (shape, sh) in flat_params.items():
            if key[-len(pkey) :] == pkey and tuple(getattr(leaf, "shape", ())) == tuple(shape):
                return sh
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)


def _path_key(path) -> tuple:
    out = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        out.append(str(name))
    return tuple(out)
