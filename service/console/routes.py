"""Where the console is served, and how (docs/reference.md §10); mounted by `create_app(..., pages=...)`.

    GET /ui                      308 to `ui/`
    GET /ui/                     index.html, never cached (it names the assets' version)
    GET /ui/v/{version}/{name}   app.js, app.css and the other assets: cached for a year when
                                 `version` is the current one (it changes with their content)
    GET /ui/{name}               the same files unversioned (`/ui/app.js`), never cached

Every answer carries a Content-Security-Policy that allows only this origin's scripts, styles
and connections (no inline script, no other origin), with `X-Content-Type-Options: nosniff`
and `Referrer-Policy: no-referrer`. The page needs no token to load; it asks for one (unless
the service runs without authentication), keeps it in the tab's `sessionStorage` and sends it
as a bearer header. `operations` describes these routes for `/openapi.json`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web

from service.console.files import Asset, Console
from service.errors import NotFound
from service.http.operations import Operation, Schemas, header

PATH = "/ui/"
ASSETS = f"{PATH}v/{{version}}/{{name}}"
PLAIN = f"{PATH}{{name}}"

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_IMMUTABLE = "public, max-age=31536000, immutable"

CONSOLE = web.AppKey("console", Console)


def setup(app: web.Application) -> None:
    """Serve the console under `/ui/` (no authentication: the page asks for a token)."""
    app[CONSOLE] = Console.load()
    app.router.add_get(PATH.rstrip("/"), _redirect)
    app.router.add_get(PATH, _index)
    app.router.add_get(ASSETS, _asset)
    app.router.add_get(PLAIN, _plain)


async def _redirect(request: web.Request) -> web.StreamResponse:
    # Relative, so the console works behind a proxy that serves the service under a prefix.
    return web.Response(status=308, headers={"Location": "ui/", **SECURITY_HEADERS})


async def _index(request: web.Request) -> web.StreamResponse:
    return _send(request, request.app[CONSOLE].index, "no-cache")


async def _asset(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    asset = console.assets.get(request.match_info["name"])
    if asset is None:
        raise NotFound(f"the console has no asset {request.match_info['name'][:100]!r}")
    # An older version's URL (a page loaded before an upgrade) gets today's file, uncached.
    current = request.match_info["version"] == console.version
    return _send(request, asset, _IMMUTABLE if current else "no-cache")


async def _plain(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    name = request.match_info["name"]
    asset = console.index if name == "index.html" else console.assets.get(name)
    if asset is None:
        raise NotFound(f"the console has no file {name[:100]!r}")
    return _send(request, asset, "no-cache")


def _send(request: web.Request, asset: Asset, cache: str) -> web.StreamResponse:
    zipped = "gzip" in request.headers.get("Accept-Encoding", "")
    # Two encodings are two representations: each its own strong tag.
    etag = asset.etag[:-1] + '-gz"' if zipped else asset.etag
    headers = {**SECURITY_HEADERS, "Cache-Control": cache, "ETag": etag, "Vary": "Accept-Encoding"}
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    if zipped:
        headers["Content-Encoding"] = "gzip"
    body = asset.gzipped if zipped else asset.body
    return web.Response(body=body, headers={**headers, "Content-Type": asset.content_type})


def operations(s: Schemas) -> Iterable[Operation]:
    """The console's routes, as `/openapi.json` describes them."""
    html = {"text/html": {"schema": {"type": "string"}}}

    def file_answers() -> dict[str, Any]:
        return {
            "200": {"description": "the file", "content": {"*/*": {"schema": {"type": "string"}}}},
            "404": s.error("no such file"),
        }

    yield Operation(
        "GET",
        PATH.rstrip("/"),
        None,
        "The web console, at `ui/`",
        {"308": {"description": "to `ui/`", "headers": {"Location": header("`ui/`")}}},
    )
    yield Operation(
        "GET",
        PATH,
        None,
        "The web console (docs/reference.md §10): a page that asks for a token and calls this API",
        {"200": {"description": "the page; never cached", "content": html}},
        description="Its assets are served from the package; a Content-Security-Policy allows this "
        "origin only.",
    )
    yield Operation(
        "GET",
        ASSETS,
        None,
        "A file of the web console (script, style, icon), cached for a year at the current version",
        file_answers(),
        (_in_path("version"), _in_path("name")),
    )
    yield Operation(
        "GET",
        PLAIN,
        None,
        "A file of the web console by its name alone (`index.html`, `app.js`...), never cached",
        file_answers(),
        (_in_path("name"),),
    )


def _in_path(name: str) -> dict[str, Any]:
    """A string parameter of the path."""
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
