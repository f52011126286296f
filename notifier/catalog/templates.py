"""Sandboxed Jinja2 rendering: strict (a missing variable is an error), HTML autoescaped only for HTML."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from notifier.errors import TemplateError

_TEXT = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)
_HTML = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=True)


@lru_cache(maxsize=1024)
def _compile(source: str, html: bool) -> jinja2.Template:
    return (_HTML if html else _TEXT).from_string(source)


def compile_template(source: str, *, html: bool = False) -> None:
    """Check that ``source`` parses; raise ``TemplateError`` naming the syntax problem."""
    try:
        _compile(source, html)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error at line {exc.lineno}: {exc.message}") from exc


@lru_cache(maxsize=1024)
def variables(source: str) -> frozenset[str]:
    """The names ``source`` reads from its context (``{{ title }}``, ``{% if x %}``): the data fields it shows."""
    return frozenset(jinja2.meta.find_undeclared_variables(_TEXT.parse(source)))


def render(source: str, context: Mapping[str, Any], *, html: bool = False) -> str:
    """Return ``source`` rendered with ``context``; raise ``TemplateError`` on any failure.

    Values from ``context`` are inserted literally: a value that looks like a template is never
    rendered again.
    """
    try:
        return _compile(source, html).render(context)
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"missing template variable: {exc.message}") from exc
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateError(f"template refused by the sandbox: {exc}") from exc
    except jinja2.TemplateError as exc:
        raise TemplateError(f"template failed: {exc}") from exc
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise TemplateError(f"template failed: {type(exc).__name__}: {exc}") from exc
