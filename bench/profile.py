"""py-spy sampling of the service process during a run, summarised by function.

``./dev bench --profile`` wraps the headline notifier run in ``py-spy record`` (raw collapsed stacks,
idle frames excluded; only the thread holding the GIL unless ``BENCH_PYSPY_ALL_THREADS`` is set)
and reports the functions with the most samples: own time (the leaf frame) and inclusive time for
notifier's own frames. py-spy is not a project dependency: install it into
the venv (``.venv/bin/pip install py-spy``) to use this.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def py_spy_command(binary: str, pid: int, out: Path, *, rate: int) -> list[str]:
    """py-spy's command line for ``record``, with the options BENCH_PYSPY_ALL_THREADS and BENCH_PYSPY_NATIVE ask for."""
    command = [binary, "record", "--pid", str(pid), "--subprocesses", "--rate", str(rate)]
    command += ["--format", "raw", "--output", str(out)]
    # --gil: only the thread holding the GIL is sampled, so the SDK threads' blocking socket calls
    # (which py-spy cannot always tell from work) do not count as CPU.
    if not switched_on("BENCH_PYSPY_ALL_THREADS"):
        command.append("--gil")
    # --native (C/Cython frames, e.g. asyncpg's protocol) needs the process paused per sample.
    command.append("--native" if switched_on("BENCH_PYSPY_NATIVE") else "--nonblocking")
    return command


def switched_on(variable: str) -> bool:
    """Whether an environment switch is on: set to anything but empty, ``0``, ``false`` or ``no``."""
    return os.environ.get(variable, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def record(pid: int, out: Path, *, rate: int = 200) -> Iterator[None]:
    """Sample ``pid`` (and its subprocesses) while the block runs; write collapsed stacks to ``out``."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    command = py_spy_command(binary, pid, out, rate=rate)
    log = out.with_suffix(".log").open("wb")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


_ROOT = f"{Path(__file__).resolve().parents[1]}/"


def _frame(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)" without the line, so lines of one function merge.
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", _ROOT):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


def summarise(collapsed: Path, *, top: int = 25) -> dict[str, Any]:
    """Own and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")[1:]]  # the first entry is the process/thread
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(counter: Counter[str], keep: Any = None) -> list[list[Any]]:
        items = [(k, v) for k, v in counter.most_common() if keep is None or keep(k)]
        return [[k, round(100 * v / max(total, 1), 1)] for k, v in items[:top]]

    return {
        "samples": total,
        "own_pct": share(own),
        "notifier_inclusive_pct": share(inclusive, lambda k: "notifier/" in k),
        "library_inclusive_pct": share(inclusive, lambda k: "notifier/" not in k and "bench/" not in k),
    }
