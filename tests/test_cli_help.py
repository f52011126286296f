"""What the commands say about themselves: every option's help names its default; ./dev's help is its comment."""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.__main__ import build_parser as bench_parser
from bench.harness import Options
from notifier.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def parsers(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield from parsers(sub, f"{name} {command}")


def shown(default: object) -> set[str]:
    """How a default may read in help text: as argparse prints it, a tuple as 1,4,16, a path inside the checkout
    relative to it."""
    forms = {str(default)}
    if isinstance(default, tuple):
        forms.add(",".join(map(str, default)))
    if isinstance(default, Path) and default.is_relative_to(ROOT):
        forms.add(str(default.relative_to(ROOT)))
    return forms


@pytest.mark.parametrize(
    ("name", "parser"),
    [*parsers(build_parser(), "notifier"), *parsers(bench_parser(Options()), "./dev bench")],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_every_option_with_a_default_says_what_it_is(name: str, parser: argparse.ArgumentParser) -> None:
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings[0]} has no help text"
        if not action.default or isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            continue  # off by default (None, 0, a flag): the help says what turning it on does
        text = formatter._expand_help(action)
        assert any(form in text for form in shown(action.default)), (
            f"{name} {action.option_strings[0]}: {text!r} does not name its default {action.default!r}"
        )


def test_serve_help_shows_where_it_listens() -> None:
    # The real command, as a user types it.
    result = subprocess.run(
        [sys.executable, "-m", "notifier.cli", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "(default: 127.0.0.1;" in text
    assert "(default: 8000)" in text


def test_dev_help_is_the_scripts_header_comment_and_nothing_else() -> None:
    after_shebang = (ROOT / "dev").read_text().splitlines()[1:]
    header = [line[1:].removeprefix(" ") for line in itertools.takewhile(lambda x: x.startswith("#"), after_shebang)]
    assert len(header) >= 5
    result = subprocess.run([str(ROOT / "dev"), "help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == header
    assert "set -euo pipefail" not in result.stdout
    unknown = subprocess.run([str(ROOT / "dev"), "no-such-command"], capture_output=True, text=True, timeout=30)
    assert unknown.returncode == 2
    assert unknown.stdout.splitlines() == header
