"""Bearer tokens: their shape, their stored hash, and the clients file `token create` writes."""

from __future__ import annotations

import hashlib
import re
import stat
from pathlib import Path

import pytest
import yaml

from service.config.loader import parse
from service.config.models import Clients
from service.crypto.tokens import TOKEN_PREFIX, create_token, new_token, token_sha256
from service.errors import ConfigError


def clients_of(path: Path) -> Clients:
    """The clients file as the service loads it: any problem fails the test."""
    document = parse(f"providers.d/{path.name}", path.read_bytes()).document
    assert isinstance(document, Clients)
    return document


def test_token_sha256_is_the_hex_sha256_of_the_utf8_bytes() -> None:
    assert token_sha256("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert token_sha256("sb_ünï") == hashlib.sha256("sb_ünï".encode()).hexdigest()


def test_a_new_token_is_sb_and_256_random_bits_url_safe() -> None:
    tokens = {new_token() for _ in range(200)}
    assert len(tokens) == 200
    assert TOKEN_PREFIX == "sb_"
    for token in tokens:
        assert re.fullmatch(r"sb_[A-Za-z0-9_-]{43}", token), token  # 32 bytes, base64url, unpadded


def test_create_token_starts_a_clients_file_that_stores_only_the_hash(tmp_path: Path) -> None:
    folder = tmp_path / "providers.d"  # made when missing
    token, path = create_token(folder, "ops-center", ["config:read", "completions", "config:read"])
    assert path == folder / "clients.yaml"
    assert token.startswith("sb_")
    text = path.read_text()
    assert token not in text
    assert text.startswith("# yaml-language-server: $schema=../schemas/clients.schema.json\n")
    (client,) = clients_of(path).clients
    assert client.name == "ops-center"
    assert client.token_sha256 == token_sha256(token)
    assert client.scopes == ["config:read", "completions"]  # a scope given twice is stored once
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in folder.iterdir()] == ["clients.yaml"]  # no temp file left beside it


def test_a_second_client_joins_the_first_with_its_own_token(tmp_path: Path) -> None:
    first, path = create_token(tmp_path, "ops", ["admin"])
    second, again = create_token(tmp_path, "ci", ["config:read"])
    assert again == path and first != second
    clients = clients_of(path).clients
    assert [(c.name, c.token_sha256, c.scopes) for c in clients] == [
        ("ops", token_sha256(first), ["admin"]),
        ("ci", token_sha256(second), ["config:read"]),
    ]


def test_an_existing_clients_yml_is_the_file_added_to(tmp_path: Path) -> None:
    (tmp_path / "clients.yml").write_text("kind: clients\nclients: []\n")
    token, path = create_token(tmp_path, "ops", ["admin"])
    assert path == tmp_path / "clients.yml"
    assert not (tmp_path / "clients.yaml").exists()
    assert clients_of(path).clients[0].token_sha256 == token_sha256(token)


def test_a_name_taken_is_refused_and_the_file_left_as_it_was(tmp_path: Path) -> None:
    _, path = create_token(tmp_path, "ops", ["admin"])
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="a client named 'ops' exists already"):
        create_token(tmp_path, "ops", ["config:read"])
    assert path.read_bytes() == before


def test_a_clients_yaml_of_another_kind_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "clients.yaml"
    path.write_text("kind: routing\npurposes:\n  chat:\n    primary: [gpu]\n")
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=r"clients.yaml:1: error: is not a `kind: clients` file"):
        create_token(tmp_path, "ops", ["admin"])
    assert path.read_bytes() == before


def test_an_invalid_name_or_scope_writes_nothing(tmp_path: Path) -> None:
    for name, scopes in (("has spaces", ["admin"]), ("ops", ["root"]), ("ops", [])):
        with pytest.raises(ConfigError):
            create_token(tmp_path, name, scopes)
    assert list(tmp_path.iterdir()) == []


def test_the_written_file_keeps_every_client_and_its_comments(tmp_path: Path) -> None:
    for index in range(5):
        create_token(tmp_path, f"client-{index}", ["completions"])
    path = tmp_path / "clients.yaml"
    assert [c.name for c in clients_of(path).clients] == [f"client-{i}" for i in range(5)]
    assert yaml.safe_load(path.read_text())["kind"] == "clients"
    assert path.read_text().count("# ") == 2  # the header, once


# -- the clients file, found by kind, comments kept --

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
