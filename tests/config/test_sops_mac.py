"""Telling a key-holding file changed outside sops from the version it replaces, with real sops."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from service.cli.main import cli
from service.config.loader import Loaded, parse
from tests.conftest import AgeIdentity, SopsProject, _write_sops_yaml
from tests.support.tampering import TAMPERS, Tamper, encrypted_vendor, provider_yaml

FILE = "providers.d/vendor.yaml"


def _encrypted(project: SopsProject) -> Path:
    return encrypted_vendor(project, TAMPERS[0])


def _refusal(before: bytes, after: bytes) -> str | None:
    old, new = parse(FILE, before), parse(FILE, after)
    assert old.seal is not None
    refused = new.changed_outside_sops({old.seal.mac: (FILE, old.seal)})
    return refused.reason if refused else None


def test_each_tamper_keeps_a_mac_sops_accepts_and_is_told(sops_project: SopsProject) -> None:
    path = _encrypted(sops_project)
    before = path.read_bytes()
    tampered = TAMPERS[0].apply(before.decode()).encode()
    assert sops_project.sops.decrypt(tampered, str(path))["base_url"] == "https://llm.com"
    assert _refusal(before, tampered) == (
        "line 21: MAC mismatch: the file was changed without sops: its MAC is the previous version's, "
        "but `base_url` and `name` "
        "differ (sops' MAC does not cover names or where values begin and end); restore the file "
        "from git, then change it with `switchboard edit`"
    )


def test_a_mac_spelt_otherwise_is_still_the_same_mac(sops_project: SopsProject) -> None:
    """sops' base64 skips a carriage return: the MAC's text differs, the MAC does not."""
    path = _encrypted(sops_project)
    before = path.read_text()
    mac = re.search(r"mac: (ENC\[AES256_GCM,data:)(\S{10})(\S+)", before)
    assert mac is not None
    respelt = before.replace(mac.group(0), f'mac: "{mac.group(1)}{mac.group(2)}\\r{mac.group(3)}"')
    tampered = TAMPERS[0].apply(respelt).encode()
    assert sops_project.sops.decrypt(tampered, str(path))["base_url"] == "https://llm.com"
    reason = _refusal(before.encode(), tampered)
    assert reason is not None and "its MAC is the previous version's" in reason


def test_comments_quoting_and_layout_are_not_a_change(sops_project: SopsProject) -> None:
    path = _encrypted(sops_project)
    before = path.read_text()
    after = "# ours\n" + before.replace("name: GPU box\n", 'name: "GPU box"   # the big one\n')
    after = after.replace("purposes: [embeddings]", "purposes:\n  - embeddings")
    assert _refusal(before.encode(), after.encode()) is None


def test_writes_through_sops_make_a_new_mac(
    sops_project: SopsProject, other_age_identity: AgeIdentity
) -> None:
    """encrypt, rotate and updatekeys (which keeps the MAC, rewrapping the data key) pass."""
    path = _encrypted(sops_project)
    before = path.read_bytes()
    changed = TAMPERS[0].apply(provider_yaml("vendor", TAMPERS[0]))
    assert _refusal(before, sops_project.sops.encrypt(changed.encode(), str(path))) is None
    sops_project.sops.rotate(path)
    assert _refusal(before, path.read_bytes()) is None
    rotated = path.read_bytes()
    _write_sops_yaml(sops_project.root, sops_project.identity.recipient, other_age_identity.recipient)
    sops_project.sops.updatekeys(path)
    assert path.read_bytes() != rotated
    assert _refusal(rotated, path.read_bytes()) is None


def test_a_file_without_sops_has_no_seal() -> None:
    loaded: Loaded = parse(FILE, b"kind: ai_server\nid: vendor\nserver_type: vllm\nbase_url: http://x/v1\n")
    assert loaded.seal is None
    assert loaded.changed_outside_sops({}) is None


@pytest.mark.parametrize("tamper", TAMPERS, ids=lambda t: t.name)
def test_switchboard_edit_of_such_a_change_gets_a_mac_of_its_own(
    sops_project: SopsProject, tamper: Tamper, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sops edit` within the second of the last write keeps the MAC when the joined values are
    the same; `switchboard edit` then rotates the data key, so the change reads as sops'."""
    path = sops_project.providers / "vendor.yaml"
    path.write_text(provider_yaml("vendor", tamper))
    sops_project.sops.encrypt_in_place(path)
    before = path.read_bytes()
    editor = tmp_path / "editor.py"
    editor.write_text(
        "import sys, pathlib\np = pathlib.Path(sys.argv[1])\n"
        f"p.write_text(p.read_text().replace({tamper.before!r}, {tamper.after!r}))\n"
    )
    monkeypatch.setenv("EDITOR", f"{sys.executable} {editor}")
    monkeypatch.setenv("SOPS_AGE_KEY_FILE", str(sops_project.identity.key_file))
    assert cli("--root", str(sops_project.root), "edit", str(path)) == 0
    assert _refusal(before, path.read_bytes()) is None
    assert sops_project.sops.decrypt(path.read_bytes(), str(path))["base_url"] == tamper.url
