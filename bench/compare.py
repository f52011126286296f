"""A/B: this checkout against another revision, in alternating pairs of bench runs.

On a shared machine one run's figures swing by a fifth or more from hour to hour, more than most changes
move them, so two revisions are told apart only by runs taken side by side. ``./dev bench --compare REV
--pairs N [bench options]`` checks REV out with ``git worktree`` (its own ``.venv``, made by its ``./dev``),
then runs the bench N times on each side, alternating which side goes first in each pair so neither always
runs on the warmer or the quieter machine. Each run is an ordinary bench run with the same options, reported
in ``<results>/compare-<time>/{base,head}-<i>/``; ``compare.md`` and ``compare.json`` there give, per figure,
both sides' values in every pair, each pair's change and the median change, and in how many pairs the
head (this checkout, uncommitted changes included) came out better.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import procs, report
from bench.harness import say

Report = dict[str, Any]


def _whole_machine(run: Report) -> float | None:
    split = run.get("cpu_split")
    return round(float(sum(split.get(part, 0.0) for part in report.CPU_PARTS)), 3) if split else None


def _qstash(whole: Report) -> Report | None:
    qstash = whole.get("qstash")
    return qstash if qstash and "skipped" not in qstash else None


def _per_raw(run: Report | None, whole: Report) -> float | None:
    raw = (whole.get("headline") or {}).get("raw") or {}
    return report.ratio((run or {}).get("cpu_ms_per_delivery"), raw.get("cpu_ms_per_delivery"))


# figure, how it is read from a report, whether lower is better
FIGURES: tuple[tuple[str, Callable[[Report], float | None], bool], ...] = (
    ("service CPU ms/delivery, local", lambda r: r["headline"]["notifier"]["cpu_ms_per_delivery"], True),
    ("raw baseline CPU ms/delivery", lambda r: (r["headline"].get("raw") or {}).get("cpu_ms_per_delivery"), True),
    ("local CPU / raw", lambda r: _per_raw(r["headline"]["notifier"], r), True),
    ("deliveries/s / raw", lambda r: r["headline"].get("ratios", {}).get("deliveries_per_s"), False),
    ("ingest events/s / raw", lambda r: r["headline"].get("ratios", {}).get("ingest_events_per_s"), False),
    ("service CPU ms/delivery, QStash", lambda r: (_qstash(r) or {}).get("cpu_ms_per_delivery"), True),
    ("QStash CPU / raw", lambda r: _per_raw(_qstash(r), r), True),
    ("whole machine CPU ms/delivery, local", lambda r: _whole_machine(r["headline"]["notifier"]), True),
    ("whole machine CPU ms/delivery, QStash", lambda r: _whole_machine(_qstash(r) or {}), True),
    ("DB xacts/delivery, local", lambda r: r["headline"]["notifier"].get("db_xacts_per_delivery"), True),
    ("DB xacts/delivery, QStash", lambda r: (_qstash(r) or {}).get("db_xacts_per_delivery"), True),
)


def summarize(pairs: Sequence[tuple[Report, Report]]) -> list[dict[str, Any]]:
    """Per figure: base and head values per pair, each pair's change (head / base - 1) and their median, and in
    how many pairs the head was better; figures no pair measured on both sides are left out."""
    rows = []
    for name, read, lower_is_better in FIGURES:
        base, head, changes, better = [], [], [], 0
        for base_report, head_report in pairs:
            b, h = read(base_report), read(head_report)
            base.append(b)
            head.append(h)
            if b and h is not None:
                changes.append(h / b - 1)
                better += (h < b) if lower_is_better else (h > b)
        if changes:
            rows.append(
                {
                    "figure": name,
                    "base": base,
                    "head": head,
                    "changes_pct": [round(c * 100, 1) for c in changes],
                    "median_change_pct": round(statistics.median(changes) * 100, 1),
                    "head_better": better,
                    "pairs": len(changes),
                    "lower_is_better": lower_is_better,
                }
            )
    return rows


def markdown(base: str, head: str, rows: Sequence[dict[str, Any]], times: Sequence[str]) -> str:
    def values(vs: Sequence[float | None]) -> str:
        return ", ".join("—" if v is None else f"{v:g}" for v in vs)

    lines = [
        f"# A/B: base `{base}` against head `{head}`, {len(times)} runs in alternating pairs",
        "",
        f"Runs started (UTC): {', '.join(times)}. Change = head / base - 1 within each pair.",
        "",
        "| figure | base | head | change per pair | median change | head better in |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        changes = ", ".join(f"{c:+.1f} %" for c in row["changes_pct"])
        direction = "lower" if row["lower_is_better"] else "higher"
        lines.append(
            f"| {row['figure']} | {values(row['base'])} | {values(row['head'])} | {changes} "
            f"| {row['median_change_pct']:+.1f} % | {row['head_better']} of {row['pairs']} ({direction}) |"
        )
    return "\n".join(lines) + "\n"


def bench_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without the options this module consumes (``--compare``, ``--pairs``, ``--results``)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--compare", "--pairs", "--results"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=procs.REPO, check=True, capture_output=True, text=True).stdout.strip()


def compare(
    revision: str, pairs: int, argv: Sequence[str], results: Path, *, base_command: Sequence[str] | None = None
) -> int:
    """Run the A/B and write its report; 0 if every run finished.

    ``base_command``: how the base checkout's bench is started in its directory (default its ``./dev bench``,
    which makes that checkout's own virtualenv first).
    """
    base_sha = _git("rev-parse", "--verify", f"{revision}^{{commit}}")
    dirty = " + uncommitted changes" if _git("status", "--porcelain", "--untracked-files=no") else ""
    head = f"{_git('rev-parse', '--short=12', 'HEAD')}{dirty}"
    # Absolute: the base side runs in its checkout, where a path relative to ours would name another directory.
    out = results.resolve() / f"compare-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}"
    checkout = out / "base-checkout"
    out.mkdir(parents=True)
    _git("worktree", "add", "--detach", str(checkout), base_sha)
    args = bench_argv(argv)
    reports: dict[str, list[Report]] = {"base": [], "head": []}
    times: list[str] = []
    try:
        for i in range(1, pairs + 1):
            for side in ("base", "head") if i % 2 else ("head", "base"):
                run_dir = out / f"{side}-{i}"
                base = list(base_command or [str(checkout / "dev"), "bench"])
                command = base if side == "base" else [sys.executable, "-m", "bench"]
                times.append(f"{dt.datetime.now(dt.UTC):%H:%M} {side}")
                say(f"pair {i} of {pairs}: {side}")
                log_path = out / f"{side}-{i}.log"
                with log_path.open("w") as log:
                    finished = subprocess.run(
                        [*command, *args, "--results", str(run_dir)],
                        cwd=checkout if side == "base" else procs.REPO,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                if finished.returncode != 0 or not (run_dir / "report.json").exists():
                    say(f"the {side} run of pair {i} failed (exit {finished.returncode}); its output: {log_path}")
                    return 1
                reports[side].append(json.loads((run_dir / "report.json").read_text()))
    finally:
        _git("worktree", "remove", "--force", str(checkout))
    rows = summarize(list(zip(reports["base"], reports["head"], strict=True)))
    text = markdown(base_sha[:12], head, rows, times)
    (out / "compare.json").write_text(json.dumps({"base": base_sha, "head": head, "times": times, "figures": rows}))
    (out / "compare.md").write_text(text)
    print(text)
    say(f"results in {out}")
    return 0
