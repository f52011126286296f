"""The garbage collector in a long-running service process, tuned once startup is done.

CPython frees most objects by reference counting; its collector only looks for reference cycles, and took ~5 %
of the service's CPU in a local bench run and ~9 % in QStash mode (bench/README.md, ``./dev bench --gc-probe``):

* A full collection (the oldest generation) walks every object the collector tracks, and most of a running
  service's objects are startup's -- modules, the ORM's mappers, the catalog's templates, compiled
  statements, about 150,000 -- which live as long as the process. Each full collection took ~100-150 ms of CPU
  on the 2-core dev machine, with the event loop blocked. ``gc.freeze()`` moves them to the permanent
  generation, which no collection visits: a full collection then takes ~3-20 ms. Freezing is a list splice,
  free even in a serverless cold start; it keeps startup's own garbage (about 1,800 objects), never freed.
* The youngest generation is collected after every 700 net allocations of tracked objects (CPython's
  default), several hundred times a second under load, and each collection promotes its survivors towards the
  older generations. Collecting it after ``YOUNG_THRESHOLD`` instead halved the collector's CPU again, for
  pauses of ~4 ms instead of ~0.6 ms, well inside the accept-latency target. Both together: ~1 % locally, ~2 %
  in QStash mode.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 7_000
"""Net allocations between collections of the youngest generation (CPython's default: 700). 20,000 halved the
collector's CPU once more in the bench, but for pauses of 7-27 ms."""


def tune_garbage_collector() -> bool:
    """Freeze every object the collector tracks now and collect the youngest generation less often, unless this
    process has frozen objects already; return whether this call tuned it.

    Once per process, at the end of startup: the first service started in a process owns its startup heap. A
    process that starts several (the test suite) must not freeze the later ones' objects, which would then
    never be freed. A server that froze its heap before forking this process has made its own choice.
    """
    if gc.get_freeze_count():
        return False
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, old)
    return True
