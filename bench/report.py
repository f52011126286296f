"""Ratios, targets and the markdown tables of a bench report."""

from __future__ import annotations

from typing import Any

TARGETS = (
    # key, description, threshold, comparison (issue #16's targets)
    ("cpu_ms_per_delivery_local", "service CPU ms per delivery, local mode <= 1.5", 1.5, "<="),
    ("cpu_ms_per_delivery_qstash", "service CPU ms per delivery, QStash mode <= 2.5", 2.5, "<="),
    ("deliveries_vs_raw", "end-to-end deliveries/s >= the raw baseline's", 1.0, ">="),
    ("deliveries_vs_bullmq", "end-to-end deliveries/s >= 50% of plain BullMQ's", 0.50, ">="),
    ("ingest_vs_raw", "ingest events/s >= 80% of the raw baseline's", 0.80, ">="),
    ("p99_accept_ms_half_rate", "p99 accept latency < 50 ms at half the maximum rate", 50.0, "<"),
    ("soak_rss_growth_pct", "RSS growth < 5% across the soak", 5.0, "<"),
)
_COMPARE = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, "<": lambda v, t: v < t}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(notifier: dict[str, Any], raw: dict[str, Any]) -> dict[str, float | None]:
    """notifier / raw for throughputs; raw / notifier would hide that lower is worse for costs, so costs are n/r too."""
    return {
        "ingest_events_per_s": ratio(notifier["ingest_events_per_s"], raw["ingest_events_per_s"]),
        "deliveries_per_s": ratio(notifier["deliveries_per_s"], raw["deliveries_per_s"]),
        "e2e_p99_ms": ratio(notifier["e2e_latency"]["p99_ms"], raw["e2e_latency"]["p99_ms"]),
        "peak_rss_mb": ratio(notifier["peak_rss_mb"], raw["peak_rss_mb"]),
        "cpu_ms_per_delivery": ratio(notifier["cpu_ms_per_delivery"], raw["cpu_ms_per_delivery"]),
    }


def evaluate(values: dict[str, float | None]) -> list[dict[str, Any]]:
    out = []
    for key, text, threshold, op in TARGETS:
        value = values.get(key)
        met = None if value is None else _COMPARE[op](value, threshold)
        out.append({"target": key, "description": text, "threshold": threshold, "value": value, "met": met})
    return out


def _fmt(value: Any, suffix: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.3f}{suffix}" if abs(value) < 10 else f"{value:,.1f}{suffix}"
    return f"{value:,}{suffix}" if isinstance(value, int) else f"{value}{suffix}"


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in cells) + " |"


RUN_HEAD = (
    "| variant | events | deliveries | ingest ev/s | deliveries/s | e2e p50 ms | e2e p95 ms | e2e p99 ms "
    "| accept p99 ms | peak RSS MB | CPU ms/delivery | DB xacts/delivery | provider calls/delivery "
    "| QStash msgs/delivery |\n|" + " --- |" * 14
)


def _costs(r: dict[str, Any]) -> list[Any]:
    """DB transactions, provider calls and QStash messages per delivery (None in reports from before them)."""
    xacts = r.get("db_xacts_per_delivery")
    if xacts is None and r.get("db_commits_per_delivery") is not None:
        xacts = round(r["db_commits_per_delivery"] + r["db_rollbacks_per_delivery"], 2)
    return [xacts, r.get("provider_calls_per_delivery"), r.get("qstash_messages_per_delivery")]


def run_row(label: str, r: dict[str, Any]) -> str:
    e2e, acc = r["e2e_latency"], r["accept_latency"]
    terminal = r["by_status"].get("sent", 0) + r["by_status"].get("failed", 0)
    first = [label, r["accepted"], terminal, r["ingest_events_per_s"], r["deliveries_per_s"], e2e["p50_ms"]]
    rest = [e2e["p95_ms"], e2e["p99_ms"], acc["p99_ms"], r["peak_rss_mb"], r["cpu_ms_per_delivery"], *_costs(r)]
    return _row([*first, *rest])


def bullmq_row(label: str, bull: dict[str, Any]) -> str:
    """A BullMQ run: e2e is enqueue -> provider ack; CPU is its worker processes' (not Redis's nor PostgreSQL's)."""
    first = [label, bull["events"], bull["deliveries"], bull.get("events_per_s"), bull["deliveries_per_s"]]
    latency = [bull["p50_ms"], bull["p95_ms"], bull["p99_ms"]]
    return _row([*first, *latency, "", "", bull.get("cpu_ms_per_delivery"), *_costs(bull)])


