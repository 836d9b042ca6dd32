"""Orbax checkpoints of a training run: state, data iterator, run metadata, best student.

Layout under ``<workdir>``::

    checkpoints/<step>/state   the train state pytree (student params, optimizer
                               state, step, RNG), sharded arrays written per process
    checkpoints/<step>/data    the grain iterator position, one JSON per process
                               (process_<i>-of-<n>.json)
    checkpoints/<step>/meta    JSON run metadata (consecutive non-finite steps, ...), the
                               topology that wrote it ({"processes", "devices"}) and the run's
                               configuration that a resume must share ({"run": run_signature(...)})
    checkpoints_best/<step>/   student params of the best validation accuracy
                               (``meta`` holds {"step", "accuracy"})
    checkpoints_corrupt/       latest steps that failed to restore, moved aside

Orbax writes every step into a temporary directory and renames it when complete,
so a process killed mid-save leaves only a temporary directory, which is
removed when the manager opens (``cleanup_tmp_directories``). A step that is
listed but cannot be restored (files missing or truncated) is skipped with a
warning and moved to ``checkpoints_corrupt/`` so the run resumes from the
previous one and can later save that step number again.

Elastic restore: arrays are restored into the target's shardings (``abstract_like``
of a state built on the current mesh), so a checkpoint written on one mesh and device
count restores onto any other (8 devices fsdp=8 -> 4 -> 1 and back). The data position
is restored exactly when the process count is unchanged; otherwise every process reads
all processes' positions and the iterator re-derives its own
(``set_state_from_processes``, see data/pipeline.py).

The trainer decides when to save (periodic steps, the agreed preemption step); Orbax's
own preemption check is turned off here because each call to JAX's preemption sync point
counts as a check point (vaopd_jax/runtime/preemption.py).

Resuming across a change: a resumed run compares its ``run_signature`` (the method, the
rollout and batch shapes, the VA and optimizer hyper-parameters, the student's and the teacher's
model configs; not the mesh, the step count or paths) with the checkpoint's, and refuses to
resume, naming every difference, unless each differing field is listed in
``config.train.resume_across_changes`` (e.g. ``optim.lr`` for a new learning rate).

A save that cannot be written (a full disk, lost permissions) raises ``CheckpointWriteError``
naming the step and the latest complete checkpoint, which stays the one a rerun resumes from:
the failed step never becomes a listed step (Orbax renames a step into place only once all of
it is written).

The teacher is frozen and loaded from its Hugging Face directory: it is never
part of the state saved here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from typing import Any

import grain  # also registers grain's Orbax handler (grain.checkpoint.CheckpointSave)
import jax
import orbax.checkpoint as ocp
from etils import epath

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
    topology: dict | None = None  # {"processes", "devices"} of the run that wrote it (None: not recorded)
    data_note: str | None = None  # how the data position was re-derived for another process count

    def describe(self, workdir: str, mesh_shape: dict) -> str:
        """The resume line the trainer prints: which checkpoint, and how it was moved onto this run's devices."""
        line = f"resumed from {os.path.join(workdir, STATE_DIR, str(self.step))}"
        if self.topology not in (None, topology()):
            line += (f" (written by {self.topology['processes']} process(es) with {self.topology['devices']} devices, "
                     f"restored onto this mesh {mesh_shape})")
        return line + (f"\n{self.data_note}" if self.data_note else "")


def topology() -> dict:
    """The processes and devices of this run (saved with each checkpoint)."""
    return {"processes": jax.process_count(), "devices": jax.device_count()}


class _OrbaxManager(ocp.CheckpointManager):
    """Orbax's manager without its own preemption check.

    Orbax calls JAX's preemption sync point from ``save`` and from its finishing thread; JAX
    counts every call as a check point, so those calls would move the count the trainer's
    processes agree on. The trainer saves at the agreed point itself (``force=True``).
    """

    def reached_preemption(self, step: int) -> bool:
        del step
        return False


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class _SavedPosition(grain.DatasetIterator):
    """A data position taken earlier: what grain's Orbax handler writes is the iterator's ``get_state()``."""

    def __init__(self, state: dict):
        super().__init__()
        self._position = state

    def __next__(self):
        raise StopIteration

    def get_state(self) -> dict:
        return self._position

    def set_state(self, state: dict) -> None:
        self._position = state


class CheckpointMismatchError(RuntimeError):
    """The workdir's checkpoints hold arrays of other shapes than this run's state (another model)."""


