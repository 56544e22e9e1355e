"""Multi-process start-up: ``jax.distributed.initialize`` from ``config.distributed``.

Where the settings come from, first match wins:
  1. ``config.distributed.{coordinator_address, num_processes, process_id}`` when given;
  2. environment variables ``LM_COORDINATOR`` (host:port), ``LM_NUM_PROCESSES``, ``LM_PROCESS_ID``
     (what ``scripts/launch_local.py`` sets);
  3. cluster auto-detection by JAX itself: SLURM (``SLURM_*`` variables under ``srun``), TPU VMs
     (pod slices), Open MPI, Kubernetes — ``jax.distributed.initialize()`` with no arguments;
  4. nothing: a single process.
"""

from __future__ import annotations

import os
from typing import Any

_initialized = False


def settings(dist: Any | None) -> dict[str, Any] | None:
    """The resolved ``initialize`` arguments, ``{}`` for auto-detection, or None for one process."""
    dist = dict(dist or {})
    addr = dist.get("coordinator_address") or os.environ.get("LM_COORDINATOR")
    nproc = dist.get("num_processes") or os.environ.get("LM_NUM_PROCESSES")
    pid = dist.get("process_id")
    if pid is None or pid == -1:
        pid = os.environ.get("LM_PROCESS_ID")
    if addr:
        if nproc is None or pid is None:
            raise ValueError(
                "distributed: coordinator_address is set but num_processes/process_id are not "
                "(set config.distributed.* or LM_NUM_PROCESSES/LM_PROCESS_ID)"
            )
        out = {"coordinator_address": addr, "num_processes": int(nproc), "process_id": int(pid)}
        if dist.get("local_device_ids") is not None:
            out["local_device_ids"] = list(dist["local_device_ids"])
        return out
    auto = dist.get("auto", True)
    on_cluster = (
        ("SLURM_NTASKS" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1)
        or "TPU_WORKER_HOSTNAMES" in os.environ
        or "OMPI_COMM_WORLD_SIZE" in os.environ
    )
    if auto and on_cluster:
        return {}
    return None


def initialize(dist: Any | None = None) -> bool:
    """Start JAX's multi-process runtime if the settings call for it (idempotent).

    Returns True when running multi-process. Must run before any other JAX call that touches
    devices. On CPU, cross-process collectives use gloo.
    """
    global _initialized
    args = settings(dist)
    if args is None or _initialized:
        return _initialized
    import jax

    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**args)
    _initialized = True
    return True
