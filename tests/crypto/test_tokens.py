"""Tokens: the clients file is found by its kind and edited without losing a comment."""

from __future__ import annotations

from pathlib import Path

import yaml

from service.config.loader import parse
from service.config.models import Clients
from service.crypto.tokens import create_token, token_sha256

EXISTING = (
    "# yaml-language-server: $schema=../schemas/clients.schema.json\n"
    "# Who may call us. Ask #platform before adding a client.\n"
    "kind: clients\n"
    "clients:\n"
    "  # the dashboard, read-only\n"
    f"  - name: dashboard\n    token_sha256: {'ab' * 32}  # rotated 2026-11\n"
    "    scopes: [config:read]\n"
)


def test_a_new_token_joins_the_clients_file_found_by_kind_keeping_its_comments(tmp_path: Path) -> None:
    folder = tmp_path / "providers.d"
    folder.mkdir()
    (folder / "access.yaml").write_text(EXISTING)

    token, path = create_token(folder, "deployer", ["secrets:read", "completions"])

    assert path == folder / "access.yaml"
    assert not (folder / "clients.yaml").exists()
    text = path.read_text()
    assert text.startswith(EXISTING)  # every comment and line as it was, the new client after
    added = text.removeprefix(EXISTING)
    digest = token_sha256(token)
    assert (
        added == f"  - name: deployer\n    token_sha256: {digest}\n    scopes: [secrets:read, completions]\n"
    )
    document = parse("providers.d/access.yaml", text.encode()).document
    assert isinstance(document, Clients)
    assert [c.name for c in document.clients] == ["dashboard", "deployer"]


def test_without_a_clients_file_one_is_made_with_its_header(tmp_path: Path) -> None:
    folder = tmp_path / "providers.d"
    folder.mkdir()
    (folder / "clients.yaml.bak").write_text("kind: clients\n")  # not a document: ignored

    token, path = create_token(folder, "ops", ["admin"])

    assert path == folder / "clients.yaml"
    text = path.read_text()
    assert text.startswith("# yaml-language-server: $schema=../schemas/clients.schema.json\n")
    assert yaml.safe_load(text) == {
        "kind": "clients",
        "clients": [{"name": "ops", "token_sha256": token_sha256(token), "scopes": ["admin"]}],
    }
