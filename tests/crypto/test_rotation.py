"""`switchboard rotate`: new data keys, recipients added and removed, and nothing left half-written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from service.cli.main import cli
from service.config.loader import decrypt, parse
from service.config.snapshot import Snapshot
from service.crypto import keys
from service.crypto.rotation import RotationStopped, encrypted_files, file_recipients, rotate
from service.crypto.sops import Sops
from service.errors import SopsNoKey
from tests.conftest import AgeIdentity, SopsProject

KEYS = {
    "alpha": "sk-alpha-0123456789abcd",
    "beta": "sk-beta-0123456789abcdef",
    "gamma": "sk-gamma-0123456789ab",
}


def key_file(provider_id: str, key: str) -> str:
    return f"kind: api_key\nid: {provider_id}\nprovider: openrouter\napi_key: {key}\npurposes: [chat]\n"


@pytest.fixture
def project(sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch) -> SopsProject:
    """Three encrypted keys and one plain server, as the working directory, with the key in use."""
    monkeypatch.chdir(sops_project.root)
    monkeypatch.setenv("SOPS_AGE_KEY_FILE", str(sops_project.identity.key_file))
    for provider_id, key in KEYS.items():
        path = sops_project.providers / f"{provider_id}.yaml"
        path.write_text(key_file(provider_id, key))
        sops_project.sops.encrypt_in_place(path)
    (sops_project.providers / "gpu.yaml").write_text(
        "kind: ai_server\nid: gpu\nserver_type: vllm\nbase_url: http://127.0.0.1:8000/v1\n"
    )
    return sops_project


def data_key_wraps(path: Path) -> dict[str, str]:
    """recipient -> its wrapped data key: a new data key changes every one of them."""
    meta = yaml.safe_load(path.read_text())["sops"]
    return {entry["recipient"]: entry["enc"] for entry in meta["age"]}


def decrypts_with(project: SopsProject, identity: AgeIdentity, path: Path) -> dict[str, object]:
    sops = Sops(age_key_file=identity.key_file, project_root=project.root)
    return sops.decrypt(path.read_bytes(), str(path))


def masked_view(project: SopsProject) -> dict[str, object]:
    files = {}
    for path in sorted(project.providers.glob("*.yaml")):
        name = f"providers.d/{path.name}"
        files[name] = decrypt(parse(name, path.read_bytes()), project.sops)
    return Snapshot.build(files).view()


def test_only_encrypted_files_are_rotated(project: SopsProject) -> None:
    assert [p.name for p in encrypted_files(project.providers)] == ["alpha.yaml", "beta.yaml", "gamma.yaml"]


def test_rotation_gives_every_file_a_new_data_key_and_keeps_the_values(
    project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p.name: (p.read_bytes(), data_key_wraps(p)) for p in encrypted_files(project.providers)}
    server = (project.providers / "gpu.yaml").read_bytes()
    assert cli("rotate") == 0
    out = capsys.readouterr().out
    assert "rotated providers.d/alpha.yaml" in out
    assert "3 file(s) re-encrypted with new data keys for 1 recipient(s)" in out
    for path in encrypted_files(project.providers):
        old_bytes, old_wraps = before[path.name]
        assert path.read_bytes() != old_bytes
        assert data_key_wraps(path).keys() == old_wraps.keys()
        assert data_key_wraps(path) != old_wraps
        assert decrypts_with(project, project.identity, path)["api_key"] == KEYS[path.stem]
    assert (project.providers / "gpu.yaml").read_bytes() == server
    assert not list(project.providers.glob(".*"))


def test_a_rotation_changes_nothing_the_service_records(project: SopsProject) -> None:
    before = masked_view(project)
    assert cli("rotate") == 0
    assert masked_view(project) == before


def test_adding_a_recipient_lets_that_identity_decrypt(
    project: SopsProject, other_age_identity: AgeIdentity
) -> None:
    alpha = project.providers / "alpha.yaml"
    with pytest.raises(SopsNoKey):
        decrypts_with(project, other_age_identity, alpha)
    assert cli("rotate", "--add-recipient", other_age_identity.recipient) == 0
    assert other_age_identity.recipient in (project.root / ".sops.yaml").read_text()
    for path in encrypted_files(project.providers):
        assert file_recipients(path.read_bytes()) == {
            project.identity.recipient,
            other_age_identity.recipient,
        }
        assert decrypts_with(project, other_age_identity, path)["api_key"] == KEYS[path.stem]


def test_one_flag_takes_several_recipients(project: SopsProject, other_age_identity: AgeIdentity) -> None:
    """docs/reference.md §3: `rotate [--add-recipient R…] [--remove-recipient R…]`."""
    third = keys.generate_identity()[1]
    assert cli("rotate", "--add-recipient", other_age_identity.recipient, third) == 0
    everyone = {project.identity.recipient, other_age_identity.recipient, third}
    for path in encrypted_files(project.providers):
        assert file_recipients(path.read_bytes()) == everyone
    assert cli("rotate", "--remove-recipient", other_age_identity.recipient, third) == 0
    for path in encrypted_files(project.providers):
        assert file_recipients(path.read_bytes()) == {project.identity.recipient}


def test_removing_a_recipient_locks_it_out_with_a_new_data_key(
    project: SopsProject, other_age_identity: AgeIdentity
) -> None:
    assert cli("rotate", "--add-recipient", other_age_identity.recipient) == 0
    alpha = project.providers / "alpha.yaml"
    kept_wrap = data_key_wraps(alpha)[project.identity.recipient]
    assert cli("rotate", "--remove-recipient", other_age_identity.recipient) == 0
    assert other_age_identity.recipient not in (project.root / ".sops.yaml").read_text()
    for path in encrypted_files(project.providers):
        assert file_recipients(path.read_bytes()) == {project.identity.recipient}
        with pytest.raises(SopsNoKey):
            decrypts_with(project, other_age_identity, path)
        assert decrypts_with(project, project.identity, path)["api_key"] == KEYS[path.stem]
    # The remaining recipient's wrap changed too: the data key itself is new.
    assert data_key_wraps(alpha)[project.identity.recipient] != kept_wrap


def test_replacing_a_recipient_needs_a_key_that_stays_to_check_the_result(
    project: SopsProject, other_age_identity: AgeIdentity, capsys: pytest.CaptureFixture[str]
) -> None:
    add, drop = other_age_identity.recipient, project.identity.recipient
    assert cli("rotate", "--add-recipient", add, "--remove-recipient", drop) == 1
    assert "the identity in use is not among the new recipients" in capsys.readouterr().err
    for path in encrypted_files(project.providers):
        assert decrypts_with(project, project.identity, path)["api_key"] == KEYS[path.stem]


def test_replacing_a_recipient_with_both_identities_at_hand(
    project: SopsProject,
    other_age_identity: AgeIdentity,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    both = tmp_path / "both.txt"
    both.write_text(project.identity.key_file.read_text() + other_age_identity.key_file.read_text())
    monkeypatch.setenv("SOPS_AGE_KEY_FILE", str(both))
    add, drop = other_age_identity.recipient, project.identity.recipient
    assert cli("rotate", "--add-recipient", add, "--remove-recipient", drop) == 0
    for path in encrypted_files(project.providers):
        assert file_recipients(path.read_bytes()) == {add}
        assert decrypts_with(project, other_age_identity, path)["api_key"] == KEYS[path.stem]
        with pytest.raises(SopsNoKey):
            decrypts_with(project, project.identity, path)


def test_removing_the_last_recipient_is_refused(
    project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    alpha = (project.providers / "alpha.yaml").read_bytes()
    assert cli("rotate", "--remove-recipient", project.identity.recipient) == 1
    assert "refusing to remove the last age recipient" in capsys.readouterr().err
    assert (project.providers / "alpha.yaml").read_bytes() == alpha


def test_a_failure_stops_with_the_file_named_and_every_file_whole(
    project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    beta = project.providers / "beta.yaml"
    text = beta.read_text()
    # Alter the encrypted value: sops refuses to decrypt it, so it cannot be rotated.
    start = text.index("data:") + 5
    beta.write_text(text[:start] + ("A" if text[start] != "A" else "B") + text[start + 1 :])
    untouched = {p.name: p.read_bytes() for p in encrypted_files(project.providers)}
    assert cli("rotate") == 1
    err = capsys.readouterr().err
    assert "providers.d/beta.yaml" in err
    assert "rotated 1 of 3 file(s)" in err
    alpha, gamma = project.providers / "alpha.yaml", project.providers / "gamma.yaml"
    assert alpha.read_bytes() != untouched["alpha.yaml"]
    assert decrypts_with(project, project.identity, alpha)["api_key"] == KEYS["alpha"]
    assert beta.read_bytes() == untouched["beta.yaml"]
    assert gamma.read_bytes() == untouched["gamma.yaml"]
    assert not list(project.providers.glob(".*"))


def test_an_interruption_between_files_leaves_each_file_old_or_new(project: SopsProject) -> None:
    files = encrypted_files(project.providers)
    before = {p: p.read_bytes() for p in files}

    def interrupt_after_first(path: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rotate(files, project.sops, [project.identity.recipient], progress=interrupt_after_first)
    assert files[0].read_bytes() != before[files[0]]
    for path in files:
        assert decrypts_with(project, project.identity, path)["api_key"] == KEYS[path.stem]
    assert [p.read_bytes() for p in files[1:]] == [before[p] for p in files[1:]]
    assert not list(project.providers.glob(".*"))


def test_a_stopped_rotation_reports_what_is_done_and_pending(project: SopsProject) -> None:
    files = encrypted_files(project.providers)
    files[1].write_text("kind: api_key\nsops: {}\n")
    with pytest.raises(RotationStopped) as info:
        rotate(files, project.sops, [project.identity.recipient])
    assert info.value.file == "providers.d/beta.yaml"
    assert info.value.done == (files[0],)
    assert info.value.pending == tuple(files[1:])


def test_removing_a_recipient_that_is_not_listed_says_so(
    project: SopsProject, other_age_identity: AgeIdentity, capsys: pytest.CaptureFixture[str]
) -> None:
    """An operator revoking a colleague's key that `.sops.yaml` does not name (already removed, or
    another key than they meant) is told, instead of reading the rotation as the revocation;
    the rotation itself goes on."""
    assert cli("rotate", "--remove-recipient", other_age_identity.recipient) == 0
    err = capsys.readouterr().err
    warning = f"switchboard: warning: --remove-recipient: {other_age_identity.recipient} is not a recipient"
    assert warning in err


def test_a_malformed_recipient_is_wrong_usage_and_changes_nothing(
    project: SopsProject, other_age_identity: AgeIdentity, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/reference.md §3: "2 wrong usage"; one line on stderr, and `.sops.yaml` as it was,
    even when a good recipient comes before the bad one."""
    config = (project.root / ".sops.yaml").read_text()
    alpha = (project.providers / "alpha.yaml").read_bytes()
    assert cli("rotate", "--add-recipient", other_age_identity.recipient, "age1typo") == 2
    assert (
        capsys.readouterr().err == "switchboard: error: --add-recipient: not an age recipient: 'age1typo'\n"
    )
    assert cli("rotate", "--remove-recipient", "nobody") == 2
    assert "--remove-recipient: not an age recipient: 'nobody'" in capsys.readouterr().err
    assert (project.root / ".sops.yaml").read_text() == config
    assert (project.providers / "alpha.yaml").read_bytes() == alpha
