"""The collector's tuning at the end of startup (``notifier.heap``), each case in a fresh interpreter: what a
process has frozen cannot be undone, so it is checked where nothing ran before."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from notifier.heap import YOUNG_THRESHOLD

PROBE = """
import gc, json, sys
from notifier.heap import tune_garbage_collector
exec(sys.argv[1])  # what ran before startup ended
first = tune_garbage_collector()
frozen = gc.get_freeze_count()
threshold = gc.get_threshold()
cycle = []
cycle.append(cycle)  # a cycle made after the tuning is still collected
del cycle
collected = gc.collect()
second = tune_garbage_collector()
print(json.dumps({"first": first, "second": second, "frozen": frozen, "threshold": threshold,
                  "collected": collected, "frozen_after": gc.get_freeze_count()}))
"""


def probe(before: str = "") -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, before], capture_output=True, text=True, timeout=60, check=True
    )
    seen: dict[str, Any] = json.loads(result.stdout)
    return seen


def test_startup_objects_are_frozen_once_and_later_cycles_still_collected() -> None:
    seen = probe()
    assert seen["first"] is True
    assert seen["second"] is False  # once per process
    assert seen["frozen"] > 1_000  # the interpreter's and notifier's objects
    assert seen["frozen_after"] == seen["frozen"]  # the second call froze nothing more
    assert seen["threshold"][0] == YOUNG_THRESHOLD
    assert seen["collected"] >= 1


@pytest.mark.parametrize(
    ("before", "young"),
    [
        ("gc.set_threshold(50_000, 20, 20)", 50_000),  # a higher threshold set by the host is kept
        ("gc.freeze()", 700),  # a host that froze its heap already (a preloading server) is left alone
    ],
)
def test_a_host_that_tuned_the_collector_already_keeps_its_choice(before: str, young: int) -> None:
    seen = probe(before)
    assert seen["threshold"][0] == young
    if before == "gc.freeze()":
        assert seen["first"] is False
