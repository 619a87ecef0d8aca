"""Shared fixtures: throwaway age identities and a sops project, made once per session.

Every test runs with HOME and XDG_CONFIG_HOME pointing at an empty session directory and
without inherited SOPS_AGE_* variables, so neither sops nor the code under test can reach
the developer's own keys (~/.config/sops/age/keys.txt, ~/.ssh). Because HOME moves, a git
identity is set through GIT_* variables for tests that commit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.keys import write_identity
from service.sops import Sops

_AMBIENT_SOPS_VARS = (
    "SOPS_AGE_KEY",
    "SOPS_AGE_KEY_FILE",
    "SOPS_AGE_KEY_CMD",
    "SOPS_AGE_SSH_PRIVATE_KEY_FILE",
    "SOPS_AGE_RECIPIENTS",
    "SOPS_CONFIG",
)


@dataclass(frozen=True)
class AgeIdentity:
    """An age identity on disk: its key file and its public recipient."""

    key_file: Path
    recipient: str


@dataclass(frozen=True)
class SopsProject:
    """A project directory with `.sops.yaml` (the SPEC rule), an empty `providers.d/` and a `Sops`."""

    root: Path
    providers: Path
    sops: Sops
    identity: AgeIdentity


@pytest.fixture(scope="session")
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(autouse=True)
def _no_ambient_keys(monkeypatch: pytest.MonkeyPatch, _isolated_home: Path) -> Iterator[None]:
    """Hide the developer's keys and sops settings from every test."""
    for name in _AMBIENT_SOPS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(_isolated_home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(_isolated_home / ".config"))
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "Switchboard Tests")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "tests@switchboard.invalid")
    yield


def _identity(tmp_path_factory: pytest.TempPathFactory, name: str) -> AgeIdentity:
    key_file = tmp_path_factory.mktemp(name) / "keys.txt"
    return AgeIdentity(key_file=key_file, recipient=write_identity(key_file))


@pytest.fixture(scope="session")
def age_identity(tmp_path_factory: pytest.TempPathFactory) -> AgeIdentity:
    """The identity the test project's files are encrypted for."""
    return _identity(tmp_path_factory, "age-identity")


@pytest.fixture(scope="session")
def other_age_identity(tmp_path_factory: pytest.TempPathFactory) -> AgeIdentity:
    """A second identity, not in `.sops.yaml` unless a test adds it."""
    return _identity(tmp_path_factory, "other-age-identity")


def _write_sops_yaml(root: Path, *recipients: str) -> Path:
    """Write the SPEC's `.sops.yaml` rule for the given recipients into `root`."""
    path = root / ".sops.yaml"
    path.write_text(
        "creation_rules:\n"
        "  - path_regex: providers.d/.*\\.ya?ml$\n"
        "    encrypted_regex: ^(api_key)$\n"
        f"    age: {','.join(recipients)}\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def sops_project(tmp_path: Path, age_identity: AgeIdentity) -> SopsProject:
    """A fresh project for `age_identity`, with a `Sops` that uses only that key file."""
    root = tmp_path / "project"
    (root / "providers.d").mkdir(parents=True)
    _write_sops_yaml(root, age_identity.recipient)
    sops = Sops(age_key_file=age_identity.key_file, project_root=root)
    return SopsProject(root=root, providers=root / "providers.d", sops=sops, identity=age_identity)
