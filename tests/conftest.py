"""Fixtures shared by the whole suite. Provider fakes register their fixtures as plugins."""

from __future__ import annotations

pytest_plugins = [
    "tests.fakes.onesignal",
    "tests.fakes.knock",
    "tests.fakes.smtp",
    "tests.fakes.ably",
    "tests.fakes.qstash",
]
