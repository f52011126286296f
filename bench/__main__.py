"""``./dev bench [options]``: run the benchmark (see bench/README.md)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from bench.compare import compare
from bench.harness import RESULTS, Options, Run
from bench.ingest_alone import ingest_alone, write


def _scales(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def build_parser(defaults: Options) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="./dev bench", description="notifier vs a raw baseline vs BullMQ (plain and + PostgreSQL), one run."
    )
    parser.add_argument(
        "--events", type=int, default=defaults.base_events, help="events at 1x load (default %(default)s)"
    )
    parser.add_argument("--users", type=int, default=defaults.base_users, help="users at 1x load (default %(default)s)")
    parser.add_argument(
        "--scales",
        type=_scales,
        default=defaults.scales,
        help=f"loads to run, e.g. 1,4 (default {','.join(map(str, defaults.scales))})",
    )
    parser.add_argument(
        "--headline",
        type=int,
        default=defaults.headline,
        help="the load compared with the baselines (default %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=defaults.concurrency,
        help="deliveries in flight: notifier's NOTIFIER_WORKERS, the raw senders, BullMQ's concurrency "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--connections", type=int, default=defaults.connections, help="load-generator connections (default %(default)s)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="uvicorn worker processes (and BullMQ processes; default %(default)s)",
    )
    parser.add_argument(
        "--dispatch-processes",
        type=int,
        default=defaults.dispatch_processes,
        help="run notifier's local dispatcher in N `notifier worker` processes beside the API "
        "(NOTIFIER_EMBEDDED_DISPATCHER=false; they share --concurrency; default: one per core beside the API's, "
        "1 to 4, "
        "%(default)s here); 0: inside the API process",
    )
    parser.add_argument(
        "--worker-nice",
        type=int,
        default=defaults.worker_nice,
        help="nice level of the `notifier worker` processes (default %(default)s: ingest keeps priority over "
        "sending, as the README advises on one host); 0: the same priority as the API",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the generated users and events (default %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="1x load only, no half-rate run (a fast check)")
    parser.add_argument("--no-raw", dest="raw", action="store_false", help="skip the raw baseline")
    parser.add_argument(
        "--no-bullmq", dest="bullmq", action="store_false", help="skip the BullMQ baselines (plain and + PostgreSQL)"
    )
    parser.add_argument("--no-qstash", dest="qstash", action="store_false", help="skip the QStash-emulator variant")
    parser.add_argument("--no-half-rate", dest="half_rate", action="store_false", help="skip the half-rate latency run")
    parser.add_argument("--profile", action="store_true", help="py-spy the headline notifier run (needs py-spy)")
    parser.add_argument(
        "--gc-probe",
        action="store_true",
        help="log every garbage collection of the bench's Python processes and report the collector's CPU in "
        "the service per run (bench/gcprobe.py)",
    )
    parser.add_argument(
        "--gc-untuned",
        action="store_true",
        help="with --gc-probe: keep notifier from tuning its collector (notifier/heap.py), to measure it without",
    )
    parser.add_argument("--soak", action="store_true", help="run the soak instead: RSS over >= --soak-deliveries")
    parser.add_argument(
        "--ingest-alone",
        type=int,
        nargs="?",
        const=3,
        default=0,
        metavar="ROUNDS",
        help="run ROUNDS (default 3) of ingest alone instead: notifier's API without workers and the raw baseline "
        "taking turns at the headline load's events (bench/ingest_alone.py)",
    )
    parser.add_argument(
        "--compare",
        metavar="REV",
        help="A/B instead: --pairs alternating runs (with the other options given) of git revision REV, checked "
        "out aside, and of this checkout; per-pair changes of the main figures (bench/compare.py)",
    )
    parser.add_argument(
        "--pairs", type=int, default=defaults.pairs, help="pairs of runs --compare makes (default %(default)s)"
    )
    parser.add_argument(
        "--soak-deliveries",
        type=int,
        default=defaults.soak_deliveries,
        help="deliveries a soak runs (default %(default)s)",
    )
    parser.add_argument(
        "--soak-rate",
        type=float,
        default=defaults.soak_rate_fraction,
        help="soak rate as a fraction of the calibrated sustained rate (default %(default)s)",
    )
    parser.add_argument(
        "--soak-events-per-s", type=float, help="soak at this many events/s instead of a fraction of the calibration"
    )
    parser.add_argument(
        "--log-level", default=defaults.log_level, help="notifier's NOTIFIER_LOG_LEVEL (default %(default)s)"
    )
    parser.add_argument(
        "--experiment", choices=["no-pre-ping"], help="run notifier with a candidate fix outside bench/ patched in"
    )
    parser.add_argument(
        "--vacuum-every",
        type=float,
        default=defaults.vacuum_every,
        help="when the server's autovacuum is off, VACUUM (ANALYZE) the run's tables every N seconds during each "
        "run, as autovacuum would in production (default %(default)s; 0: never)",
    )
    parser.add_argument(
        "--stats-wait",
        type=float,
        default=defaults.stats_wait,
        help="seconds to let PostgreSQL publish transaction counts after a run (default %(default)s; 0: the "
        "transactions per delivery read low)",
    )
    parser.add_argument("--keep-databases", action="store_true", help="keep the bench databases for inspection")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where reports go (default bench/results)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=defaults.timeout,
        help="seconds one measured run may take (default %(default)s)",
    )
    return parser


def parse(argv: list[str]) -> Options:
    parser = build_parser(Options())
    args = parser.parse_args(argv)
    if args.dispatch_processes < 0 or args.dispatch_processes > args.concurrency:
        parser.error("--dispatch-processes must be between 0 and --concurrency (which they share)")
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    scales = (1,) if args.quick else args.scales
    headline = args.headline if args.headline in scales else scales[-1]
    return Options(
        base_events=args.events,
        base_users=args.users,
        scales=scales,
        headline=headline,
        concurrency=args.concurrency,
        connections=args.connections,
        workers=args.workers,
        dispatch_processes=args.dispatch_processes,
        worker_nice=args.worker_nice,
        seed=args.seed,
        raw=args.raw,
        bullmq=args.bullmq,
        qstash=args.qstash,
        half_rate=args.half_rate and not args.quick,
        profile=args.profile,
        gc_probe=args.gc_probe or args.gc_untuned,
        gc_untuned=args.gc_untuned,
        soak=args.soak,
        ingest_alone=args.ingest_alone,
        compare=args.compare,
        pairs=args.pairs,
        soak_deliveries=args.soak_deliveries,
        soak_rate_fraction=args.soak_rate,
        soak_rate=args.soak_events_per_s,
        log_level=args.log_level,
        experiment=args.experiment,
        keep_databases=args.keep_databases,
        vacuum_every=args.vacuum_every,
        results=args.results,
        timeout=args.timeout,
        stats_wait=args.stats_wait,
    )


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options = parse(argv)
    # SIGTERM (and SIGINT, which a shell may have ignored for a background job) stop the run cleanly:
    # the child processes are stopped and the bench databases dropped.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if options.compare:
        return compare(options.compare, options.pairs, argv, options.results)
    run = Run(options)
    if options.ingest_alone:
        write(run, ingest_alone(run, options.ingest_alone))
        return 0
    report = run.soak() if options.soak else run.main()
    return 0 if report else 1


if __name__ == "__main__":
    sys.exit(main())
