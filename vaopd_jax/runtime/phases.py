"""Wall time and peak resident memory (RSS) of each phase of a run.

    meter = phases.PhaseMeter()
    with meter.phase("teacher SFT"):
        ...
    for step in ...:
        with meter.phase("distillation"):      # a name entered again adds its time, keeps the highest peak
            ...
    print(meter.table())                       # one line per phase: calls, wall s, peak RSS GB
    meter.write_json(path)                     # what `python -m vaopd_jax.bench.demo` reads
    meter.close()

A phase's peak RSS is the higher of two figures: a background thread's samples of ``VmRSS``
(every ``interval_s``, 20 ms by default) while the phase is open, and the process's peak RSS
(``getrusage``, the figure `/usr/bin/time -v` reports) when the phase raised it. So the phase
that sets the process's peak reports it exactly, and a short spike inside another phase can be
missed by at most one sampling interval's worth. The kernel's high-water mark is never reset
(``/proc/self/clear_refs`` would also lower what `/usr/bin/time` reports). Phases may nest; an
outer phase's peak includes its inner phases'. Only this process is measured; the demo's data
pipeline runs in it (``data.num_workers = 0``). Without ``/proc`` (not Linux) only the ``getrusage``
figure is available and ``sampled`` is False.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import sys
import threading
import time

GB = 1024 ** 3
_STATUS = "/proc/self/status"


def _status_kb(field: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int | None:
    """Resident set size of this process now, in bytes (None where /proc is missing)."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def lifetime_peak_rss() -> int:
    """The process's peak RSS since it started, in bytes (what `/usr/bin/time -v` reports)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports kB, macOS bytes


@dataclasses.dataclass
class PhaseRecord:
    """One phase name: times entered, wall seconds summed over them, the highest RSS in any of them."""

    name: str
    calls: int = 0
    wall_s: float = 0.0
    peak_rss: int = 0


class PhaseMeter:
    """Times phases and measures their peak RSS (see the module docstring)."""

    def __init__(self, interval_s: float = 0.02):
        if not interval_s > 0:
            raise ValueError(f"interval_s={interval_s}; must be > 0")
        self.records: dict[str, PhaseRecord] = {}
        self._open: dict[str, tuple[float, int]] = {}  # name -> (start time, process peak RSS at the start)
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.sampled = current_rss() is not None
        self._stop = threading.Event()
        self._thread = None
        if self.sampled:
            self._thread = threading.Thread(target=self._sample, args=(interval_s,), name="phase-rss", daemon=True)
            self._thread.start()

    def _sample(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self._credit(current_rss() or 0)

    def _credit(self, rss: int) -> None:
        with self._lock:
            for name in self._open:
                record = self.records[name]
                record.peak_rss = max(record.peak_rss, rss)

    def begin(self, name: str) -> PhaseRecord:
        """Opens phase ``name`` (``end(name)`` closes it; prefer ``with meter.phase(name):``)."""
        with self._lock:
            if name in self._open:
                raise ValueError(f"phase {name!r} is already open: a phase cannot contain itself")
            record = self.records.setdefault(name, PhaseRecord(name))
            self._open[name] = (time.monotonic(), lifetime_peak_rss())
        self._credit(current_rss() or 0)
        return record

    def end(self, name: str) -> PhaseRecord:
        """Closes phase ``name``: adds its wall time and keeps the highest RSS reached while it was open."""
        self._credit(current_rss() or 0)
        with self._lock:
            if name not in self._open:
                raise ValueError(f"phase {name!r} is not open (open: {list(self._open)})")
            started, peak_before = self._open.pop(name)
            record = self.records[name]
            record.wall_s += time.monotonic() - started
            record.calls += 1
            peak_now = lifetime_peak_rss()
            if peak_now > peak_before or not self.sampled:  # this phase raised the process's peak: its own
                record.peak_rss = max(record.peak_rss, peak_now)
        return record

    @contextlib.contextmanager
    def phase(self, name: str):
        """Times the block as phase ``name`` and records the highest RSS reached inside it."""
        record = self.begin(name)
        try:
            yield record
        finally:
            self.end(name)

    def close(self) -> None:
        """Stops the sampling thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def as_dict(self) -> dict:
        return {"sampled": self.sampled, "wall_s": time.monotonic() - self.started,
                "peak_rss": lifetime_peak_rss(),
                "phases": [dataclasses.asdict(r) for r in self.records.values()]}

    def write_json(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.as_dict(), f, indent=1)
        os.replace(tmp, path)

    def table(self) -> str:
        return format_table(self.as_dict())


def format_table(report: dict) -> str:
    """The phases of a `PhaseMeter.as_dict()` report as a table: calls, wall time, peak RSS."""
    peak_label = "peak RSS GB" if report["sampled"] else "peak RSS GB (process so far)"
    lines = [f"{'phase':24s}{'calls':>7s}{'wall s':>10s}{peak_label:>16s}"]
    for r in report["phases"]:
        lines.append(f"{r['name']:24s}{r['calls']:>7d}{r['wall_s']:>10.1f}{r['peak_rss'] / GB:>16.2f}")
    lines.append(f"{'whole process':24s}{'':>7s}{report['wall_s']:>10.1f}{report['peak_rss'] / GB:>16.2f}")
    return "\n".join(lines)
