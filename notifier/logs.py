"""Structured JSON logs: one object per line, with request/event/delivery ids when known."""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
import traceback
from typing import Any

import orjson
from sqlalchemy import exc as sa_exc

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else passed through ``extra=`` is emitted as a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            payload["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info and record.levelno >= logging.ERROR:
            payload["error"] = error_text(record.exc_info[0], record.exc_info[1])
        try:
            # orjson: a tenth of json.dumps' cost, and every transition and request writes a line.
            return orjson.dumps(payload, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except (TypeError, orjson.JSONEncodeError):  # e.g. an int beyond 64 bits
            return json.dumps(payload, default=str, ensure_ascii=False)


def error_text(kind: type[BaseException] | None, value: BaseException | None) -> str:
    """What a log line says about an exception: its class and the first line of its message (a database error's
    later lines are the statement and a link), or, for a database error, its classes and codes alone."""
    if isinstance(value, sa_exc.StatementError):
        return _database_error(value)
    return "".join(traceback.format_exception_only(kind, value)).strip().splitlines()[0]


def _qualified(kind: type[BaseException]) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _database_error(exc: sa_exc.StatementError) -> str:
    """A database error without its message: that quotes the driver's, which may quote a bound value (asyncpg's
    "invalid input for query argument $2: '...'", a trigger's RAISE) whatever ``hide_parameters`` hides."""
    orig = exc.orig
    # Under SQLAlchemy's asyncpg adapter, the driver's own exception is the adapter error's cause.
    driver = orig.__cause__ if orig is not None and orig.__cause__ is not None else orig
    parts = [_qualified(type(driver))] if driver is not None else []
    if isinstance(sqlstate := getattr(orig, "sqlstate", None), str):  # PostgreSQL
        parts.append(f"SQLSTATE {sqlstate}")
    if isinstance(name := getattr(orig, "sqlite_errorname", None), str):  # SQLite: SQLITE_CONSTRAINT_TRIGGER ...
        parts.append(name)
    if exc.code:
        parts.append(f"sqlalchemy code {exc.code}")
    return f"{_qualified(type(exc))}: {', '.join(parts)} (message not logged: it may quote the statement's values)"


def configure_logging(level: str = "INFO") -> None:
    """Send notifier's and uvicorn's logs to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The JSON lines name no thread, process or source line, so records need not gather them: skipping the
    # caller's frame look-up and the rest (the logging HOWTO's "Optimization") cuts a line's cost by a fifth,
    # and every delivery writes three or more. Process-wide, as the handler above is.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # uvicorn's access log duplicates our request log line (which carries the request id).
    logging.getLogger("uvicorn.access").disabled = True
    for noisy in ("httpx", "httpcore", "aiosqlite", "asyncio", "ably", "urllib3", "knockapi"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
