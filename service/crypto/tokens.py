"""Bearer tokens: how they are made, how they are stored (sha256 only), and the clients file.

`switchboard token create` makes a random token, prints it once and adds its hash to the
clients file; the HTTP layer hashes each presented token the same way to find its client.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from pathlib import Path

import yaml

from service.config.loader import parse
from service.config.models import Clients
from service.errors import ConfigError, Problem
from service.files import write_atomically

_HEADER = (
    "# yaml-language-server: $schema=../schemas/clients.schema.json\n"
    "# Who may call the HTTP API. Tokens are stored as sha256 only: `switchboard token create`.\n"
)


TOKEN_PREFIX = "sb_"  # noqa: S105 - a prefix that makes tokens recognisable, not a secret


def token_sha256(token: str) -> str:
    """How a token is stored in the clients file: the sha256 hex of its UTF-8 bytes."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A new random bearer token (`sb_` and 256 bits, URL-safe)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def create_token(folder: Path, name: str, scopes: Sequence[str]) -> tuple[str, Path]:
    """Add a client named `name` with `scopes`; returns (the token, the clients file)."""
    path = next(
        (p for p in (folder / "clients.yaml", folder / "clients.yml") if p.exists()), folder / "clients.yaml"
    )
    if path.exists():
        loaded = parse(str(path), path.read_bytes())
        if not isinstance(loaded.document, Clients):
            raise ConfigError([Problem(str(path), loaded.line("kind"), "is not a `kind: clients` file")])
        entries = [c.model_dump(mode="json") for c in loaded.document.clients]
    else:
        entries = []
    if any(entry["name"] == name for entry in entries):
        raise ConfigError([Problem(str(path), 1, f"a client named {name!r} exists already")])
    token = new_token()
    entries.append({"name": name, "token_sha256": token_sha256(token), "scopes": list(dict.fromkeys(scopes))})
    body = yaml.safe_dump({"kind": "clients", "clients": entries}, sort_keys=False)
    text = _HEADER + body
    Clients.model_validate(yaml.safe_load(text))  # never write a file the service would refuse
    write_atomically(path, text.encode("utf-8"))
    return token, path
