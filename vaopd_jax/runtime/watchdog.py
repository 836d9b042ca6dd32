"""Reports a loop phase (data, rollout, update, checkpoint, ...) that runs past its time limit.

    dog = watchdog.Watchdog(timeout_s=600, first_timeout_s=3600, action="report")
    with dog.phase("data", step=5):
        batch = next(iterator)
    dog.close()

A host stuck in a collective (another host died or diverged) or in the input pipeline otherwise
hangs silently. A daemon thread watches the phase in progress; when it passes its limit, the
report names the phase, the step, the process and how long it has run, followed by the Python
stack of every thread of the process (the main thread shows where it waits; grain's reader
threads show a stalled source). Then, as configured:

- ``action='report'``: keep waiting (a slow phase may still finish); a one-line reminder follows
  every further ``timeout_s``.
- ``action='exit'``: end the process with exit code ``EXIT_CODE`` (75, EX_TEMPFAIL: "try again")
  so a job scheduler can restart the run from its last checkpoint. A hang inside a collective
  cannot be interrupted from Python, so this exit skips cleanup (``os._exit``).

The first time each phase runs it gets ``first_timeout_s`` (it includes XLA compilation).
The watcher runs Python code: it reports while the main thread waits in XLA or I/O (which release
the GIL), not while a C extension holds the GIL.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import traceback
from typing import Callable, TextIO

ACTIONS = ("report", "exit")
EXIT_CODE = 75


def thread_stacks() -> str:
    """The Python stack of every thread of this process, the calling thread included."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sorted(sys._current_frames().items(), key=lambda kv: names.get(kv[0], "")):
        parts.append(f'Thread "{names.get(ident, "?")}" (id {ident}):\n' + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)


class Watchdog:
    """Watches one phase at a time (the loop is sequential); see the module docstring.

    Args:
      timeout_s: limit of a phase in seconds; <= 0 turns the watchdog off (``phase`` only times).
      first_timeout_s: limit of the first run of each phase name (default ``timeout_s``).
      action: 'report' (keep waiting) or 'exit' (exit code ``EXIT_CODE``).
      process_index: written in the report (default ``jax.process_index()``).
      stream: where reports go (default stderr).
      exit_fn: called with ``EXIT_CODE`` for action 'exit' (default ``os._exit``; tests replace it).
    """

    def __init__(self, timeout_s: float, *, first_timeout_s: float | None = None, action: str = "report",
                 process_index: int | None = None, stream: TextIO | None = None,
                 exit_fn: Callable[[int], None] | None = None):
        if action not in ACTIONS:
            raise ValueError(f"watchdog action {action!r}: must be one of {ACTIONS}")
        self.timeout_s = float(timeout_s)
        self.first_timeout_s = float(first_timeout_s) if first_timeout_s else self.timeout_s
        self.action = action
        if process_index is None:
            import jax

            process_index = jax.process_index()
        self.process_index = int(process_index)
        self._stream = stream
        self._exit = exit_fn or os._exit
        self._seen: set[str] = set()
        self._current: tuple[str, int, float, float] | None = None  # (phase, step, start, limit)
        self._cond = threading.Condition()
        self._closed = False
        self.reports = 0
        self._thread = None
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="vaopd-watchdog", daemon=True)
            self._thread.start()

    @contextlib.contextmanager
    def phase(self, name: str, step: int):
        """Times ``name`` at ``step``; reports it if it runs past its limit."""
        limit = self.timeout_s if name in self._seen else self.first_timeout_s
        with self._cond:
            self._current = (name, int(step), time.monotonic(), limit)
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._current = None
                self._seen.add(name)
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ watcher
    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                if self._current is None:
                    self._cond.wait()
                    continue
                current = self._current
                name, step, start, limit = current
                deadline = start + limit
                while not self._closed and self._current is current and time.monotonic() < deadline:
                    self._cond.wait(timeout=deadline - time.monotonic())
                if self._closed or self._current is not current:
                    continue
                self._report(name, step, time.monotonic() - start, limit)
                if self.action == "exit":
                    self._exit(EXIT_CODE)
                    return
                # Keep waiting; remind every further timeout_s while the same phase runs.
                while not self._closed and self._current is current:
                    self._cond.wait(timeout=self.timeout_s)
                    if self._current is current:
                        self._write(f"watchdog: process {self.process_index} still in phase '{name}' of step {step} "
                                    f"after {time.monotonic() - start:.0f} s\n")

    def _report(self, name: str, step: int, elapsed: float, limit: float) -> None:
        self.reports += 1
        header = (f"watchdog: phase '{name}' of step {step} has run {elapsed:.1f} s, past its limit of {limit:g} s, "
                  f"on process {self.process_index} (host {socket.gethostname()}, pid {os.getpid()}). "
                  + ("Exiting with code %d so the run can be restarted from its last checkpoint."
                     % EXIT_CODE if self.action == "exit" else "Still waiting.")
                  + " Python stacks of every thread:\n")
        self._write(header + thread_stacks() + "\n")

    def _write(self, text: str) -> None:
        stream = self._stream or sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass
