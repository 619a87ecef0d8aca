"""The web console's files (docs/reference.md §10): served from the package at `/ui/`, with a strict CSP.

What the page does in a browser is `tests/console/test_browser.py`; this is what the
service sends: the page, its assets, their types, caching, compression and security headers,
and what the assets may not contain (markup from data, another origin, inline script).
"""

from __future__ import annotations

import gzip
import re
import tomllib
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import pytest

from service.console.files import Console
from service.console.routes import CONSOLE, CSP
from tests.conftest import Service, SopsProject, serve, write_routing, write_server
from tests.support.gateway import write_clients

REPO = Path(__file__).resolve().parents[2]
SECURITY = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def assets() -> dict[str, str]:
    folder = resources.files("service.console").joinpath("assets")
    return {entry.name: entry.read_text(encoding="utf-8") for entry in folder.iterdir() if entry.is_file()}


def test_the_policy_allows_this_origin_only() -> None:
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives == {
        "default-src": "'self'",
        "script-src": "'self'",
        "style-src": "'self'",
        "connect-src": "'self'",
        "img-src": "'self' data:",
        "base-uri": "'none'",
        "frame-ancestors": "'none'",
        "form-action": "'self'",
    }


@pytest.mark.parametrize("name", sorted(n for n in assets() if n.endswith(".js")))
def test_no_script_turns_data_into_markup_or_code(name: str) -> None:
    """Data becomes text (`textContent`, text nodes): nothing parses a string as HTML or code."""
    source = _code(assets()[name])
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in source, f"{name} uses {sink}"
    assert "EventSource" not in source or name == "stream.js", "the token may not go in a URL"
    assert not re.search(r"setTimeout\(\s*['\"`]", source), f"{name} passes a string to setTimeout"
    assert "localStorage" not in source, "the token lives in sessionStorage only (one tab)"


def test_no_asset_names_another_origin() -> None:
    for name, source in assets().items():
        if name == "index.html":
            # Only its own files: no script or style from elsewhere, and no inline script.
            assert not re.search(r"(src|href)=\"(https?:)?//", source)
            scripts = re.findall(r"<script\b[^>]*>", source)
            assert scripts == ['<script type="module" src="v/__VERSION__/app.js">']
            assert " style=" not in source and "<style" not in source
        elif name.endswith(".js"):
            code = _code(source)
            assert not re.search(r"(from|import\(|fetch\(|URL\()\s*[\"'`](https?:)?//", code), name
        elif name.endswith(".css"):
            assert "@import" not in source and not re.search(r"url\(\s*[\"']?(https?:)?//", source)


@pytest.fixture
async def service(sops_project: SopsProject) -> AsyncIterator[Service]:
    write_server(sops_project, "gpu")
    write_routing(sops_project, ["gpu"])
    write_clients(sops_project, {"reader": ("sb_console_reader_0a1b2c3d", ["config:read"])})
    async with serve(sops_project) as running:
        yield running


async def test_ui_without_the_slash_redirects(service: Service) -> None:
    async with service.http.get(service.url + "/ui", allow_redirects=False) as response:
        assert response.status == 308
        assert response.headers["Location"] == "ui/"


async def test_the_page_needs_no_token_and_is_never_cached(service: Service) -> None:
    """The page asks for the token; loading it needs none, even with a clients file."""
    async with service.http.get(service.url + "/ui/") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert response.headers["Cache-Control"] == "no-cache"
        for name, value in SECURITY.items():
            assert response.headers[name] == value
        page = await response.text()
    version = service.app[CONSOLE].version
    assert f'src="v/{version}/app.js"' in page
    assert f'href="v/{version}/app.css"' in page
    assert f'<link rel="modulepreload" href="v/{version}/store.js">' in page
    assert '"vendors": {&quot;' not in page and "&quot;openrouter&quot;" in page  # escaped data


async def test_assets_have_their_types_and_are_cached_at_their_version(service: Service) -> None:
    version = service.app[CONSOLE].version
    for name, kind in (
        ("app.js", "text/javascript; charset=utf-8"),
        ("app.css", "text/css; charset=utf-8"),
        ("icon.svg", "image/svg+xml"),
    ):
        async with service.http.get(f"{service.url}/ui/v/{version}/{name}") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == kind
            assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert response.headers["Content-Security-Policy"] == CSP
    # A page of an older version gets today's file, which it must not keep.
    async with service.http.get(f"{service.url}/ui/v/0000/app.js") as response:
        assert response.status == 200 and response.headers["Cache-Control"] == "no-cache"


async def test_assets_are_gzipped_when_asked_and_answer_304(service: Service) -> None:
    version = service.app[CONSOLE].version
    url = f"{service.url}/ui/v/{version}/app.js"
    async with service.http.get(url, headers={"Accept-Encoding": "gzip"}, auto_decompress=False) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Vary"] == "Accept-Encoding"
        zipped, tag = await response.read(), response.headers["ETag"]
    async with service.http.get(url, headers={"Accept-Encoding": "identity"}) as response:
        plain = await response.read()
        assert "Content-Encoding" not in response.headers and response.headers["ETag"] != tag
    assert gzip.decompress(zipped) == plain
    headers = {"Accept-Encoding": "gzip", "If-None-Match": tag}
    async with service.http.get(url, headers=headers) as response:
        assert response.status == 304


async def test_the_files_answer_by_their_name_alone_too(service: Service) -> None:
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css"), ("index.html", "text/html")):
        async with service.http.get(f"{service.url}/ui/{name}") as response:
            assert response.status == 200, name
            assert response.headers["Content-Type"].startswith(kind)
            assert response.headers["Cache-Control"] == "no-cache"
            assert response.headers["Content-Security-Policy"] == CSP
    async with service.http.get(f"{service.url}/ui/nope.js") as response:
        assert response.status == 404


async def test_an_unknown_asset_is_404_and_no_path_escapes(service: Service) -> None:
    version = service.app[CONSOLE].version
    for name in ("nope.js", "..%2Fconsole.py", "%2e%2e%2f%2e%2e%2fapp.py", "index.html"):
        async with service.http.get(f"{service.url}/ui/v/{version}/{name}") as response:
            assert response.status == 404, name
            assert (await response.json())["error"]["type"] == "not_found"


def test_the_assets_are_small() -> None:
    """The whole console, gzipped as it is sent, is a small fraction of the 200 KB budget."""
    console = Console.load()
    sent = len(console.index.gzipped) + sum(len(a.gzipped) for a in console.assets.values())
    assert sent < 80_000, sent


def test_every_asset_is_in_the_package_data_the_wheel_is_built_from() -> None:
    """§10: "every asset is in the package": the wheel takes the console's files by the globs of
    pyproject's `package-data`, so an asset of a new kind (a font, a map) would be served from a
    checkout and missing from an installed service."""
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    folder = REPO / "service" / "console"
    shipped = {p for pattern in globs["service.console"] for p in folder.glob(pattern)}
    every = {p for p in (folder / "assets").rglob("*") if p.is_file()}
    assert every and every <= shipped, sorted(str(p.relative_to(folder)) for p in every - shipped)
    assert set(assets()) == {p.name for p in every}


def _code(source: str) -> str:
    """A script without its comments (which may name what the code avoids)."""
    source = re.sub(r"/\*.*?\*/", "", source, flags=re.S)
    return re.sub(r"(?m)^\s*//.*$", "", source)