class ResumeMismatchError(CheckpointMismatchError):
    """The latest checkpoint was written by a run with another configuration (each difference named)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the latest complete one is named."""


# Training-config fields a resumed run must share with the run that wrote its checkpoint (unless listed in
# config.train.resume_across_changes): the method, the shapes of a step's batch and rollouts, the image bounds
# (patch counts), and the hyper-parameters of the objective, the sampler and the optimizer. Not the mesh or the
# device count (elastic restore), not train.num_steps (extending a run) and no paths (workdirs move).
RESUME_FIELDS = (
    "method", "seed", "data.source", "data.prompts_per_step", "data.min_pixels", "data.max_pixels",
    "data.image_path", "rollout.num_rollouts", "rollout.max_new_tokens", "rollout.temperature", "rollout.top_p",
    "rollout.top_k", "va.p_v", "va.lam", "va.tau", "va.eps", "va.pixelation_ratio", "optim.lr", "optim.b1",
    "optim.b2", "optim.weight_decay", "optim.clip_norm", "optim.warmup_fraction",
)
# Model-config fields chosen by the run (attention kernels, remat, MoE tiling), not part of a model's identity.
_RUNTIME_MODEL_FIELDS = ("remat", "attention_impl", "attention_chunk_size", "moe_chunk_size", "moe_impl",
                         "moe_tile_size")


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def _model_signature(prefix: str, model_config) -> dict:
    out = {}
    for field in dataclasses.fields(model_config):
        value = getattr(model_config, field.name)
        if field.name in _RUNTIME_MODEL_FIELDS:
            continue
        if dataclasses.is_dataclass(value):
            out.update({f"{prefix}.{field.name}.{k}": _jsonable(v) for k, v in dataclasses.asdict(value).items()})
        else:
            out[f"{prefix}.{field.name}"] = _jsonable(value)
    return out


def run_signature(config, student_config, teacher_config=None) -> dict:
    """{field: value} of what a resume must keep: RESUME_FIELDS of the training config (those it has) and every
    field of the student's (and the teacher's) model config; JSON-able, stored in each checkpoint's meta."""
    out = {}
    for name in RESUME_FIELDS:
        node = config
        for part in name.split("."):  # the typed config (config.Config) or a ConfigDict
            node = getattr(node, part, None)
            if node is None:
                break
        if node is not None:
            out[name] = _jsonable(node)
    out.update(_model_signature("student", student_config))
    if teacher_config is not None:
        out.update(_model_signature("teacher", teacher_config))
    return out


def allowed_changes(names) -> tuple[str, ...]:
    """config.train.resume_across_changes as field names: entries may hold several names separated by commas
    (``--config.train.resume_across_changes=optim.lr,optim.b2``); '' entries are ignored."""
    if isinstance(names, str):
        names = (names,)
    return tuple(n.strip() for entry in (names or ()) for n in str(entry).split(",") if n.strip())


