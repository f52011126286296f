"""The preference center page and the static files it loads.

The page is the same for everyone and needs no server-side auth: the user's token travels in the
URL fragment (``/preferences#token=<jwt>``), which browsers never send to a server, and the page's
script calls the REST API with ``Authorization: Bearer``. Headers lock the page down: scripts and
styles only from this origin (no inline code), no referrer, no framing, no caching.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import jinja2
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response

from notifier.api.common import ApiRoute
from notifier.errors import NotFound

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
STATIC_DIR = WEB_DIR / "static"
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


@functools.cache
def templates() -> jinja2.Environment:
    # Built on first use, not at import; the templates ship with the package and never change while running.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(WEB_DIR / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )


@functools.cache
def static_files() -> dict[str, tuple[Path, str]]:
    """Servable static files by name, with a short content hash for cache-busting URLs."""
    files = {}
    for path in sorted(STATIC_DIR.iterdir()):
        if path.is_file() and path.suffix in MEDIA_TYPES:
            files[path.name] = (path, hashlib.sha256(path.read_bytes()).hexdigest()[:12])
    return files


def static_url(name: str) -> str:
    """The URL of static file ``name``, versioned by its content so it can be cached for long."""
    return f"/web/static/{name}?v={static_files()[name][1]}"


async def preference_center(request: Request) -> Response:
    html = templates().get_template("preferences.html").render(static_url=static_url)
    return HTMLResponse(html, headers=PAGE_HEADERS)


async def static_file(request: Request) -> Response:
    name: str = request.path_params["name"]
    entry = static_files().get(name)
    if entry is None:
        raise NotFound(f"static file '{name}' not found")
    path, digest = entry
    versioned = request.query_params.get("v") == digest
    cache = "public, max-age=31536000, immutable" if versioned else "no-cache"
    return FileResponse(
        path, media_type=MEDIA_TYPES[path.suffix], headers={"Cache-Control": cache, "X-Content-Type-Options": "nosniff"}
    )


ROUTES = [
    ApiRoute(
        "GET",
        "/preferences",
        preference_center,
        "The preference center page (open as /preferences#token=<user JWT>)",
        "none",
        responses={200: "HTML"},
        tag="pages",
        response_types=("text/html",),
    ),
    ApiRoute(
        "GET",
        "/web/static/{name}",
        static_file,
        "Scripts and styles of the pages",
        "none",
        responses={200: "A file", 404: "No such file"},
        tag="pages",
        response_types=tuple(sorted({media.split(";")[0] for media in MEDIA_TYPES.values()})),
    ),
]
