"""The serverless entry point: point the runtime at ``notifier.asgi:app``.

The runtime imports this module and reads ``app``; the first read builds it from the environment
(PEP 562 ``__getattr__``), so importing the module alone reads nothing. Building only declares
routes: the engine, HTTP clients and channels are made by the ASGI lifespan, which the runtime
must run (most adapters do, e.g. Mangum with ``lifespan="auto"``).

QStash mode is required here: a serverless function is frozen or discarded between requests, so
the local dispatcher's background workers cannot run. In QStash mode the app starts no background
task at all -- every piece of work happens inside a request that QStash (or a caller) makes.
"""

from __future__ import annotations

from starlette.applications import Starlette

from notifier.app import create_app, preflight
from notifier.config import Settings, load_settings


def build_app(settings: Settings | None = None) -> Starlette:
    """Return the ASGI app for a serverless runtime; raise ``ConfigurationError`` unless QStash mode can work."""
    settings = settings if settings is not None else load_settings()
    preflight(settings, "serverless")
    return create_app(settings)


def __getattr__(name: str) -> Starlette:
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app = build_app()
    globals()["app"] = app  # later reads find the module attribute and never come here again
    return app
