"""``./dev bench --gc-probe``: what CPython's garbage collector cost the service in each run.

``enable`` puts bench/gc_probe/ on the PYTHONPATH of every process the bench starts from then on; its
``sitecustomize`` logs each collection's CPU time (``gc.callbacks``, the collecting thread's CPU clock).
``spent`` adds up the collections of the service's processes within a run. The bench's CPU figures are the
processes' whole CPU; this says which part of it was the collector, a figure the machine's noise moves far
less (a full collection of a young service process took ~100-150 ms of CPU).
With ``--gc-untuned`` the probe also freezes a few objects at interpreter start-up, so that notifier's tuning
(notifier/heap.py) steps aside: the same code, measured as it was before that tuning. Python imports the first
``sitecustomize`` on its path, so while the probe is on it takes the place of any other one the environment has.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PROBE = Path(__file__).with_name("gc_probe")
LOG_ENV = "NOTIFIER_BENCH_GC_LOG"
UNTUNED_ENV = "NOTIFIER_BENCH_GC_UNTUNED"


def enable(logs: Path, *, untuned: bool = False) -> None:
    """Probe every Python process started from now on; their logs go to ``logs``."""
    logs.mkdir(parents=True, exist_ok=True)
    os.environ[LOG_ENV] = str(logs)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROBE), os.environ.get("PYTHONPATH")) if p)
    if untuned:
        os.environ[UNTUNED_ENV] = "1"


def logs() -> Path | None:
    """Where the probe writes, if ``enable`` was called."""
    directory = os.environ.get(LOG_ENV)
    return Path(directory) if directory else None


def spent(
    directory: Path, *, pids: Iterable[int], start: float, end: float, cpu_seconds: float, deliveries: int
) -> dict[str, Any]:
    """The collections of processes ``pids`` between wall-clock ``start`` and ``end``: how many and how much
    CPU per generation, ms per delivery, and the share of the processes' CPU (``cpu_seconds``) they took."""
    count = [0, 0, 0]
    micros = [0, 0, 0]
    for pid in pids:
        log = directory / f"{pid}.log"
        if not log.exists():
            continue
        for line in log.read_text().splitlines():
            at, generation, cpu = line.split()
            if start <= float(at) <= end:
                count[int(generation)] += 1
                micros[int(generation)] += int(cpu)
    ms = sum(micros) / 1000
    return {
        "collections": count,
        "ms_by_generation": [round(m / 1000, 1) for m in micros],
        "ms_per_delivery": round(ms / max(deliveries, 1), 3),
        "share_of_service_cpu_pct": round(100 * ms / 1000 / cpu_seconds, 1) if cpu_seconds > 0 else None,
    }
