"""The live dashboard: a static page served by the admin server at ``/dashboard/``.

The page (``index.html``, ``app.js``, ``style.css`` in this package, no asset from the
internet) polls the admin API's JSON endpoints every 2 s and derives rates from the counters
between two polls. It holds no data itself: ``/status`` and ``/devices`` are unguarded (the
admin server binds loopback by default), ``/drops`` and ``/dead-letters`` need the admin
token, which the page reads from its URL fragment (``#token=...``, printed by
``tidegate dashboard``). A fragment is never sent to a server, so the token stays out of
request lines and logs; without it the page shows the counts and says how to get the lists.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

__all__ = ["ASSETS", "add_dashboard_routes"]

ASSETS = {
    "index.html": "text/html",
    "app.js": "application/javascript",
    "style.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
"""Every file the page needs, with its content type: nothing else is served."""

# Same-origin only: the page may load its own files and talk to its own admin server.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_dashboard_routes(app: web.Application) -> None:
    """``/`` and ``/dashboard`` redirect to ``/dashboard/``; the page's files below it."""
    files = {name: resources.files(__name__).joinpath(name).read_bytes() for name in ASSETS}

    async def redirect(_request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/dashboard/")

    async def redirect_icon(_request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/dashboard/favicon.svg")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info.get("name") or "index.html"
        body = files.get(name)
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, content_type=ASSETS[name], headers=_HEADERS)

    app.router.add_get("/favicon.ico", redirect_icon)
    app.router.add_get("/", redirect)
    app.router.add_get("/dashboard", redirect)
    app.router.add_get("/dashboard/", asset)
    app.router.add_get("/dashboard/{name}", asset)
