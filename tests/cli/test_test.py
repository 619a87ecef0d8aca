"""`switchboard test ID`: one provider checked now, with its decrypted key."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from service.cli.test import run as command
from service.errors import FileRejected, NotFound
from service.settings import Settings
from tests.conftest import SopsProject, git, git_init
from tests.support.gateway import CANARY, write_provider
from tests.support.tampering import TAMPERS, encrypted_vendor
from tests.support.upstreams import FakeUpstream, closed_port_url


def _settings(project: SopsProject) -> Settings:
    return Settings(root=project.root, providers=Path("providers.d"), age_key_file=project.identity.key_file)


async def test_the_test_command_checks_one_provider(
    sops_project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    async with FakeUpstream(name="a", api_key=CANARY, models=("m1", "m2", "m3")) as a:
        write_provider(sops_project, "a", provider="openai", base_url=a.base_url, api_key=CANARY)
        write_provider(sops_project, "dead", base_url=closed_port_url())
        settings = _settings(sops_project)
        ok = await asyncio.to_thread(command, argparse.Namespace(provider_id="a"), settings)
        down = await asyncio.to_thread(command, argparse.Namespace(provider_id="dead"), settings)
    out = capsys.readouterr().out
    assert (ok, down) == (0, 1)
    assert "a: ok in" in out and "3 models listed" in out
    assert "dead: failed in" in out and "cannot connect" in out
    assert CANARY not in out


def test_the_test_command_names_an_unknown_provider(sops_project: SopsProject) -> None:
    with pytest.raises(NotFound, match=r"no provider file nope\.yaml"):
        command(argparse.Namespace(provider_id="nope"), _settings(sops_project))


@pytest.mark.parametrize("provider_id", ["../providers.d/a", "A", "a b"])
def test_an_id_no_provider_may_have_is_wrong_usage(
    sops_project: SopsProject, capsys: pytest.CaptureFixture[str], provider_id: str
) -> None:
    """docs/reference.md §3: "2 wrong usage"; a path is not read as an id."""
    write_provider(sops_project, "a", base_url=closed_port_url())
    assert command(argparse.Namespace(provider_id=provider_id), _settings(sops_project)) == 2
    assert capsys.readouterr() == ("", f"switchboard: error: ID: {provider_id!r} is not a provider id\n")


async def test_the_test_command_keeps_to_the_allowed_upstreams(
    sops_project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    async with FakeUpstream(name="a", api_key=CANARY) as a:
        write_provider(sops_project, "a", provider="openai", base_url=a.base_url, api_key=CANARY)
        settings = _settings(sops_project).model_copy(update={"allowed_upstreams": "10.0.0.0/8"})
        code = await asyncio.to_thread(command, argparse.Namespace(provider_id="a"), settings)
    out = capsys.readouterr().out
    assert code == 1
    assert "refused by SWITCHBOARD_ALLOWED_UPSTREAMS" in out
    assert not a.requests


def test_a_provider_changed_outside_sops_is_not_tested_with_its_key(sops_project: SopsProject) -> None:
    """`test` sends the key to the file's `base_url`: a file carrying the MAC of the version
    that first carried it in git's history while its data differs (a pull request checked out
    to try it) was changed outside sops, and is refused before sops is asked (docs/reference.md §2.4)."""
    root, tamper = sops_project.root, TAMPERS[0]
    git_init(root)
    path = encrypted_vendor(sops_project, tamper)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "add a vendor")
    path.write_text(tamper.apply(path.read_text()))
    assert sops_project.sops.decrypt(path.read_bytes(), str(path))  # the MAC passes
    for committed in (False, True):  # in the work tree, then committed
        if committed:
            git(root, "commit", "-q", "-a", "-m", "point the vendor elsewhere")
        with pytest.raises(FileRejected, match="MAC mismatch: the file was changed without sops: its MAC is"):
            command(argparse.Namespace(provider_id="vendor"), _settings(sops_project))
