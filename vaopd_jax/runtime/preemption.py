"""Stop requests (SIGTERM, SIGINT, JAX's preemption notice) that every process acts on at the same point.

    stop = preemption.StopRequest()
    stop.install()                      # just before the training loop
    while ...:
        if stop.reached("before step 5"):   # every process calls it at the same points, in the same order
            ... save a checkpoint, wait for it, exit 0
    stop.uninstall()

TPU pods, spot instances, SLURM (``--signal``) and Kubernetes stop a job with SIGTERM and a grace
period. The loop calls ``reached`` at fixed check points (before a step's rollout, and after it,
before the update); the first check point at which every process agrees returns True on all of
them.

- One process: Python handlers for SIGTERM and SIGINT set a flag; ``reached`` returns it.
- Several processes (``jax.distributed``): JAX's preemption service (on by default,
  ``jax_enable_preemption_service``) owns SIGTERM from ``jax.distributed.initialize`` on: its
  handler tells the coordination service, which tells every process, and the processes agree on
  the check point after the one the fastest of them has reached
  (``multihost_utils.reached_preemption_sync_point``). So all processes stop at the same point
  even when only one received the signal. SIGINT (Ctrl-C) is forwarded to this process as SIGTERM
  so it takes the same path. With the service turned off, each check point all-gathers the
  processes' flags instead (one small collective per check point).

A signal received again while stopping is reported and otherwise ignored: the checkpoint being
written is never cut off by it (``kill -9`` still ends a process at once; Orbax then leaves only a
temporary directory, removed at the next start, and the previous checkpoint stays complete).
Before ``install`` the signals keep their default action (a Ctrl-C during start-up ends the run at
once: there is nothing to save yet).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _preemption_service():
    """JAX's preemption sync manager when this is a multi-process run that has one, else None."""
    from jax._src import distributed

    if distributed.global_state.client is None:
        return None
    return distributed.global_state.preemption_sync_manager


class StopRequest:
    """Signal handlers plus the cross-process agreement on where to stop (see the module docstring).

    Attributes:
      signal_name: the signal this process received first ('SIGTERM' / 'SIGINT'), or None. With
        several processes and JAX's service, SIGTERM is handled outside Python, so a process that
        only learns of the notice from another one (or got SIGTERM itself) reports None.
      stopped_at: the label of the check point the processes agreed on, once ``reached`` returned True.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self.received_at: float | None = None
        self.stopped_at: str | None = None
        self._counter = 0
        self._previous: dict[int, object] = {}
        self._forward_to_jax = False

    # ----------------------------------------------------------------- handlers
    def install(self) -> "StopRequest":
        """Installs the handlers (main thread only; a no-op elsewhere, e.g. in a notebook worker thread)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        self._forward_to_jax = jax.process_count() > 1 and _preemption_service() is not None
        # With JAX's service SIGTERM stays with its C-level handler; replacing it would cut the
        # coordination service out.
        handled = (signal.SIGINT,) if self._forward_to_jax else SIGNALS
        for signum in handled:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum, frame) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            _say(f"received {name} again: already stopping; the checkpoint being written is not cut off "
                 "(kill -9 ends the run at once, the last complete checkpoint stays usable)")
            return
        self.signal_name, self.received_at = name, time.monotonic()
        _say(f"received {name}: stopping at the next check point of the loop on every process, then saving a "
             "checkpoint and exiting")
        if self._forward_to_jax:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's handler: the coordination service tells every process

    # ---------------------------------------------------------------- agreement
    def reached(self, label: str) -> bool:
        """Whether every process stops at this check point.

        Every process must call it at the same check points, in the same order, from the start of
        the loop: the count of calls is what the processes agree on. ``label`` (e.g. 'before step 5')
        names the point in messages.
        """
        self._counter += 1
        if jax.process_count() == 1:
            stop = self.signal_name is not None
        elif _preemption_service() is not None:
            from jax.experimental import multihost_utils

            stop = bool(multihost_utils.reached_preemption_sync_point(self._counter))
        else:
            import numpy as np
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
            stop = bool(np.any(np.asarray(flags)))
        if stop and self.stopped_at is None:
            self.stopped_at = label
        return stop

    def seconds_since_signal(self) -> float | None:
        return None if self.received_at is None else time.monotonic() - self.received_at

    def report(self, checkpoint_dir: str, saved_in_s: float) -> str:
        """The line saying where the run stopped and that its checkpoint is complete."""
        since = self.seconds_since_signal()
        return (f"stopped {self.stopped_at}" + (f" ({self.signal_name})" if self.signal_name else "") +
                f": the checkpoint {checkpoint_dir} is complete (saved in {saved_in_s:.1f} s" +
                (f", {since:.1f} s after the signal" if since is not None else "") + ")")


def _say(message: str) -> None:
    try:
        sys.stderr.write(f"[process {jax.process_index()}] {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: the flag is what matters
        pass
