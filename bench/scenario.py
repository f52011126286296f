"""One measured run: a workload through one service (notifier, notifier over QStash, or the raw baseline).

Drive the events with the load generator (its own process), wait until every delivery that was due
reached a terminal state in the database, then join the three clocks: the generator's accept times,
the fake providers' receipt times (per idempotency key) and the rows' finish times.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import database, gcprobe, procs, services
from bench.services import API_KEY, Providers

NAMESPACE = uuid.UUID("6f1c1f38-4a7e-5d9c-9a43-2d1f2f4b7a10")  # notifier.channels.base.IDEMPOTENCY_NAMESPACE


@dataclass
class Target:
    """A service under test: its process, its database and its URL."""

    name: str
    child: procs.Child
    database: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.child.port}"


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _ms(values: Sequence[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for p in (50, 95, 99):
        v = percentile(values, p)
        out[f"p{p}_ms"] = round(v * 1000, 1) if v is not None else None
    out["max_ms"] = round(max(values) * 1000, 1) if values else None
    return out


def receipt_key(delivery_id: str, channel: str, send_group: str | None = None) -> str:
    """The idempotency key under which the fake provider records the call that carried a delivery.

    Alone (``send_group`` None): OneSignal's key is a UUID derived from the delivery id, Knock's and Ably's
    the delivery id. In a send group (one call for several deliveries of one event and channel): OneSignal's
    key is the UUID derived from the group's id, Knock's the group's id; Ably keeps one message per member,
    keyed by the delivery id.
    """
    carrier = send_group if send_group is not None and channel != "in_app" else delivery_id
    return str(uuid.uuid5(NAMESPACE, carrier)) if channel == "push" else carrier


def first_receipt(
    delivery_id: str,
    channel: str,
    receipts: Mapping[str, int],
    *,
    grouped: database.Grouped | None = None,
    members: Mapping[str, Sequence[str]] | None = None,
) -> int | None:
    """When (ns) a provider first received a call carrying the delivery; None if none did.

    The candidates are the delivery's own key and the key of every send group it was attempted in
    (``grouped``); the earliest received wins. A group's call counts only if it named the delivery's
    recipient, where the fake recorded whom the call named (``members``: calls that named several).
    """
    keys = [receipt_key(delivery_id, channel)]
    if grouped is not None:
        for group in grouped.groups:
            key = receipt_key(delivery_id, channel, group)
            named = (members or {}).get(key)
            if named is None or grouped.user_id in named:
                keys.append(key)
    return min((receipts[key] for key in keys if key in receipts), default=None)


def run_loadgen(
    url: str, lines: Sequence[bytes], *, workdir: Path, tag: str, connections: int, rate: float, timeout: float
) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    events_file, out_file, config_file = (workdir / f"{tag}.{ext}" for ext in ("events.jsonl", "out.json", "json"))
    events_file.write_bytes(b"\n".join(lines) + b"\n")
    config = {"url": url, "token": API_KEY, "events_file": str(events_file), "out": str(out_file)}
    config |= {"connections": connections, "rate": rate}
    config_file.write_text(json.dumps(config))
    subprocess.run(
        [sys.executable, "-m", "bench.loadgen", str(config_file)], cwd=procs.REPO, check=True, timeout=timeout
    )
    result: dict[str, Any] = json.loads(out_file.read_text())
    for path in (events_file, out_file, config_file):
        path.unlink()
    return result


@contextlib.contextmanager
def _no_profiler() -> Iterator[None]:
    yield


def measure(
    target: Target,
    providers: Providers,
    lines: Sequence[bytes],
    *,
    workdir: Path,
    connections: int,
    rate: float = 0.0,
    timeout: float = 900.0,
    profiler: contextlib.AbstractContextManager[Any] | None = None,
    sample_interval: float = 0.2,
    sampler_out: dict[str, Any] | None = None,
    stats_wait: float = 11.0,
    vacuum_every: float = 0.0,
    qstash_url: str | None = None,
    plan_out: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run ``lines`` (event bodies) through ``target`` from empty tables; return the figures of the run.

    ``qstash_url``: the QStash emulator the target publishes to, whose messages are counted. ``plan_out``
    receives, per accepted event, its type, data and the (user, channel) of every delivery it queued.
    """
    asyncio.run(database.reset(target.database))
    providers.reset()
    pid = target.child.pid
    xacts_before = asyncio.run(database.transactions(target.database))
    qstash_before = services.qstash_stats(qstash_url) if qstash_url else {}
    started_at = time.time()
    split_before = procs.CpuSnapshot.take(service_pid=pid, providers_pid=providers.child.pid, database=target.database)
    sampler = procs.Sampler(pid, interval=sample_interval)
    vacuum = database.standing_in_for_autovacuum(target.database, every=vacuum_every)
    with sampler.running(), profiler or _no_profiler(), vacuum as vacuum_passes:
        load = run_loadgen(
            target.url, lines, workdir=workdir, tag=target.name, connections=connections, rate=rate, timeout=timeout
        )
        done = asyncio.run(database.wait_done(target.database, timeout=timeout))
        finished_at = time.time()
    split_after = procs.CpuSnapshot.take(service_pid=pid, providers_pid=providers.child.pid, database=target.database)
    ended_at = time.time()
    cpu = split_after.service - split_before.service
    gc_logs = gcprobe.logs()
    # The processes whose collections count, while they all still run (only with --gc-probe).
    service_pids = [process.pid for process in procs.tree(pid)] if gc_logs is not None else []
    if sampler_out is not None:
        sampler_out["samples"] = sampler.samples
    calls = Calls(
        receipts=providers.receipts(),
        members=providers.members(),
        stats=providers.stats(),
        groups=asyncio.run(database.send_groups(target.database)),
        qstash=_delta(services.qstash_stats(qstash_url), qstash_before) if qstash_url else {},
    )
    # An idle backend publishes its transaction counts within 10 s (PGSTAT_IDLE_INTERVAL); wait for all.
    time.sleep(stats_wait)
    xacts_after = asyncio.run(database.transactions(target.database))
    bodies = [json.loads(line) for line in lines]
    result = figures(target.name, load, done, calls, cpu, sampler, finished_at, types=[b["type"] for b in bodies])
    # Transactions per delivery: a load-independent view of the round trips (pre-pings roll back). Less the
    # bench's own: PostgreSQL counts one per backend start-up, so wait_done's queries and connection,
    # send_groups' query and connection, and the first transactions() query and its connection.
    own = done["queries"] + 5
    commits = xacts_after["commit"] - xacts_before["commit"] - own
    rollbacks = xacts_after["rollback"] - xacts_before["rollback"]
    terminal = max(result["by_status"].get("sent", 0) + result["by_status"].get("failed", 0), 1)
    result["db_commits_per_delivery"] = round(commits / terminal, 2)
    result["db_rollbacks_per_delivery"] = round(rollbacks / terminal, 2)
    result["db_xacts_per_delivery"] = round((commits + rollbacks) / terminal, 2)
    result["cpu_split"] = split_after.split_since(split_before, deliveries=terminal)
    result["vacuum_passes"] = len(vacuum_passes)
    if gc_logs is not None:
        result["gc"] = gcprobe.spent(
            gc_logs, pids=service_pids, start=started_at, end=ended_at, cpu_seconds=cpu, deliveries=terminal
        )
    if plan_out is not None:
        plan_out.extend(_plan(bodies, load["results"]))
    return result


