"""The bench's py-spy command line: its switches read as a user means them (``0`` is off)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.profile import py_spy_command


@pytest.mark.parametrize(
    ("native", "expected"),
    [
        (None, "--nonblocking"),
        ("", "--nonblocking"),
        ("0", "--nonblocking"),
        ("false", "--nonblocking"),
        ("1", "--native"),
    ],
)
def test_native_frames_only_when_switched_on(
    monkeypatch: pytest.MonkeyPatch, native: str | None, expected: str
) -> None:
    monkeypatch.delenv("BENCH_PYSPY_ALL_THREADS", raising=False)
    if native is None:
        monkeypatch.delenv("BENCH_PYSPY_NATIVE", raising=False)
    else:
        monkeypatch.setenv("BENCH_PYSPY_NATIVE", native)
    command = py_spy_command("py-spy", 42, Path("out.txt"), rate=200)
    assert expected in command
    assert "--gil" in command
    assert ("--native" in command) != ("--nonblocking" in command)


def test_all_threads_drops_the_gil_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_PYSPY_ALL_THREADS", "1")
    assert "--gil" not in py_spy_command("py-spy", 42, Path("out.txt"), rate=200)
    monkeypatch.setenv("BENCH_PYSPY_ALL_THREADS", "0")
    assert "--gil" in py_spy_command("py-spy", 42, Path("out.txt"), rate=200)
