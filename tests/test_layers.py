"""The package's dependencies point one way: each part may import only the parts listed for it below.

A part is a top-level module or subpackage of ``notifier``. Imports under ``if TYPE_CHECKING:`` count too,
except that any part may name ``config.Settings`` there (channels build themselves ``from_settings``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "notifier"
LEAVES = {"types", "errors", "config", "logs", "metrics", "batching", "heap"}
# part -> the parts it may import (besides itself and the leaves). Read top to bottom: higher parts use lower ones.
ALLOWED: dict[str, set[str]] = {
    "app": {"*"},
    "cli": {"*"},
    "asgi": {"app"},
    "testsend": {"app", "channels", "db", "delivery"},
    "api": {
        "runtime",
        "ingest",
        "delivery",
        "dispatch",
        "db",
        "channels",
        "catalog",
        "preferences",
        "routing",
        "security",
    },
    "runtime": {"ingest", "delivery", "dispatch", "channels", "catalog", "security"},
    "dispatch": {"delivery", "db", "channels"},
    "ingest": {"delivery", "db", "channels", "catalog", "preferences", "routing"},
    "delivery": {"db", "channels", "catalog", "preferences", "routing"},
    "routing": {"catalog", "preferences"},
    "preferences": {"catalog"},
    "catalog": set(),
    "channels": set(),
    "db": set(),
    "security": set(),
    "migrations": {"db"},
    **{leaf: set() for leaf in LEAVES},
}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "notifier" and len(parts) > 1 else None


def _imports(path: Path) -> Iterator[tuple[str, bool]]:
    """(imported module, whether under ``if TYPE_CHECKING:``) for every notifier import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    checking: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            checking.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] if node.module == "notifier" else []
            for module in names or [node.module]:
                yield module, id(node) in checking
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in checking


def _modules() -> list[Path]:
    paths = sorted(PACKAGE.rglob("*.py"))
    migrations = PACKAGE.parent / "migrations"
    return paths + sorted(migrations.rglob("*.py"))


def _owner(path: Path) -> str:
    if path.is_relative_to(PACKAGE.parent / "migrations"):
        return "migrations"
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_every_part_is_placed() -> None:
    parts = {_owner(path) for path in _modules()} - {"__init__"}
    assert parts <= set(ALLOWED), f"parts without a place in ALLOWED: {sorted(parts - set(ALLOWED))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda path: str(path.relative_to(PACKAGE.parent)))
def test_imports_point_down(path: Path) -> None:
    owner = _owner(path)
    allowed = ALLOWED.get(owner, set())
    wrong = []
    for module, type_checking in _imports(path):
        target = _part(module)
        if target is None or target == owner or target in LEAVES or "*" in allowed or target in allowed:
            continue
        if type_checking and module == "notifier.config":
            continue
        wrong.append(module)
    assert not wrong, f"{owner} may not import {wrong} (allowed: {sorted(allowed | LEAVES)})"
