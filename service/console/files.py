"""The console's files, as they are sent: read once from `service/console/assets/`, kept with their gzip.

No request touches the disk. The version is a hash of every asset, so a URL that names it can
be cached for a year; `index.html` names it, and is never cached.
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

from service.config.models import PURPOSES, Protocol, ServerType
from service.vendors import VENDORS

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
        """Read `service/console/assets/` from the package; the version is a hash of every asset."""
        folder = resources.files(__package__ or "service.console").joinpath("assets")
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


def vocabulary() -> dict[str, object]:
    """What the console's forms offer, from the models: purposes, vendors, server types, protocols."""
    return {
        "purposes": list(PURPOSES),
        "vendors": {name: vendor.base_url for name, vendor in sorted(VENDORS.items())},
        "server_types": list(get_args(ServerType)),
        "protocols": list(get_args(Protocol)),
    }


def _strong_tag(body: bytes) -> str:
    """A strong tag for an asset: it changes exactly when its bytes do."""
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