WORKLOAD_HEAD = "| event type | events | deliveries/event | queued/event |\n| --- | --- | --- | --- |"


def workload_rows(r: dict[str, Any]) -> list[str]:
    """Fan-out of a run: deliveries planned (every status) and queued (to be sent) per event, by type and in all."""
    by_type = r.get("by_type")
    if not by_type:
        return []
    rows = [WORKLOAD_HEAD]
    for name, kind in by_type.items():
        rows.append(_row([f"`{name}`", kind["events"], kind["deliveries_per_event"], kind["queued_per_event"]]))
    rows.append(_row(["**all**", r["accepted"], r["deliveries_per_event"], r["queued_per_event"]]))
    return rows


CPU_HEAD = (
    "| variant | service | PostgreSQL | fake providers | load generator | other | machine busy |\n|" + " --- |" * 7
)


CPU_PARTS = ("service", "postgres", "providers", "load", "other")
"""The process groups of a run's ``cpu_split``, which together make the whole machine's busy time."""


def cpu_split_rows(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The 'where the CPU went' table: ms per terminal delivery by process group, and % of all cores busy."""
    rows = []
    for label, r in runs:
        split = r.get("cpu_split")
        if split:
            parts = [split[k] for k in CPU_PARTS]
            rows.append(_row([label, *parts, f"{split['machine_busy_pct']} %"]))
    return [] if not rows else [CPU_HEAD, *rows]


GC_HEAD = (
    "| variant | collections (gen 0/1/2) | ms (gen 0/1/2) | ms/delivery | share of the service's CPU |\n|"
    + " --- |" * 5
)


def gc_rows(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The garbage collector's part of the service's CPU in each run probed with ``--gc-probe``."""
    rows = []
    for label, r in runs:
        spent = r.get("gc")
        if spent:
            count, ms = spent["collections"], spent["ms_by_generation"]
            share = spent["share_of_service_cpu_pct"]
            cells = ["/".join(map(str, count)), "/".join(map(str, ms)), spent["ms_per_delivery"], f"{share} %"]
            rows.append(_row([label, *cells]))
    return [] if not rows else [GC_HEAD, *rows]


def dispatch_shape(options: dict[str, Any]) -> str:
    """Where notifier's local dispatcher ran, for the report's header."""
    processes = options.get("dispatch_processes", 0)  # reports from before the option have none
    if not processes:
        return "local dispatcher inside the API process"
    nice = options.get("worker_nice", 0)
    return (
        f"local dispatcher in {processes} `notifier worker` process(es) beside the API "
        f"(NOTIFIER_EMBEDDED_DISPATCHER=false{f', under nice -n {nice}' if nice else ''}; "
        "peak RSS and CPU include them)"
    )


def notifier_label(options: dict[str, Any]) -> str:
    processes = options.get("dispatch_processes", 0)
    return f"notifier (API + {processes} dispatch processes)" if processes else "notifier (local dispatcher)"


def _vacuum_note(env: dict[str, Any], options: dict[str, Any]) -> str:
    if env.get("autovacuum", True):  # reports from before the option have none
        return ""
    every = options.get("vacuum_every", 0)
    if not every:
        return " PostgreSQL's autovacuum is off and nothing stood in for it."
    return f" PostgreSQL's autovacuum is off: the bench ran VACUUM (ANALYZE) of the run's tables every {every:g} s."


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    options = report["options"]
    lines = [
        f"# notifier bench — {report['started']}",
        "",
        f"Machine: {env['cpus']} CPUs; load average before {env['load_before']}, after {env['load_after']}. "
        f"Concurrency {options['concurrency']} (dispatcher workers = raw senders = BullMQ concurrency), "
        f"{options['workers']} uvicorn worker process(es), {dispatch_shape(options)}, "
        f"{options['connections']} client connections.{_vacuum_note(env, options)}",
        "",
    ]
    headline = report.get("headline")
    if headline:
        lines += [f"## Headline ({headline['scale']}x load)", "", RUN_HEAD]
        lines.append(run_row(notifier_label(options), headline["notifier"]))
        if headline.get("raw"):
            lines.append(run_row("raw baseline", headline["raw"]))
            r = headline["ratios"]
            first = ["**notifier / raw**", "", "", r["ingest_events_per_s"], r["deliveries_per_s"], "", ""]
            last = [r["e2e_p99_ms"], "", r["peak_rss_mb"], r["cpu_ms_per_delivery"], "", "", ""]
            lines.append(_row([*first, *last]))
        qstash = report.get("qstash")
        if qstash and "skipped" not in qstash:
            lines.append(run_row("notifier (QStash emulator)", qstash))
        for key, label, ratio_label in (
            ("bullmq", "BullMQ worker (Node + Redis)", "**notifier / BullMQ**"),
            ("bullmq_pg", "BullMQ + PostgreSQL tracking", "**notifier / BullMQ + PostgreSQL**"),
        ):
            bull = report.get(key) or {}
            if bull and "skipped" not in bull:
                lines.append(bullmq_row(label, bull))
                cells = [ratio_label, "", "", "", report["ratios"].get(f"deliveries_vs_{key}")]
                lines.append(_row([*cells, *[""] * 9]))
        lines.append("")
        fan_out = workload_rows(headline["notifier"])
        if fan_out:
            lines += [
                "Fan-out of the headline workload (notifier's plan; deliveries of every status per event, and",
                "those queued to be sent; the raw baseline plans the same, the BullMQ variants get the queued ones):",
                "",
                *fan_out,
                "",
            ]
        runs = [(notifier_label(options), headline["notifier"]), ("raw baseline", headline.get("raw") or {})]
        split = cpu_split_rows([*runs, ("notifier (QStash emulator)", report.get("qstash") or {})])
        if split:
            lines += [
                "Where the CPU went (ms per delivery, by process group, over the same runs; the machine's",
                "busy share is of all its cores; other = everything else on the machine):",
                "",
                *split,
                "",
            ]
        collector = gc_rows([*runs, ("notifier (QStash emulator)", report.get("qstash") or {})])
        if collector:
            untuned = " (`--gc-untuned`: notifier's tuning off)" if options.get("gc_untuned") else ""
            lines += [f"The garbage collector in the service's processes{untuned}:", "", *collector, ""]
        for name in ("qstash", "bullmq", "bullmq_pg"):
            part = report.get(name) or {}
            if "skipped" in part:
                lines += [f"{name}: skipped — {part['skipped']}", ""]
    half = report.get("half_rate")
    if half:
        acc, e2e = half["accept_latency"], half["e2e_latency"]
        lines += [
            "## Latency at half the maximum rate",
            "",
            f"Open loop at {half['offered_rate']:.1f} events/s (half of notifier's sustained end-to-end rate). "
            f"Accept latency (POST /v1/events answered): p50 {_fmt(acc['p50_ms'])}, p95 {_fmt(acc['p95_ms'])}, "
            f"p99 {_fmt(acc['p99_ms'])} ms. Accept → provider receipt: p50 {_fmt(e2e['p50_ms'])}, "
            f"p95 {_fmt(e2e['p95_ms'])}, p99 {_fmt(e2e['p99_ms'])} ms.",
            "",
        ]
    if report.get("scaling"):
        lines += [
            "## Scaling (notifier, with the raw baseline's deliveries/s at the same load)",
            "",
            "| load | events | users | deliveries | ingest ev/s | deliveries/s | e2e p99 ms | CPU ms/delivery "
            "| peak RSS MB | raw deliveries/s | notifier/raw |\n|" + " --- |" * 11,
        ]
        for row in report["scaling"]:
            n, raw = row["notifier"], row.get("raw") or {}
            terminal = n["by_status"].get("sent", 0) + n["by_status"].get("failed", 0)
            lines.append(
                _row(
                    [
                        f"{row['scale']}x",
                        n["accepted"],
                        row["users"],
                        terminal,
                        n["ingest_events_per_s"],
                        n["deliveries_per_s"],
                        n["e2e_latency"]["p99_ms"],
                        n["cpu_ms_per_delivery"],
                        n["peak_rss_mb"],
                        raw.get("deliveries_per_s"),
                        ratio(n["deliveries_per_s"], raw.get("deliveries_per_s")),
                    ]
                )
            )
        lines.append("")
    soak = report.get("soak")
    if soak:
        lines += [
            "## Soak",
            "",
            f"{soak['deliveries']:,} deliveries in {soak['seconds']:.0f} s at {soak['offered_rate']:.1f} events/s; "
            f"RSS after warm-up {soak['rss_warm_mb']} MB, at the end {soak['rss_end_mb']} MB, peak "
            f"{soak['rss_peak_mb']} MB: growth {soak['rss_growth_pct']}%.",
            "",
        ]
    lines += ["## Targets", "", "| target | value | threshold | met |", "| --- | --- | --- | --- |"]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(_row([t["description"], t["value"], t["threshold"], met]))
    lines.append("")
    return "\n".join(lines)