def _delta(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {key: value - before.get(key, 0) for key, value in after.items()}


def _plan(bodies: Sequence[dict[str, Any]], results: Sequence[Any]) -> list[dict[str, Any]]:
    """Per accepted event: its type, data and the (user, channel) of each delivery the service queued."""
    out = []
    for body, r in zip(bodies, results, strict=True):
        if 200 <= r[4] < 300:
            deliveries = [[user, channel] for _, channel, status, user in r[5] if status == "queued"]
            out.append({"type": body["type"], "data": body["data"], "deliveries": deliveries})
    return out


@dataclass
class Calls:
    """What reached the providers (and QStash) during a run, and the send groups the service formed."""

    receipts: dict[str, int]  # idempotency key -> first receipt (ns)
    members: dict[str, list[str]]  # key -> recipients named, for calls that named several
    stats: dict[str, Any]  # the fakes' counts: calls (carrying deliveries), calls_by_kind, replays, ...
    groups: dict[str, database.Grouped]  # delivery id -> its send groups
    qstash: dict[str, int]  # the QStash emulator's counts during the run (empty: no QStash)


def _per(count: float, deliveries: int) -> float:
    return round(count / max(deliveries, 1), 3)


def figures(
    name: str,
    load: dict[str, Any],
    done: dict[str, Any],
    calls: Calls,
    cpu_seconds: float,
    sampler: procs.Sampler,
    finished_at: float,
    *,
    types: Sequence[str] = (),
) -> dict[str, Any]:
    results = load["results"]
    start = load["start"]
    ok = [r for r in results if 200 <= r[4] < 300]
    accept_latency = [r[3] - r[1] for r in ok]
    last_accept = max((r[3] for r in ok), default=start)
    planned: dict[str, int] = {}
    by_type: dict[str, dict[str, Any]] = {}
    e2e: list[float] = []
    missing = 0
    for i, r in enumerate(results):
        if not 200 <= r[4] < 300:
            continue
        kind = by_type.setdefault(types[i] if i < len(types) else "?", {"events": 0, "planned": {}})
        kind["events"] += 1
        for delivery_id, channel, status, *_ in r[5]:
            planned[status] = planned.get(status, 0) + 1
            kind["planned"][status] = kind["planned"].get(status, 0) + 1
            if status != "queued":
                continue
            received = first_receipt(
                delivery_id, channel, calls.receipts, grouped=calls.groups.get(delivery_id), members=calls.members
            )
            if received is None:
                missing += 1
            else:
                e2e.append(max(0.0, received / 1e9 - r[3]))
    for kind in by_type.values():
        kind["deliveries_per_event"] = round(sum(kind["planned"].values()) / kind["events"], 2)
        kind["queued_per_event"] = round(kind["planned"].get("queued", 0) / kind["events"], 2)
    dispatched = planned.get("queued", 0)
    by_status = done["by_status"]
    terminal = by_status.get("sent", 0) + by_status.get("failed", 0)
    last = done["last_finished"] or finished_at
    e2e_seconds = max(last - start, 1e-9)
    ingest_seconds = max(last_accept - start, 1e-9)
    stats = calls.stats
    return {
        "variant": name,
        "events": len(results),
        "accepted": len(ok),
        "rejected": len(results) - len(ok),
        "errors": load["errors"],
        "connections": load["connections"],
        "offered_rate": load["rate"] or None,
        "planned": planned,
        "deliveries_per_event": round(sum(planned.values()) / max(len(ok), 1), 2),
        "queued_per_event": round(dispatched / max(len(ok), 1), 2),
        "by_type": dict(sorted(by_type.items())),
        "dispatched": dispatched,
        "by_status": by_status,
        "ingest_seconds": round(ingest_seconds, 3),
        "ingest_events_per_s": round(len(ok) / ingest_seconds, 1),
        "e2e_seconds": round(e2e_seconds, 3),
        "deliveries_per_s": round(terminal / e2e_seconds, 1),
        "events_completed_per_s": round(len(ok) / e2e_seconds, 1),
        "accept_latency": _ms(accept_latency),
        "e2e_latency": _ms(e2e),
        "receipts_missing": missing,
        "provider_requests": stats.get("requests", 0),
        "provider_replays": stats.get("replays", 0),
        "provider_calls": stats.get("calls", 0),
        "provider_calls_by_kind": stats.get("calls_by_kind", {}),
        "provider_calls_per_delivery": _per(stats.get("calls", 0), terminal),
        "send_groups": len({g for grouped in calls.groups.values() for g in grouped.groups}),
        "grouped_deliveries": len(calls.groups),
        "qstash": calls.qstash,
        "qstash_messages_per_delivery": _per(calls.qstash.get("accepted", 0), terminal),
        "cpu_seconds": round(cpu_seconds, 2),
        "cpu_ms_per_delivery": round(1000 * cpu_seconds / max(terminal, 1), 3),
        "peak_rss_mb": round(sampler.peak / 2**20, 1),
        "rss_samples": len(sampler.samples),
    }
