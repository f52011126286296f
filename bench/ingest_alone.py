"""Ingest alone: notifier's API with no worker beside it, and the raw baseline, accepting the same events.

The full run's ingest ratio is taken while delivery runs beside ingest, so it mixes ingest's own cost with
the CPU the workers take from the API. ``./dev bench --ingest-alone`` separates the two: notifier runs in
the split shape with no ``notifier worker`` (``NOTIFIER_EMBEDDED_DISPATCHER=false``: it accepts and stores
events, and its NOTIFYs wake nobody), the raw baseline as always (its sender runs in the same process during
the round, so its CPU per event includes some sending, which only favours notifier; the next round waits
until it has sent everything). The two take turns, each round from empty tables with fresh events of the
headline load; per round and side: the service's CPU per accepted event and events/s.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

from bench import database, procs, services
from bench.harness import Run, say
from bench.scenario import Target, run_loadgen
from bench.workload import make_events


def measure_round(
    run: Run, target: Target, providers: services.Providers, users: list[Any], n: int, *, sends: bool
) -> dict[str, Any]:
    """One closed-loop round of the headline load's event count against ``target``, from empty tables; a target
    that ``sends`` has sent the round's deliveries when it returns."""
    o = run.options
    asyncio.run(database.reset(target.database))
    count = o.base_events * o.headline
    events = make_events(count, users, seed=o.seed + 1000 + n, run_id=f"{run.id}-alone-{target.name}-{n}")
    providers.set_presence(events.present)
    cpu_before = procs.tree_cpu(target.child.pid)
    load = run_loadgen(
        target.url,
        events.lines(),
        workdir=run.dir / "work",
        tag=f"alone-{target.name}-{n}",
        connections=o.connections,
        rate=0.0,
        timeout=o.timeout,
    )
    cpu = procs.tree_cpu(target.child.pid) - cpu_before
    if sends:  # the next round must not share the machine with this one's sending
        asyncio.run(database.wait_done(target.database, timeout=o.timeout))
    accepted = [r for r in load["results"] if 200 <= r[4] < 300]
    seconds = max((r[3] for r in accepted), default=load["start"]) - load["start"]
    return {
        "round": n,
        "variant": target.name,
        "events": count,
        "accepted": len(accepted),
        "events_per_s": round(len(accepted) / seconds, 1) if seconds > 0 else None,
        "cpu_ms_per_event": round(1000 * cpu / max(len(accepted), 1), 3),
    }


def ingest_alone(run: Run, rounds: int) -> dict[str, Any]:
    """Alternate ``rounds`` rounds of notifier (no worker) and the raw baseline; the figures and their medians."""
    o = run.options
    run.databases(("notifier", "raw"))
    results: list[dict[str, Any]] = []
    try:
        with services.stack(run.dir / "logs") as running:
            providers = services.start_providers(running, run.dir)
            notifier = run.start_notifier(running, providers, attempts=False)
            users = run.people(notifier, o.headline)
            asyncio.run(database.copy_people(run.db["notifier"], run.db["raw"]))
            raw_child = services.start_raw(running, run.db["raw"], providers, concurrency=o.concurrency)
            raw = Target("raw", raw_child, run.db["raw"])
            for n in range(1, rounds + 1):
                for target in (notifier, raw):
                    result = measure_round(run, target, providers, users, n, sends=target is raw)
                    say(
                        f"  ingest alone, round {n}, {target.name}: {result['accepted']} events at "
                        f"{result['events_per_s']}/s, {result['cpu_ms_per_event']} CPU ms per event"
                    )
                    results.append(result)
    finally:
        run.drop_databases()
    return {"rounds": results, "medians": medians(results)}


def medians(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant, the median events/s and CPU ms per event; and notifier's over the raw baseline's."""
    out: dict[str, Any] = {}
    for name in ("notifier", "raw"):
        mine = [r for r in results if r["variant"] == name]
        out[name] = {
            key: statistics.median(r[key] for r in mine if r[key] is not None)
            for key in ("events_per_s", "cpu_ms_per_event")
        }
    out["notifier_vs_raw"] = {
        key: round(out["notifier"][key] / out["raw"][key], 3) for key in ("events_per_s", "cpu_ms_per_event")
    }
    return out


def markdown(figures: dict[str, Any]) -> str:
    rows = ["| round | variant | events accepted | events/s | CPU ms per event |", "| --- | --- | --- | --- | --- |"]
    for r in figures["rounds"]:
        cells = (r["round"], r["variant"], r["accepted"], r["events_per_s"], r["cpu_ms_per_event"])
        rows.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    m = figures["medians"]
    for name in ("notifier", "raw"):
        rows.append(f"| median | {name} | | {m[name]['events_per_s']} | {m[name]['cpu_ms_per_event']} |")
    ratio = m["notifier_vs_raw"]
    rows.append(f"| **notifier / raw** | | | **{ratio['events_per_s']}** | {ratio['cpu_ms_per_event']} |")
    return "## Ingest alone (notifier's API without workers, the raw baseline as always)\n\n" + "\n".join(rows) + "\n"


def write(run: Run, figures: dict[str, Any]) -> None:
    """``ingest-alone.json`` and ``.md`` into the run's directory and the results directory; print the table."""
    run.report["ingest_alone"] = figures
    run.save("ingest-alone", f"# notifier bench, ingest alone — {run.report['started']}\n\n" + markdown(figures))
