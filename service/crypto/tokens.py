"""Bearer tokens: how they are made, how they are stored (sha256 only), and the clients file.

`switchboard token create` makes a random token, prints it once and adds its hash to the
clients file; the HTTP layer hashes each presented token the same way to find its client.
The clients file is the folder's `kind: clients` file, whatever its name (`clients.yaml`
when there is none yet), edited so that its comments and layout stay as they were.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from pathlib import Path

from service.config.loader import MAX_FILE_BYTES, config_files, declared_kind, parse
from service.config.models import Clients
from service.config.roundtrip import CommentedMap, CommentedSeq, Document, YAMLError, append
from service.errors import ConfigError, Problem
from service.files import read_limited, write_atomically

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


def clients_file(folder: Path) -> Path:
    """The folder's `kind: clients` file, by its kind; `clients.yaml` when there is none."""
    for path in config_files(folder):
        try:
            data, _ = read_limited(path, MAX_FILE_BYTES)
        except OSError:
            continue
        if declared_kind(data) == "clients":
            return path
    return folder / "clients.yaml"


def create_token(folder: Path, name: str, scopes: Sequence[str]) -> tuple[str, Path]:
    """Add a client named `name` with `scopes`; returns (the token, the clients file)."""
    path = clients_file(folder)
    if path.exists():
        loaded = parse(str(path), path.read_bytes())  # a file the service refuses is not edited
        if not isinstance(loaded.document, Clients):
            raise ConfigError([Problem(str(path), loaded.line("kind"), "is not a `kind: clients` file")])
        if any(client.name == name for client in loaded.document.clients):
            raise ConfigError([Problem(str(path), 1, f"a client named {name!r} exists already")])
        try:
            document = Document.read(path)
        except YAMLError:
            message = "cannot be edited while keeping its comments"
            raise ConfigError([Problem(str(path), 1, message)]) from None
    else:
        document = Document(_HEADER + "kind: clients\nclients: []\n")
    token = new_token()
    listed = CommentedSeq(dict.fromkeys(scopes))
    listed.fa.set_flow_style()  # scopes: [a, b], as docs/reference.md writes them
    entry = CommentedMap([("name", name), ("token_sha256", token_sha256(token)), ("scopes", listed)])
    clients = document.data.get("clients")
    if not isinstance(clients, CommentedSeq) or clients.fa.flow_style():
        clients = document.data["clients"] = CommentedSeq(clients or [])
    append(clients, entry)
    text = document.dump()
    parse(str(path), text.encode("utf-8"))  # never write a file the service would refuse
    write_atomically(path, text.encode("utf-8"))
    return token, path
