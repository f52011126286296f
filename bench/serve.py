"""notifier as ``notifier serve`` builds it, as a uvicorn factory so the bench can pass ``--workers N``.

``uvicorn bench.serve:notifier_app --factory`` = ``Settings()`` from the environment, JSON logging,
``create_app(settings)``: exactly what the CLI serves, nothing added.
"""

from __future__ import annotations

from starlette.applications import Starlette

from notifier.app import create_app
from notifier.config import Settings
from notifier.logs import configure_logging


def notifier_app() -> Starlette:
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)


def notifier_app_experiment() -> Starlette:
    """``notifier_app`` with the connection pool's pre-ping off: measures a recommended change to notifier/db.py.

    Every pool checkout pings with three round trips (BEGIN; SELECT; ROLLBACK on asyncpg) and an in-app
    delivery checks out three connections. Used by ``./dev bench --experiment no-pre-ping`` only.
    """
    from typing import Any

    from notifier import db

    original = db.create_async_engine

    def without_pre_ping(url: str, **kwargs: Any) -> Any:
        return original(url, **{**kwargs, "pool_pre_ping": False})

    db.create_async_engine = without_pre_ping  # type: ignore[assignment]
    return notifier_app()
