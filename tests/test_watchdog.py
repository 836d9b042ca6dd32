"""Watchdog: a phase past its limit is reported (phase, step, process, every thread's stack), then waits or exits."""

import io
import threading
import time

import grain
import pytest

from vaopd_jax.runtime import watchdog


class StalledSource:
    """A random-access source whose record 3 blocks until released (a hung filesystem or remote read)."""

    def __init__(self):
        self.release = threading.Event()

    def __len__(self):
        return 16

    def __getitem__(self, index):
        if index == 3:
            self.release.wait(timeout=30)
        return index


def test_stalled_data_source_is_reported_with_every_threads_stack():
    source = StalledSource()
    iterator = iter(grain.MapDataset.source(source).to_iter_dataset(grain.ReadOptions(num_threads=2)))
    out = io.StringIO()
    dog = watchdog.Watchdog(timeout_s=0.5, action="report", process_index=3, stream=out)
    try:
        with dog.phase("data", step=0):  # the first run of a phase: records 0-2 arrive in time
            assert [next(iterator) for _ in range(3)] == [0, 1, 2]
        assert dog.reports == 0
        timer = threading.Timer(2.0, source.release.set)
        timer.start()
        with dog.phase("data", step=7):
            assert next(iterator) == 3  # stalls until released; the watchdog reports meanwhile
        timer.join()
    finally:
        dog.close()
    report = out.getvalue()
    assert dog.reports == 1
    assert "watchdog: phase 'data' of step 7 has run" in report and "past its limit of 0.5 s" in report
    assert "on process 3" in report and "Still waiting." in report
    assert 'Thread "MainThread"' in report and "test_stalled_data_source_is_reported" in report
    assert "in __getitem__" in report and "self.release.wait" in report  # the reader thread's stack
    assert "still in phase 'data' of step 7" in report  # the reminder while it keeps waiting


def test_exit_action_and_first_run_limit():
    out, exits = io.StringIO(), []
    dog = watchdog.Watchdog(timeout_s=0.2, first_timeout_s=5.0, action="exit", process_index=0, stream=out,
                            exit_fn=exits.append)
    try:
        with dog.phase("update", step=1):  # first run (compilation): 5 s allowed
            time.sleep(0.5)
        assert exits == [] and dog.reports == 0
        with dog.phase("update", step=2):
            time.sleep(0.8)
    finally:
        dog.close()
    assert exits == [watchdog.EXIT_CODE]
    assert "phase 'update' of step 2" in out.getvalue() and "Exiting with code 75" in out.getvalue()


def test_bad_action_and_disabled_watchdog():
    with pytest.raises(ValueError, match="watchdog action 'restart': must be one of"):
        watchdog.Watchdog(10, action="restart", process_index=0)
    dog = watchdog.Watchdog(0, process_index=0)  # off: phases are not watched
    with dog.phase("rollout", step=1):
        pass
    assert dog._thread is None
    dog.close()
