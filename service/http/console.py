"""The web console (docs/reference.md §10): `/ui/`, a page served from the package, on top of the public API.

    GET /ui                      308 to `ui/`
    GET /ui/                     index.html, never cached (it names the assets' version)
    GET /ui/v/{version}/{name}   app.js, app.css and the other assets: cached for a year when
                                 `version` is the current one (it changes with their content)
    GET /ui/{name}               the same files unversioned (`/ui/app.js`), never cached

No CDN, no build step: the assets are plain files of `service/http/console/` (modern JS
modules, CSS), read once when the app is made and kept in memory with their gzip, so no
request touches the disk. Every answer carries a Content-Security-Policy that allows only
this origin's scripts, styles and connections (no inline script, no other origin), with
`X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer`.

The page itself needs no token to load; it asks for one (unless the service runs without
authentication), keeps it in the tab's `sessionStorage` and sends it as a bearer header.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import mimetypes
from dataclasses import dataclass
from importlib import resources
from typing import get_args

from aiohttp import web

from service.config.models import PURPOSES, ServerType
from service.errors import NotFound
from service.vendors import VENDORS

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
_VERSION_MARK = "__VERSION__"
_VOCABULARY_MARK = "__VOCABULARY__"
_PRELOAD_MARK = "__PRELOAD__"
_ENTRY = "app.js"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True, slots=True)
class Asset:
    """One file of the console, as it is sent: its bytes, their gzip, its type and tag."""

    body: bytes
    gzipped: bytes
    content_type: str
    etag: str

    @classmethod
    def of(cls, name: str, body: bytes) -> Asset:
        suffix = name[name.rfind(".") :]
        content_type = _TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
        return cls(body, gzip.compress(body, compresslevel=9, mtime=0), content_type, _strong_tag(body))


@dataclass(frozen=True, slots=True)
class Console:
    """The console's files, loaded once: index.html and the versioned assets by name."""

    version: str
    index: Asset
    assets: dict[str, Asset]

    @classmethod
    def load(cls) -> Console:
        """Read `service/http/console/` from the package; the version is a hash of every asset."""
        folder = resources.files(__package__ or "service.http").joinpath("console")
        files = {
            entry.name: entry.read_bytes()
            for entry in folder.iterdir()
            if entry.is_file() and not entry.name.startswith(".")
        }
        page = files.pop("index.html").decode("utf-8")
        digest = hashlib.blake2b(digest_size=8)
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + files[name] + b"\0")
        version = digest.hexdigest()
        # Every module is fetched at once, not one import after another.
        preload = "\n".join(
            f'<link rel="modulepreload" href="v/{version}/{name}">'
            for name in sorted(files)
            if name.endswith(".js") and name != _ENTRY
        )
        page = (
            page.replace(_PRELOAD_MARK, preload)
            .replace(_VOCABULARY_MARK, html.escape(json.dumps(vocabulary()), quote=True))
            .replace(_VERSION_MARK, version)
        )
        index = Asset.of("index.html", page.encode("utf-8"))
        return cls(version, index, {name: Asset.of(name, body) for name, body in files.items()})


CONSOLE = web.AppKey("console", Console)


def vocabulary() -> dict[str, object]:
    """What the console's forms offer, from the models themselves: purposes, vendors, server types."""
    return {
        "purposes": list(PURPOSES),
        "vendors": {name: vendor.base_url for name, vendor in sorted(VENDORS.items())},
        "server_types": list(get_args(ServerType)),
    }


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


def _strong_tag(body: bytes) -> str:
    """A strong tag for an asset: it changes exactly when its bytes do."""
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
