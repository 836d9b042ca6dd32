"""Orbax checkpoints of a training run: state, data iterator, run metadata, best student.

Layout under ``<workdir>``::

    checkpoints/<step>/state   the train state pytree (student params, optimizer
                               state, step, RNG), sharded arrays written per process
    checkpoints/<step>/data    the grain iterator position, one JSON per process
    checkpoints/<step>/meta    JSON run metadata (consecutive non-finite steps, ...)
    checkpoints_best/<step>/   student params of the best validation accuracy
                               (``meta`` holds {"step", "accuracy"})
    checkpoints_corrupt/       latest steps that failed to restore, moved aside

Orbax writes every step into a temporary directory and renames it when complete,
so a process killed mid-save leaves only a temporary directory, which is
removed when the manager opens (``cleanup_tmp_directories``). A step that is
listed but cannot be restored (files missing or truncated) is skipped with a
warning and moved to ``checkpoints_corrupt/`` so the run resumes from the
previous one and can later save that step number again.

The teacher is frozen and loaded from its Hugging Face directory: it is never
part of the state saved here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

STATE_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"
CORRUPT_DIR = "checkpoints_corrupt"


@dataclasses.dataclass
class Restored:
    """What ``CheckpointManager.restore_latest`` returns."""

    step: int
    state: Any
    meta: dict


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class CheckpointMismatchError(RuntimeError):
    """The workdir's checkpoints hold arrays of other shapes than this run's state (another model)."""


class CheckpointManager:
    """Saves and restores the train state, data iterator state and the best student.

    Args:
      workdir: run directory (local path or gs://...).
      keep: number of most recent state checkpoints to keep.
      save_every: save when ``step % save_every == 0`` (``force=True`` always saves).
      async_save: write in a background thread after copying arrays to host
        (the caller may donate the state right after ``save`` returns).
    """

    def __init__(self, workdir: str, *, keep: int = 3, save_every: int = 1, async_save: bool = True):
        self.workdir = workdir
        self.save_every = save_every
        self.is_primary = jax.process_index() == 0
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save, save_interval_steps=1)
        self._state = ocp.CheckpointManager(os.path.join(workdir, STATE_DIR), options=options)
        # The best manager only ever receives strictly better checkpoints, so
        # keeping one keeps the best (and the earliest among equals).
        best_options = ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
        self._best = ocp.CheckpointManager(os.path.join(workdir, BEST_DIR), options=best_options)
        self._best_info = self._read_best_info()

    # ----------------------------------------------------------------- state
    def all_steps(self) -> list[int]:
        return sorted(self._state.all_steps())

    def save(self, step: int, state: Any, *, data_iterator: Any = None, meta: dict | None = None,
             force: bool = False) -> bool:
        """Saves ``state`` (a pytree of arrays) at ``step`` if due; returns whether it saved.

        ``data_iterator`` is a grain ``DatasetIterator`` (or ``DataLoaderIterator``);
        its position is saved per process. ``meta`` is a small JSON-able dict.
        """
        if not force and step % self.save_every != 0:
            return False
        if step in self._state.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(dict(meta or {}))}
        if data_iterator is not None:
            import grain  # grain's Orbax handler is registered on import

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return bool(self._state.save(step, args=ocp.args.Composite(**items), force=True))

    def restore_latest(self, abstract_state: Any, *, data_iterator: Any = None) -> Restored | None:
        """Restores the newest complete checkpoint, or returns None when there is none.

        Args:
          abstract_state: the target pytree (``abstract_like(state)``): shapes,
            dtypes and shardings of the state to restore into.
          data_iterator: the grain iterator to reposition (``set_state``).
        Steps that fail to restore are skipped with a warning and moved to
        ``<workdir>/checkpoints_corrupt``; the next older step is tried.
        """
        for step in sorted(self._state.all_steps(), reverse=True):
            items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
            if data_iterator is not None:
                import grain

                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self._state.restore(step, args=ocp.args.Composite(**items))
                state = restored["state"]
                # Surface truncated array data now rather than at first use.
                jax.block_until_ready(state)
            except Exception as err:  # noqa: BLE001 - any failure means this step is unusable
                if "not compatible with the stored shape" in str(err):
                    # A well-formed checkpoint of another model: not corrupt, so never moved aside.
                    raise CheckpointMismatchError(
                        f"{os.path.join(self.workdir, STATE_DIR, str(step))} was written by a run with a different "
                        f"model or optimizer ({str(err).splitlines()[0][:200]}). Point --config.workdir at a new "
                        "directory, or rerun with the config that wrote it.") from err
                log.warning("checkpoint step %d in %s is incomplete or corrupt (%s: %s); skipping it and "
                            "trying the previous step", step, os.path.join(self.workdir, STATE_DIR),
                            type(err).__name__, str(err).splitlines()[0][:300] if str(err) else "")
                self._quarantine(step)
                continue
            return Restored(step=step, state=state, meta=dict(restored["meta"] or {}))
        return None

    def _quarantine(self, step: int) -> None:
        src = os.path.join(self.workdir, STATE_DIR, str(step))
        if self.is_primary and os.path.exists(src):
            dst = os.path.join(self.workdir, CORRUPT_DIR, f"{step}-{int(time.time())}")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.move(src, dst)
            log.warning("moved the unusable checkpoint %s to %s", src, dst)
        ocp.multihost.sync_global_processes(f"vaopd_quarantine_{step}")
        self._state.reload()

    # ------------------------------------------------------------------ best
    def _read_best_info(self) -> dict | None:
        step = self._best.latest_step()
        if step is None:
            return None
        try:
            meta = self._best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            return {"step": int(meta["step"]), "accuracy": float(meta["accuracy"])}
        except Exception as err:  # noqa: BLE001
            log.warning("best checkpoint step %d in %s is unreadable (%s); it will be replaced by the next "
                        "validation", step, os.path.join(self.workdir, BEST_DIR), err)
            return None

    @property
    def best_info(self) -> dict | None:
        """{"step", "accuracy"} of the best validation so far, or None."""
        return None if self._best_info is None else dict(self._best_info)

    def maybe_save_best(self, step: int, params: Any, accuracy: float) -> bool:
        """Saves ``params`` as the best student when ``accuracy`` is strictly higher.

        Strictly: on ties the earlier step stays best (spec/METHOD.md validation rule).
        """
        if self._best_info is not None and not accuracy > self._best_info["accuracy"]:
            return False
        if self._best_info is not None and step <= self._best_info["step"]:
            return False  # replaying steps after a resume: the stored best already covers them
        info = {"step": int(step), "accuracy": float(accuracy)}
        self._best.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(info)), force=True)
        self._best_info = info
        return True

    def restore_best(self, abstract_params: Any) -> Any | None:
        """The best student's params (into ``abstract_params``' shardings), or None."""
        if self._best_info is None:
            return None
        self._best.wait_until_finished()
        restored = self._best.restore(self._best_info["step"], args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))
        return restored["params"]

    # ------------------------------------------------------------- lifecycle
    def wait(self) -> None:
        """Blocks until background saves are written."""
        self._state.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._state.close()
        self._best.close()
