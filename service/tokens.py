"""`switchboard token create`: a new random bearer token, whose hash joins the clients file."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path

import yaml

from service.auth import token_sha256
from service.errors import ConfigError, Problem
from service.files import write_atomically
from service.loader import parse
from service.models import Clients

_HEADER = (
    "# yaml-language-server: $schema=../schemas/clients.schema.json\n"
    "# Who may call the HTTP API. Tokens are stored as sha256 only: `switchboard token create`.\n"
)


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
    token = "sb_" + secrets.token_urlsafe(32)
    entries.append({"name": name, "token_sha256": token_sha256(token), "scopes": list(dict.fromkeys(scopes))})
    body = yaml.safe_dump({"kind": "clients", "clients": entries}, sort_keys=False)
    text = _HEADER + body
    Clients.model_validate(yaml.safe_load(text))  # never write a file the service would refuse
    write_atomically(path, text.encode("utf-8"))
    return token, path
