"""The whole bench run: set up, measure every variant at every load, compare, report.

One run = one PostgreSQL server, four throw-away databases (notifier, raw baseline, notifier over
QStash: the local dispatcher must not claim the other variants' rows; and the BullMQ worker's status
table), one fake-provider process, and the services under test as subprocesses. Ratios are taken within
the run, so the noise of a shared machine hits both sides of each ratio alike.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import bullmq, database, gcprobe, procs, report, services
from bench import profile as profiling
from bench.people import create_people
from bench.scenario import Target, measure
from bench.workload import make_events, make_users

RESULTS = procs.REPO / "bench" / "results"


@dataclass
class Options:
    base_events: int = 100
    base_users: int = 60
    scales: tuple[int, ...] = (1, 4, 16)
    headline: int = 4
    concurrency: int = 16
    connections: int = 16
    workers: int = 1
    # N (the production shape on PostgreSQL): the API with NOTIFIER_EMBEDDED_DISPATCHER=false plus N
    # `notifier worker` processes sharing --concurrency; 0: the dispatcher inside the API process.
    dispatch_processes: int = field(default_factory=lambda: default_dispatch_processes(os.cpu_count() or 1))
    # The workers' `nice` level in the split shape: accepting events keeps priority over sending them
    # (the README's advice for one host); 0: same priority as the API.
    worker_nice: int = 10
    seed: int = 7
    raw: bool = True
    bullmq: bool = True
    qstash: bool = True
    half_rate: bool = True
    profile: bool = False
    gc_probe: bool = False  # log every garbage collection; each run reports the collector's CPU (bench/gcprobe.py)
    gc_untuned: bool = False  # with gc_probe: notifier's collector as CPython sets it (notifier/heap.py steps aside)
    soak: bool = False
    ingest_alone: int = 0  # > 0: that many rounds of bench/ingest_alone.py instead of the main run
    compare: str | None = None  # a revision: alternating runs of it and this checkout (bench/compare.py)
    pairs: int = 4  # --compare's pairs of runs
    soak_deliveries: int = 100_000
    soak_rate_fraction: float = 0.8
    soak_rate: float | None = None  # events/s; None: soak_rate_fraction x the calibrated sustained rate
    log_level: str = "INFO"
    experiment: str | None = None  # "no-pre-ping": notifier with the pool's pre-ping off (see bench/serve.py)
    keep_databases: bool = False
    results: Path = RESULTS
    timeout: float = 900.0
    # Seconds to let PostgreSQL publish transaction counts after a run (0: skip; the counts are then low).
    stats_wait: float = 11.0
    # When the server's autovacuum is off, VACUUM (ANALYZE) the run's tables this often during each run,
    # as autovacuum would in production (0: never; see database.standing_in_for_autovacuum).
    vacuum_every: float = database.VACUUM_EVERY_SECONDS


def default_dispatch_processes(cores: int) -> int:
    """One `notifier worker` per core the API process leaves (at least one, at most four), as the README
    advises for one host. On two cores one worker sent as many deliveries/s as two, at ~11 % less CPU and ~25 %
    fewer transactions per delivery (its group commits carry twice as much), and the API ingested faster
    (bench/README.md, session 10)."""
    return max(1, min(cores - 1, 4))


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Run:
    """State of one bench run: its directory, databases, processes and collected results."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.started = dt.datetime.now(dt.UTC)
        self.id = f"b{int(time.time())}"
        self.dir = options.results / self.started.strftime("%Y%m%dT%H%M%SZ")
        self.dir.mkdir(parents=True, exist_ok=True)
        if options.gc_probe:
            gcprobe.enable(self.dir / "gc", untuned=options.gc_untuned)
        self.db = {name: f"bench_{os.getpid()}_{name}" for name in ("notifier", "raw", "qstash", "bullmq")}
        # What notifier queued in the headline run, per event: the BullMQ variants deliver the same.
        self.plan: list[dict[str, Any]] = []
        self.report: dict[str, Any] = {
            "started": self.started.isoformat(timespec="seconds"),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
            "environment": {
                "cpus": os.cpu_count(),
                "autovacuum": asyncio.run(database.autovacuum_on()),
                "load_before": _load(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
        }

    # ----- set-up -------------------------------------------------------------------------------

    @property
    def vacuum_every(self) -> float:
        """Seconds between the bench's VACUUM (ANALYZE) passes during a run; 0 when the server runs autovacuum."""
        return 0.0 if self.report["environment"]["autovacuum"] else self.options.vacuum_every

    def databases(self, names: tuple[str, ...]) -> None:
        for name in names:
            asyncio.run(database.create(self.db[name]))

    def drop_databases(self) -> None:
        if not self.options.keep_databases:
            for name in self.db.values():
                asyncio.run(database.drop(name))

    def events(self, scale: int, users: list[Any], tag: str, providers: services.Providers) -> list[bytes]:
        """The event bodies of one run at ``scale``; their conversations' present members are set at the fake Ably."""
        pool = users[: self.options.base_users * scale]
        events = make_events(self.options.base_events * scale, pool, seed=self.options.seed + scale, run_id=tag)
        providers.set_presence(events.present)
        return events.lines()

    def measure(self, target: Target, providers: services.Providers, lines: list[bytes], **kwargs: Any) -> Any:
        kwargs.setdefault("connections", self.options.connections)
        kwargs.setdefault("stats_wait", self.options.stats_wait)
        kwargs.setdefault("vacuum_every", self.vacuum_every)
        result = measure(target, providers, lines, workdir=self.dir / "work", timeout=self.options.timeout, **kwargs)
        terminal = result["by_status"].get("sent", 0) + result["by_status"].get("failed", 0)
        say(
            f"  {target.name}: {result['accepted']} events at {result['ingest_events_per_s']}/s, {terminal} deliveries "
            f"at {result['deliveries_per_s']}/s, e2e p99 {result['e2e_latency']['p99_ms']} ms, "
            f"peak RSS {result['peak_rss_mb']} MB (load {_load()})"
        )
        if result["rejected"] or result["receipts_missing"] or result["by_status"].get("failed"):
            say(f"  !! rejected {result['rejected']} {result['errors'][:2]}, missing {result['receipts_missing']}")
        return result

    # ----- the main run -------------------------------------------------------------------------

    def main(self) -> dict[str, Any]:
        o = self.options
        self.databases(("notifier", "raw", "qstash") if o.qstash else ("notifier", "raw"))
        try:
            with services.stack(self.dir / "logs") as running:
                providers = services.start_providers(running, self.dir)
                notifier = self.start_notifier(running, providers)
                users = self.people(notifier, max(o.scales))
                raw = None
                if o.raw:
                    asyncio.run(database.copy_people(self.db["notifier"], self.db["raw"]))
                    raw_child = services.start_raw(running, self.db["raw"], providers, concurrency=o.concurrency)
                    raw = Target("raw", raw_child, self.db["raw"])
                self._scaling(notifier, raw, providers, users)
                if o.half_rate:
                    self._half_rate(notifier, providers, users)
                if o.bullmq:
                    self._bullmq(providers)
                if o.qstash:
                    self._qstash(running, providers, users)
        finally:
            self.drop_databases()
        return self.finish()

    def start_notifier(
        self, running: services.Stack, providers: services.Providers, *, attempts: bool = True
    ) -> Target:
        """notifier in the run's shape; not ``attempts``: its API alone, sending nothing (``--ingest-alone``)."""
        o = self.options
        child = services.start_notifier(
            running,
            "notifier",
            self.db["notifier"],
            providers,
            concurrency=o.concurrency,
            workers=o.workers,
            dispatch_processes=o.dispatch_processes if attempts else 0,
            worker_nice=o.worker_nice,
            log_level=o.log_level,
            factory="bench.serve:notifier_app_experiment" if o.experiment == "no-pre-ping" else None,
            attempts=attempts,
        )
        return Target("notifier", child, self.db["notifier"])

    def people(self, notifier: Target, scale: int) -> list[Any]:
        users = make_users(self.options.base_users * scale, seed=self.options.seed, now=self.started)
        say(f"creating {len(users)} users and their preferences through the API")
        create_people(notifier.url, users)
        return users

    def _scaling(self, notifier: Target, raw: Target | None, providers: services.Providers, users: list[Any]) -> None:
        o = self.options
        rows = []
        for scale in o.scales:
            say(f"{scale}x load: {o.base_events * scale} events, {o.base_users * scale} users")
            lines = self.events(scale, users, f"{self.id}-{scale}", providers)
            profiler = None
            if o.profile and scale == o.headline:
                profiler = profiling.record(notifier.child.pid, self.dir / "profile.txt")
            row: dict[str, Any] = {"scale": scale, "users": o.base_users * scale}
            plan = self.plan if scale == o.headline else None
            row["notifier"] = self.measure(notifier, providers, lines, profiler=profiler, plan_out=plan)
            if raw is not None:
                row["raw"] = self.measure(raw, providers, lines)
            rows.append(row)
            if scale == o.headline:
                self.report["headline"] = {
                    "scale": scale,
                    "notifier": row["notifier"],
                    "raw": row.get("raw"),
                    "ratios": report.ratios(row["notifier"], row["raw"]) if raw is not None else {},
                }
        self.report["scaling"] = rows
        if o.profile and (self.dir / "profile.txt").exists():
            self.report["profile"] = profiling.summarise(self.dir / "profile.txt")

    def _headline_notifier(self) -> dict[str, Any]:
        headline = self.report.get("headline") or {"notifier": self.report["scaling"][-1]["notifier"]}
        result: dict[str, Any] = headline["notifier"]
        return result

    def _half_rate(self, notifier: Target, providers: services.Providers, users: list[Any]) -> None:
        o = self.options
        sustained = self._headline_notifier()["events_completed_per_s"]
        rate = sustained / 2
        scale = o.headline if o.headline in o.scales else o.scales[0]
        lines = self.events(scale, users, f"{self.id}-half", providers)
        say(f"half rate: {len(lines)} events open-loop at {rate:.1f}/s")
        self.report["half_rate"] = self.measure(notifier, providers, lines, rate=rate, connections=64)

    def _bullmq(self, providers: services.Providers) -> None:
        """Plain BullMQ, then BullMQ tracking every delivery in PostgreSQL, on what notifier queued at the headline."""
        o = self.options
        events = o.base_events * (o.headline if o.headline in o.scales else o.scales[0])
        workload = None
        if self.plan:
            workload = self.dir / "work" / "bullmq-workload.json"
            workload.parent.mkdir(parents=True, exist_ok=True)
            workload.write_text(json.dumps({"events": self.plan}))
            events = len(self.plan)
        asyncio.run(database.create(self.db["bullmq"], migrate=False))
        for key, label, tracking in (
            ("bullmq", "BullMQ", None),
            ("bullmq_pg", "BullMQ + PostgreSQL", self.db["bullmq"]),
        ):
            say(f"{label}: {events} events, concurrency {o.concurrency}, {o.workers} process(es)")
            providers.reset()
            before = asyncio.run(database.transactions(tracking)) if tracking else None
            result = bullmq.run(
                events=events,
                concurrency=o.concurrency,
                processes=o.workers,
                provider_url=f"{providers.http_url}/v1/send/{{channel}}",
                prefix=f"bench-{self.id}",
                timeout=o.timeout,
                workload=workload,
                pg_url=database.dsn(tracking) if tracking else None,
            )
            if "skipped" not in result:
                result |= self._bullmq_costs(result, providers.stats(), tracking, before)
            self.report[key] = result
            say(f"  {label}: {result}")

    def _bullmq_costs(
        self, result: dict[str, Any], calls: dict[str, Any], tracking: str | None, before: dict[str, int] | None
    ) -> dict[str, Any]:
        """Provider calls, QStash messages (none), transactions and worker CPU per delivery of a BullMQ run."""
        deliveries = max(result["deliveries"] + result["failed"], 1)
        xacts = 0
        if tracking is not None and before is not None:
            time.sleep(0.5)  # the workers' backends publish their counts as they exit
            after = asyncio.run(database.transactions(tracking))
            own = (result.get("pg_own_xacts") or 0) + 2  # run.mjs's own, and the first transactions() query's
            xacts = after["commit"] + after["rollback"] - before["commit"] - before["rollback"] - own
        return {
            "provider_calls": calls.get("calls", 0),
            "provider_replays": calls.get("replays", 0),
            "provider_calls_per_delivery": round(calls.get("calls", 0) / deliveries, 3),
            "qstash_messages_per_delivery": 0.0,
            "db_xacts": xacts,
            "db_xacts_per_delivery": round(xacts / deliveries, 2),
            "cpu_ms_per_delivery": round(1000 * result["worker_cpu_s"] / deliveries, 3),
        }

    def _qstash(self, running: services.Stack, providers: services.Providers, users: list[Any]) -> None:
        o = self.options
        asyncio.run(database.copy_people(self.db["notifier"], self.db["qstash"]))
        emulator = services.start_qstash(running, concurrency=o.concurrency)
        child = services.start_notifier(
            running,
            "notifier-qstash",
            self.db["qstash"],
            providers,
            concurrency=o.concurrency,
            workers=o.workers,
            log_level=o.log_level,
            qstash_url=f"http://127.0.0.1:{emulator.port}",
        )
        try:
            target = Target("notifier-qstash", child, self.db["qstash"])
            path = "/v1/qstash/deliveries/{delivery_id}"
            if not services.has_route(target.url, path):
                self.report["qstash"] = {"skipped": f"notifier does not serve {path} yet (no QStash delivery endpoint)"}
                say(f"QStash variant skipped: {self.report['qstash']['skipped']}")
                return
            scale = o.headline if o.headline in o.scales else o.scales[0]
            say(f"QStash variant: {o.base_events * scale} events")
            lines = self.events(scale, users, f"{self.id}-qstash", providers)
            qstash_url = f"http://127.0.0.1:{emulator.port}"
            profiler = profiling.record(child.pid, self.dir / "profile-qstash.txt") if o.profile else None
            self.report["qstash"] = self.measure(target, providers, lines, qstash_url=qstash_url, profiler=profiler)
            if o.profile and (self.dir / "profile-qstash.txt").exists():
                self.report["profile_qstash"] = profiling.summarise(self.dir / "profile-qstash.txt")
        finally:
            running.remove(child)
            running.remove(emulator)

    # ----- soak ---------------------------------------------------------------------------------

    def soak(self) -> dict[str, Any]:
        o = self.options
        self.databases(("notifier",))
        try:
            with services.stack(self.dir / "logs") as running:
                providers = services.start_providers(running, self.dir)
                notifier = self.start_notifier(running, providers)
                users = self.people(notifier, 4)
                say("soak calibration: 1x closed loop")
                calibration = self.measure(notifier, providers, self.events(1, users, f"{self.id}-cal", providers))
                per_event = calibration["dispatched"] / max(calibration["accepted"], 1)
                count = math.ceil(o.soak_deliveries / max(per_event, 0.1) * 1.03)
                rate = o.soak_rate or calibration["events_completed_per_s"] * o.soak_rate_fraction
                pool = users[: o.base_users * 4]
                events = make_events(count, pool, seed=o.seed + 99, run_id=f"{self.id}-soak")
                providers.set_presence(events.present)
                lines = events.lines()
                say(f"soak: {count} events (~{o.soak_deliveries} deliveries) open-loop at {rate:.1f}/s")
                sampler_box: dict[str, Any] = {}
                result = measure(
                    notifier,
                    providers,
                    lines,
                    workdir=self.dir / "work",
                    connections=64,
                    rate=rate,
                    timeout=max(o.timeout, 3 * count / rate + 300),
                    sample_interval=1.0,
                    sampler_out=sampler_box,
                    vacuum_every=self.vacuum_every,
                )
                self.report["soak"] = self._soak_figures(result, sampler_box["samples"], rate)
                self.report["soak"]["calibration"] = calibration
        finally:
            self.drop_databases()
        return self.finish()

    def _soak_figures(self, result: dict[str, Any], samples: list[tuple[float, int]], rate: float) -> dict[str, Any]:
        t0, t1 = samples[0][0], samples[-1][0]
        span = max(t1 - t0, 1e-9)

        def window(lo: float, hi: float) -> float:
            values = [rss for t, rss in samples if lo <= (t - t0) / span <= hi]
            return statistics.median(values) if values else float("nan")

        warm, end = window(0.10, 0.20), window(0.90, 1.0)
        step = max(1, len(samples) // 20)
        terminal = result["by_status"].get("sent", 0) + result["by_status"].get("failed", 0)
        return {
            "deliveries": terminal,
            "events": result["accepted"],
            "seconds": result["e2e_seconds"],
            "offered_rate": rate,
            "rss_first_mb": round(samples[0][1] / 2**20, 1),
            "rss_warm_mb": round(warm / 2**20, 1),
            "rss_end_mb": round(end / 2**20, 1),
            "rss_peak_mb": result["peak_rss_mb"],
            "rss_growth_pct": round(100 * (end - warm) / warm, 2),
            "rss_series_mb": [[round(t - t0, 1), round(rss / 2**20, 1)] for t, rss in samples[::step]],
            "run": result,
        }

    # ----- results ------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        r = self.report
        r["environment"]["load_after"] = _load()
        values: dict[str, float | None] = {}
        headline = r.get("headline") or {}
        if headline.get("raw"):
            values["ingest_vs_raw"] = headline["ratios"]["ingest_events_per_s"]
            values["deliveries_vs_raw"] = headline["ratios"]["deliveries_per_s"]
        if headline:
            values["cpu_ms_per_delivery_local"] = headline["notifier"]["cpu_ms_per_delivery"]
        qstash = r.get("qstash") or {}
        if qstash and "skipped" not in qstash:
            values["cpu_ms_per_delivery_qstash"] = qstash["cpu_ms_per_delivery"]
        for key in ("bullmq", "bullmq_pg"):
            bull = r.get(key) or {}
            if headline and bull and "skipped" not in bull:
                values[f"deliveries_vs_{key}"] = report.ratio(
                    headline["notifier"]["deliveries_per_s"], bull.get("deliveries_per_s")
                )
        if r.get("half_rate"):
            values["p99_accept_ms_half_rate"] = r["half_rate"]["accept_latency"]["p99_ms"]
        if r.get("soak"):
            values["soak_rss_growth_pct"] = r["soak"]["rss_growth_pct"]
        r["ratios"] = values
        r["targets"] = report.evaluate(values)
        self.save("soak" if r.get("soak") else "report", report.markdown(r))
        return r

    def save(self, name: str, text: str) -> None:
        """The report as ``name``.json and ``text`` as ``name``.md, in the run's directory and the results
        directory (the latest run); ``text`` printed."""
        for directory in (self.dir, self.options.results):
            (directory / f"{name}.json").write_text(json.dumps(self.report, indent=2, default=str))
            (directory / f"{name}.md").write_text(text)
        print(text)
        say(f"results in {self.dir}")