def resume_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(field, value in the checkpoint, value now) for every field of either signature whose values differ."""
    missing = object()
    out = []
    for name in sorted(set(saved) | set(current)):
        old, new = saved.get(name, missing), current.get(name, missing)
        if _jsonable(old) != _jsonable(new):
            out.append((name, None if old is missing else old, None if new is missing else new))
    return out


class CheckpointManager:
    """Saves and restores the train state, data iterator state and the best student.

    Args:
      workdir: run directory (local path or gs://...).
      keep: number of most recent state checkpoints to keep.
      save_every: save when ``step % save_every == 0`` (``force=True`` always saves).
      async_save: write in a background thread after copying arrays to host
        (the caller may donate the state right after ``save`` returns).
    """

    def __init__(self, workdir: str, *, keep: int = 3, save_every: int = 1, async_save: bool = True,
                 run: dict | None = None, resume_across_changes=()):
        self.run = run
        self.resume_across_changes = allowed_changes(resume_across_changes)
        if self.resume_across_changes and run is not None:
            unknown = [n for n in self.resume_across_changes if n not in run]
            if unknown:
                raise ValueError(f"config.train.resume_across_changes = {list(self.resume_across_changes)}: "
                                 f"{unknown} are not recorded in checkpoints; the fields that are: "
                                 f"{sorted(run)}")
        if "://" not in workdir:
            workdir = os.path.abspath(workdir)  # Orbax requires absolute paths
        self.workdir = workdir
        self.save_every = save_every
        self.is_primary = jax.process_index() == 0
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save, save_interval_steps=1)
        self._state = _OrbaxManager(os.path.join(workdir, STATE_DIR), options=options)
        # The best manager only ever receives strictly better checkpoints, so
        # keeping one keeps the best (and the earliest among equals).
        best_options = ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
        self._best = _OrbaxManager(os.path.join(workdir, BEST_DIR), options=best_options)
        self._best_info = self._read_best_info()
        self._pending: int | None = None  # the step of the last asynchronous save not yet known to be written
        # Called once before a CheckpointWriteError is raised (the trainer closes its logs and watchdog there).
        self.on_write_error = None

    # ----------------------------------------------------------------- state
    def all_steps(self) -> list[int]:
        return sorted(self._state.all_steps())

    def save(self, step: int, state: Any, *, data_iterator: Any = None, data_state: dict | None = None,
             meta: dict | None = None, force: bool = False) -> bool:
        """Saves ``state`` (a pytree of arrays) at ``step`` if due; returns whether it saved.

        ``data_iterator`` is a grain ``DatasetIterator`` (or ``DataLoaderIterator``);
        its position is saved per process. ``data_state``: instead, a position taken
        earlier with ``get_state()`` (a stop that discards the step whose batch was
        already drawn saves the position before it). ``meta`` is a small JSON-able
        dict; the run's ``topology()`` is added to it.
        """
        if not force and step % self.save_every != 0:
            return False
        self._finish_pending()  # a failed background save is reported as that step's, before this one starts
        if step in self._state.all_steps():
            return False
        meta = {**(meta or {}), "topology": topology()}
        if self.run is not None:
            meta["run"] = self.run
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_state is not None:
            data_iterator = _SavedPosition(data_state)
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            saved = bool(self._state.save(step, args=ocp.args.Composite(**items), force=True))
        except Exception as err:  # noqa: BLE001 - tensorstore / epath raise OSError, ValueError, RuntimeError
            raise self._write_error(step, err) from err
        self._pending = step if saved else self._pending
        return saved

    def _finish_pending(self) -> None:
        """Waits for the last asynchronous save; its failure becomes a CheckpointWriteError naming its step."""
        try:
            self._state.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            raise self._write_error(self._pending, err) from err
        self._pending = None

    def _write_error(self, step: int | None, err: Exception) -> CheckpointWriteError:
        try:
            self._state.reload()
            complete = [s for s in self._state.all_steps() if s != step]
        except Exception:  # noqa: BLE001 - the directory may be unreadable too
            complete = []
        folder = os.path.join(self.workdir, STATE_DIR)
        latest = (f"the latest complete checkpoint is {os.path.join(folder, str(max(complete)))}, and a rerun "
                  f"resumes from it" if complete else "no complete checkpoint exists yet")
        detail = str(err).splitlines()[0][:300] if str(err) else ""
        if self.on_write_error is not None:
            try:
                self.on_write_error()
            except Exception as hook_err:  # noqa: BLE001 - the write error is the one to report
                log.warning("cleaning up after the failed checkpoint write: %s", hook_err)
        return CheckpointWriteError(
            f"checkpoint step {step if step is not None else '?'} could not be written to {folder} "
            f"({type(err).__name__}: {detail}); {latest} (a step is only listed once all of it is written). Free "
            "space or fix the permissions there, then rerun the same command.")

    def restore_latest(self, abstract_state: Any, *, data_iterator: Any = None) -> Restored | None:
        """Restores the newest complete checkpoint, or returns None when there is none.

        Args:
          abstract_state: the target pytree (``abstract_like(state)``): shapes,
            dtypes and shardings of the state to restore into (any mesh and device
            count: Orbax reshards into them).
          data_iterator: the grain iterator to reposition (``set_state``; with another
            process count than the checkpoint's, ``set_state_from_processes``).
        Steps that fail to restore are skipped with a warning and moved to
        ``<workdir>/checkpoints_corrupt``; the next older step is tried.

        Raises:
          ResumeMismatchError: the step was written by a run of another configuration (``run_signature``)
            and the differing fields are not all in ``resume_across_changes``; raised before any array is read.
        """
        for step in sorted(self._state.all_steps(), reverse=True):
            items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
            try:
                self._check_resume(step)
                restored = self._state.restore(step, args=ocp.args.Composite(**items))
                state = restored["state"]
                # Surface truncated array data now rather than at first use.
                jax.block_until_ready(state)
                data_note = self._restore_data(step, data_iterator) if data_iterator is not None else None
            except CheckpointMismatchError:
                raise
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
            meta = dict(restored["meta"] or {})
            return Restored(step=step, state=state, meta=meta, topology=meta.pop("topology", None),
                            data_note=data_note)
        return None

    def _check_resume(self, step: int) -> None:
        """ResumeMismatchError when the step's recorded run differs from this one beyond resume_across_changes."""
        if self.run is None:
            return
        meta = self._state.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}
        saved = meta.get("run")
        if saved is None:
            log.warning("checkpoint step %d records no run configuration (written by an older version): resuming "
                        "without checking that it matches this run's", step)
            return
        differences = resume_differences(saved, self.run)
        blocking = [d for d in differences if d[0] not in self.resume_across_changes]
        where = os.path.join(self.workdir, STATE_DIR, str(step))
        if blocking:
            lines = "\n  ".join(f"{'config.' if not name.startswith(('student.', 'teacher.')) else ''}{name}: "
                                f"{old!r} in the checkpoint, {new!r} now" for name, old, new in blocking)
            raise ResumeMismatchError(
                f"cannot resume from {where}: it was written by a run with another configuration:\n  {lines}\n"
                "Rerun with the checkpoint's values, point --config.workdir at a new directory, or, to resume across "
                "the change on purpose, list the fields in --config.train.resume_across_changes (e.g. "
                f"--config.train.resume_across_changes={','.join(name for name, _, _ in blocking)}).")
        for name, old, new in differences:
            log.warning("resuming %s across a change allowed by config.train.resume_across_changes: %s %r -> %r",
                        where, name, old, new)

    def _restore_data(self, step: int, data_iterator: Any) -> str | None:
        """Repositions ``data_iterator`` from the step's per-process positions; returns a note when re-derived.

        The files are those grain's Orbax handler writes (``process_<i>-of-<n>.json``).
        """
        folder = epath.Path(self.workdir) / STATE_DIR / str(step) / "data"
        if not folder.exists():
            log.warning("checkpoint step %d holds no data position (%s): the data starts from the beginning", step,
                        folder)
            return None
        index, count = jax.process_index(), jax.process_count()
        own = folder / f"process_{index}-of-{count}.json"
        note = None
        if own.exists():
            data_iterator.set_state(json.loads(own.read_text()))
        else:
            files = {}
            for path in folder.glob("process_*-of-*.json"):
                match = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", path.name)
                if match:
                    files[(int(match[1]), int(match[2]))] = path
            written_by = {n for _, n in files}
            if len(written_by) != 1 or set(files) != {(i, n) for n in written_by for i in range(n)}:
                raise ValueError(f"data positions in {folder} are incomplete: {sorted(p.name for p in files.values())}")
            (old_count,) = written_by
            reshard = getattr(data_iterator, "set_state_from_processes", None)
            if reshard is None:
                raise CheckpointMismatchError(
                    f"{folder} holds the data positions of {old_count} processes, this run has {count}, and its data "
                    f"iterator ({type(data_iterator).__name__}) cannot re-derive its position for another process "
                    "count. Resume with the process count that wrote the checkpoint.")
            note = reshard([json.loads(files[(i, old_count)].read_text()) for i in range(old_count)])
        start = getattr(data_iterator, "start_prefetch", None)
        if start is not None:
            start()
        return note

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

        Strictly: on ties the earlier step stays best (docs/method.md validation rule).
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
        """Blocks until background saves are written (CheckpointWriteError if the last one failed)."""
        self._finish_pending()
        self._best.wait_until_finished()

    def export(self, params, graphdef, tokenizer, *, final: bool, best: bool) -> None:
        """The final and the best students in Hugging Face format (+ tokenizer files) under <workdir>/export/,
        written by process 0."""
        from flax import nnx

        from vaopd_jax.models import qwen3_vl
        from vaopd_jax.parallel import multihost

        targets = [("final", params)] if final else []
        if best and self.best_info is not None:
            targets.append(("best", self.restore_best(abstract_like(params))))
        for name, tree in targets:
            path = os.path.join(self.workdir, "export", name)
            qwen3_vl.save_hf_checkpoint(nnx.merge(graphdef, tree), path)
            if multihost.primary():
                tokenizer.save_pretrained(path)
        multihost.sync("exported")

    def close(self) -> None:
        self._state.close()
        self._best.close()
