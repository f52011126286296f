"""Imported by every Python process the bench starts with ``--gc-probe`` (which puts this directory on
PYTHONPATH): it logs the CPU time of each garbage collection, so that a run can say what the collector cost
the service (bench/gcprobe.py reads the logs).

``NOTIFIER_BENCH_GC_LOG``: the directory of the logs: one ``<pid>.log`` per process, one line per collection
(wall-clock time, generation, CPU microseconds of the collecting thread).
``NOTIFIER_BENCH_GC_UNTUNED=1``: also freeze the objects of interpreter start-up (a few thousand), so that
notifier's own tuning (notifier/heap.py), which steps aside in a process that froze objects before it, does
not happen: the collector as it was before notifier tuned it.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any, TextIO

_DIRECTORY = os.environ.get("NOTIFIER_BENCH_GC_LOG")
_log: TextIO | None = None
_log_pid = 0
_started = 0.0


def _collection(phase: str, info: dict[str, Any]) -> None:
    global _log, _log_pid, _started
    if phase == "start":
        _started = time.thread_time()
        return
    spent = time.thread_time() - _started
    if _log is None or _log_pid != os.getpid():  # first collection, or in a forked child
        _log_pid = os.getpid()
        _log = open(os.path.join(_DIRECTORY or ".", f"{_log_pid}.log"), "a", buffering=1)  # noqa: SIM115
    _log.write(f"{time.time():.3f} {info['generation']} {round(spent * 1e6)}\n")


if _DIRECTORY:
    gc.callbacks.append(_collection)
    if os.environ.get("NOTIFIER_BENCH_GC_UNTUNED") == "1":
        gc.freeze()
