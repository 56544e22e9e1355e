"""Checkpoints: an Orbax ``CheckpointManager`` holding the train state and a small JSON record.

    ckpt = Checkpointer(workdir + "/checkpoints", keep=3, best_metric="eval/accuracy")
    ckpt.save(step, state, meta, metrics={"eval/accuracy": 0.91})   # async
    step = ckpt.latest_step()                # newest *complete* checkpoint, or None
    state, meta = ckpt.restore(step, abstract_state)   # shardings come from the abstract state

Each checkpoint ``<dir>/<step>/`` holds two items: ``state`` (the TrainState pytree: step,
params, optimizer state) and ``meta`` (JSON: the loop's own bookkeeping, e.g. early-stopping
counters). Orbax writes into a temporary directory and renames it when the write is complete,
so a kill during a save leaves the previous checkpoints untouched and the partial one is never
listed. Retention: the last ``keep`` checkpoints, plus the best one by ``best_metric`` among
checkpoints saved with metrics.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class _QuietMetrics(logging.Filter):
    # Saves between evaluations carry no metrics on purpose; Orbax warns about each one.
    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietMetrics())


class Checkpointer:
    """Periodic async saves, keep-last-K plus best, and restore onto any sharding."""

    def __init__(
        self,
        directory: str,
        keep: int = 3,
        best_metric: str | None = None,
        higher_is_better: bool = True,
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(directory)
        self.best_metric = best_metric
        self.higher_is_better = higher_is_better
        policies = [ocp.checkpoint_managers.LatestN(n=max(1, int(keep)))]
        if best_metric:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=self._metric_value,
                    reverse=False,  # ascending by _metric_value: the last one is the best
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            # best_fn also makes Orbax write each checkpoint's metrics, so the best step is
            # known after a relaunch.
            best_fn=self._metric_value if best_metric else None,
            best_mode="max",
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"), options=options
        )

    def _metric_value(self, metrics: dict) -> float:
        v = float(metrics.get(self.best_metric, float("nan")))
        if v != v:  # NaN ranks worst
            return float("-inf")
        return v if self.higher_is_better else -v

    def save(
        self, step: int, state: Any, meta: dict, metrics: dict | None = None, force: bool = True
    ) -> bool:
        """Start an async save of ``state`` and ``meta`` at ``step`` (returns at once)."""
        if step in self.manager.all_steps():
            return False
        metrics = {k: float(v) for k, v in (metrics or {}).items()} or None
        return self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
            ),
            metrics=metrics,
            force=force,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the best ``best_metric`` (the latest among ties); the latest
        step when none has metrics."""
        best, best_v = None, None
        if self.best_metric:
            for s in sorted(self.manager.all_steps()):
                m = self.manager.metrics(s)
                if m and self.best_metric in m:
                    v = self._metric_value(m)
                    if best_v is None or v >= best_v:  # ties: the latest, as Orbax keeps
                        best, best_v = s, v
        return best if best is not None else self.latest_step()

    def restore(self, step: int, abstract_state: Any | None = None) -> tuple[Any, dict]:
        """Restore ``(state, meta)`` at ``step``.

        Args:
            abstract_state: a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (e.g.
                from ``jax.eval_shape`` plus the target shardings): arrays are restored onto
                those shardings, so a checkpoint saved on one mesh restores on another.
                None restores as saved (numpy-compatible arrays on the default device).
        """
        state_arg = (
            ocp.args.StandardRestore(abstract_state)
            if abstract_state is not None
            else ocp.args.StandardRestore()
        )
        out = self.manager.restore(
            int(step), args=ocp.args.Composite(state=state_arg, meta=ocp.args.JsonRestore())
        )
        return out["state"], dict(out["meta"] or {})

    def restore_params(self, step: int | None = None, abstract_params: Any | None = None):
        """Only the parameters of checkpoint ``step`` (default: the best), without reading the
        optimizer state; for predict, evaluate and export.

        Args:
            abstract_params: ShapeDtypeStructs (with shardings) of the parameters; default: as
                saved, on the default device (any saving topology).

        Returns:
            ``(params, step)``.
        """
        step = self.best_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint")
        path = os.path.join(self.directory, str(int(step)), "state")
        if abstract_params is None:
            abstract_params = self.host_target(step)["params"]
        target = {"params": abstract_params}
        with ocp.PyTreeCheckpointer() as reader:
            out = reader.restore(
                path,
                args=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                ),
            )
        return out["params"], int(step)

    def host_target(self, step: int) -> Any:
        """ShapeDtypeStructs of the saved state on the default device (any saving topology)."""
        path = os.path.join(self.directory, str(int(step)), "state")
        with ocp.StandardCheckpointer() as reader:
            tree = reader.metadata(path).item_metadata
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)

    def wait(self) -> None:
        """Block until pending async saves are written (call before exit)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` (arrays or structs) carrying ``shardings``."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
