"""`switchboard validate`, `schema`, `keygen` and `encrypt`, run as a user runs them (real sops)."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from service.cli.main import cli
from tests.conftest import AgeIdentity, SopsProject

CANARY = "sk-canary-7f3e9b2c4d5a6e8f1a2b3c4d"

KEY_FILE = """kind: api_key
id: {id}
provider: openrouter
api_key: {key}
purposes: [chat]
"""
SERVER_FILE = """kind: ai_server
id: {id}
server_type: vllm
base_url: http://127.0.0.1:8000/v1
purposes: [{purposes}]
enabled: {enabled}
"""


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli(*args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def project(sops_project: SopsProject, monkeypatch: pytest.MonkeyPatch) -> SopsProject:
    """A project with one encrypted key, one server and routing, as the working directory."""
    monkeypatch.chdir(sops_project.root)
    add_key(sops_project, "openrouter-main", CANARY)
    add_server(sops_project, "gpu")
    (sops_project.providers / "routing.yaml").write_text(
        "kind: routing\npurposes:\n  chat:\n    primary: [openrouter-main]\n    fallbacks: [gpu]\n"
    )
    return sops_project


def add_key(project: SopsProject, provider_id: str, key: str) -> Path:
    path = project.providers / f"{provider_id}.yaml"
    path.write_text(KEY_FILE.format(id=provider_id, key=key))
    project.sops.encrypt_in_place(path)
    return path


def add_server(project: SopsProject, provider_id: str, purposes: str = "chat", enabled: str = "true") -> Path:
    path = project.providers / f"{provider_id}.yaml"
    path.write_text(SERVER_FILE.format(id=provider_id, purposes=purposes, enabled=enabled))
    return path


def use_key(monkeypatch: pytest.MonkeyPatch, identity: AgeIdentity) -> None:
    monkeypatch.setenv("SOPS_AGE_KEY_FILE", str(identity.key_file))


def test_a_valid_folder_passes_without_any_key(
    project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "validate", "providers.d")
    assert (code, out) == (0, "")
    assert "3 file(s) checked: ok" in err


def test_the_shipped_examples_pass(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(__file__).parents[2])
    code, out, _ = run(capsys, "validate", "providers.d")
    assert (code, out) == (0, "")


def test_validate_with_decrypt_round_trips(
    project: SopsProject, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    use_key(monkeypatch, project.identity)
    code, out, err = run(capsys, "validate", "--decrypt")
    assert (code, out) == (0, ""), err
    assert CANARY not in out + err


def test_routing_to_missing_disabled_and_wrong_purpose_providers(
    project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    add_server(project, "offline", enabled="false")
    add_server(project, "embedder", purposes="embeddings")
    (project.providers / "routing.yaml").write_text(
        "kind: routing\npurposes:\n  chat:\n    primary: [openrouter-main, ghost]\n"
        "    fallbacks:\n      - offline\n      - embedder\n"
    )
    code, out, _ = run(capsys, "validate", "providers.d")
    assert code == 1
    assert out.splitlines() == [
        "providers.d/routing.yaml:4: error: routing for `chat` names `ghost`, which does not exist",
        "providers.d/routing.yaml:6: error: routing for `chat` names `offline`, which is disabled",
        "providers.d/routing.yaml:7: error: routing for `chat` names `embedder`, "
        "whose purposes (embeddings) lack `chat`",
    ]


def test_routing_that_names_a_refused_provider_is_not_told_it_does_not_exist(
    project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    """The service keeps such routing (docs/reference.md §4: a refused provider file stays known
    to routing): the one problem is the provider file's own."""
    (project.providers / "gpu.yaml").write_text("kind: ai_server\nid: gpu\nserver_typo: vllm\n")
    for args in (("validate", "providers.d"), ("validate", "providers.d/gpu.yaml")):
        code, out, _ = run(capsys, *args)
        assert code == 1
        assert out.splitlines() and all(line.startswith("providers.d/gpu.yaml:") for line in out.splitlines())
        assert "does not exist" not in out


def test_two_routing_files_are_refused(project: SopsProject, capsys: pytest.CaptureFixture[str]) -> None:
    (project.providers / "routing-b.yaml").write_text("kind: routing\npurposes: {}\n")
    code, out, _ = run(capsys, "validate", "providers.d")
    assert code == 1
    none = "none is applied while there is more than one"
    assert out.splitlines() == [
        "providers.d/routing-b.yaml:1: error: more than one routing file: "
        f"providers.d/routing.yaml also defines `kind: routing`; {none}",
        "providers.d/routing.yaml:1: error: more than one routing file: "
        f"providers.d/routing-b.yaml also defines `kind: routing`; {none}",
    ]


def test_all_problems_of_all_files_are_reported_in_one_run(
    project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    (project.providers / "plain.yaml").write_text(KEY_FILE.format(id="plain", key=CANARY))
    (project.providers / "typo.yaml").write_text(
        SERVER_FILE.format(id="typo", purposes="chat", enabled="true") + "modle: x\n"
    )
    (project.providers / "empty.yaml").write_text("")
    (project.providers / "big.yaml").write_bytes(b"#" * (2 << 20))
    (project.providers / "two.yaml").write_text("kind: routing\n---\nkind: routing\n")
    (project.providers / "garbage.yaml").write_bytes(bytes(range(256)) * 4)
    (project.providers / "notes.txt~").write_text("ignored")
    code, out, err = run(capsys, "validate", "providers.d")
    assert code == 1
    lines = out.splitlines()
    assert "providers.d/big.yaml:1: error: file is 2,097,152 bytes; the limit is 1,048,576 (1 MiB)" in lines
    assert "providers.d/empty.yaml:1: error: file is empty; expected a mapping with a `kind`" in lines
    assert "providers.d/garbage.yaml:2: error: not UTF-8 text (a binary file?)" in lines
    assert (
        "providers.d/plain.yaml:4: error: `api_key` is in plaintext; encrypt it before committing: "
        "switchboard encrypt providers.d/plain.yaml"
    ) in lines
    assert (
        "providers.d/two.yaml:2: error: YAML syntax: more than one YAML document; a file holds exactly one"
        in lines
    )
    assert "providers.d/typo.yaml:7: error: unknown field `modle`; did you mean `models`?" in lines
    assert len(lines) == 6
    assert CANARY not in out + err


def test_github_and_json_formats(project: SopsProject, capsys: pytest.CaptureFixture[str]) -> None:
    (project.providers / "bad.yaml").write_text(
        "kind: ai_server\nid: bad\nserver_type: gpu\nbase_url: http://h\n"
    )
    code, out, _ = run(capsys, "validate", "--format", "github", "providers.d")
    assert code == 1
    assert out.strip() == (
        "::error file=providers.d/bad.yaml,line=3::`server_type`: Input should be 'vllm', 'ollama', "
        "'llamacpp', 'tgi', 'lmstudio', 'tei', 'infinity' or 'openai_compatible'"
    )
    code, out, _ = run(capsys, "validate", "--format", "json", "providers.d")
    report = json.loads(out)
    assert (code, report["ok"], report["files"]) == (1, False, 4)
    assert report["problems"][0]["file"] == "providers.d/bad.yaml"
    assert report["problems"][0]["line"] == 3


def test_a_single_file_is_checked_against_its_siblings(
    project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    (project.providers / "gpu.yaml").unlink()
    code, out, _ = run(capsys, "validate", "providers.d/routing.yaml")
    assert code == 1
    assert (
        out.strip()
        == "providers.d/routing.yaml:5: error: routing for `chat` names `gpu`, which does not exist"
    )


def test_a_tampered_ciphertext_is_refused(
    project: SopsProject, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    use_key(monkeypatch, project.identity)
    path = project.providers / "openrouter-main.yaml"
    text = path.read_text()
    data = re.search(r"api_key: ENC\[AES256_GCM,data:([^,]+),", text)
    assert data is not None
    flipped = ("A" if data.group(1)[0] != "A" else "B") + data.group(1)[1:]
    path.write_text(text.replace(data.group(1), flipped))
    code, out, err = run(capsys, "validate", "--decrypt", "providers.d")
    assert code == 1
    assert out.strip() == (
        "providers.d/openrouter-main.yaml:4: error: "
        "an encrypted value was tampered with (restore the file from git)"
    )
    assert CANARY not in out + err


def test_a_cleartext_field_edited_without_sops_is_a_mac_mismatch(
    project: SopsProject, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    use_key(monkeypatch, project.identity)
    path = project.providers / "openrouter-main.yaml"
    path.write_text(path.read_text().replace("- chat", "- chat\n    - embeddings"))
    code, out, _ = run(capsys, "validate", "--decrypt", "providers.d")
    assert code == 1
    assert "providers.d/openrouter-main.yaml:" in out
    assert "MAC mismatch: the file was changed without sops" in out
    # Without --decrypt the change is a valid file: the MAC needs the key.
    assert run(capsys, "validate", "providers.d")[0] == 0


def test_a_mac_over_the_secrets_only_is_refused(
    project: SopsProject, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/reference.md §2.4: the MAC "covers every value of the file, not only the secrets
    (sops' default; never `mac_only_encrypted`): a URL in a file that holds a key cannot be
    changed without that key". A rule asking for it, and a file made under one, are refused:
    such a file's URL could be pointed anywhere, and sops would still decrypt it."""
    use_key(monkeypatch, project.identity)
    config = project.root / ".sops.yaml"
    config.write_text(config.read_text().replace("    age:", "    mac_only_encrypted: true\n    age:"))
    path = project.providers / "other.yaml"
    path.write_text(KEY_FILE.format(id="other", key=CANARY) + "base_url: https://openrouter.ai/api/v1\n")
    assert run(capsys, "encrypt", "providers.d/other.yaml")[0] == 0
    path.write_text(path.read_text().replace("https://openrouter.ai/", "https://attacker.example/"))
    for args in (("validate", "providers.d"), ("validate", "--decrypt", "providers.d")):
        code, out, err = run(capsys, *args)
        assert code == 1
        assert re.search(r"^providers\.d/other\.yaml:\d+: error: .*`mac_only_encrypted`", out, re.M)
        assert re.search(r"^\.sops\.yaml:1: error: .*sets mac_only_encrypted", out, re.M)
        assert CANARY not in out + err


def test_a_file_encrypted_for_someone_else_cannot_be_decrypted(
    project: SopsProject,
    other_age_identity: AgeIdentity,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_key(monkeypatch, other_age_identity)
    code, out, err = run(capsys, "validate", "--decrypt", "providers.d")
    assert code == 1
    assert "providers.d/openrouter-main.yaml:" in out
    assert "cannot decrypt: no age identity here matches the file's recipients" in out
    assert CANARY not in out + err


def test_a_sops_config_that_does_not_cover_the_files_is_reported(
    project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    (project.root / ".sops.yaml").write_text(
        "creation_rules:\n  - path_regex: secrets/.*\\.yaml$\n    age: " + project.identity.recipient + "\n"
    )
    code, out, _ = run(capsys, "validate", "providers.d")
    assert code == 1
    assert "no creation rule in .sops.yaml covers this file" in out


def test_keygen_encrypt_validate_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "providers.d").mkdir()
    key_file = tmp_path / "keys" / "me.txt"
    code, out, _ = run(capsys, "keygen", "--key-file", str(key_file))
    assert code == 0
    assert "AGE-SECRET-KEY" not in out
    recipient = re.search(r"age1[0-9a-z]+", out)
    assert recipient is not None
    assert recipient.group(0) in (tmp_path / ".sops.yaml").read_text()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    (tmp_path / "providers.d" / "mine.yaml").write_text(KEY_FILE.format(id="mine", key=CANARY))
    assert run(capsys, "validate")[0] == 1
    monkeypatch.setenv("SOPS_AGE_KEY_FILE", str(key_file))
    code, out, err = run(capsys, "encrypt", "providers.d/mine.yaml")
    assert code == 0, err
    assert CANARY not in (tmp_path / "providers.d" / "mine.yaml").read_text()
    code, out, err = run(capsys, "validate", "--decrypt")
    assert (code, out) == (0, ""), err

    before = key_file.read_bytes()
    code, _, err = run(capsys, "keygen", "--key-file", str(key_file))
    assert code == 1
    assert "already exists" in err
    assert key_file.read_bytes() == before


def test_keygen_without_a_key_file_writes_where_sops_age_key_file_points(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`SOPS_AGE_KEY_FILE` is where sops (and the service) read the identity: a new one made
    without `--key-file` goes there, not to the default place no one would read it from."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "providers.d").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    key_file = tmp_path / "keys" / "from-env.txt"
    monkeypatch.setenv("SOPS_AGE_KEY_FILE", str(key_file))
    code, out, err = run(capsys, "keygen")
    assert code == 0, err
    assert f"identity: {key_file}" in out and key_file.is_file()
    assert not (tmp_path / "home" / ".config" / "sops" / "age" / "keys.txt").exists()


def test_an_all_digit_key_is_encrypted_as_the_string_it_was_typed_as(
    project: SopsProject, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """YAML reads `api_key: 123456789012345` as a number, which sops encrypts as `type:int`: the
    service then could not use it. `encrypt` quotes it first (docs/reference.md §2.4)."""
    use_key(monkeypatch, project.identity)
    keys = {"digits": "012345678901234", "hex": "0x1F", "float": "1e5", "flag": "yes"}
    for provider_id, key in keys.items():
        path = project.providers / f"{provider_id}.yaml"
        path.write_text(
            KEY_FILE.format(id=provider_id, key=f"{key}  # typed unquoted").replace("purposes: [chat]\n", "")
        )
        code, _, err = run(capsys, "encrypt", str(path))
        assert code == 0, err
        assert re.search(r"^api_key: ENC\[AES256_GCM,.*,type:str\]$", path.read_text(), re.M), (
            path.read_text()
        )
        assert project.sops.decrypt(path.read_bytes(), str(path))["api_key"] == key
    code, out, err = run(capsys, "validate", "--decrypt")
    assert (code, out) == (0, ""), out + err


def test_a_key_sops_encrypted_as_a_number_is_an_error_saying_to_quote_it(
    project: SopsProject, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encrypted by sops itself (or an older `encrypt`): `validate` says so, with or without the
    identity, and so does the service's refusal, not "did not decrypt"."""
    use_key(monkeypatch, project.identity)
    path = project.providers / "numkey.yaml"
    text = KEY_FILE.format(id="numkey", key="123456789012345")
    path.write_bytes(project.sops.encrypt(text.encode(), str(path)))
    assert ",type:int]" in path.read_text()
    expected = (
        "providers.d/numkey.yaml:4: error: `api_key` must be a string: quote it "
        '(`api_key: "0123…"`) and encrypt the file again'
    )
    for flags in ([], ["--decrypt"]):
        code, out, _ = run(capsys, "validate", *flags, "providers.d")
        assert (code, out.strip()) == (1, expected)


def test_schema_check_fails_when_stale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "schema", "--check")[0] == 1
    assert run(capsys, "schema")[0] == 0
    assert run(capsys, "schema", "--check")[0] == 0
    schema = json.loads((tmp_path / "schemas" / "api_key.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert "sops" in schema["properties"]
    (tmp_path / "schemas" / "routing.schema.json").write_text("{}")
    code, _, err = run(capsys, "schema", "--check")
    assert code == 1
    assert "routing.schema.json: stale" in err


def test_the_checked_in_schemas_are_current(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(__file__).parents[2])
    assert run(capsys, "schema", "--check")[0] == 0


def test_wrong_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli("validate", "--format", "xml")
    assert caught.value.code == 2


def test_a_missing_path_is_an_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "validate", "nowhere")
    assert code == 1
    assert err.strip() == "switchboard: error: nowhere: no such file or folder"


def test_a_link_out_of_the_repository_is_reported_unread(
    project: SopsProject, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The service refuses it (docs/reference.md §4): CI must say so before it is merged."""
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("kind: ai_server\nid: [\n")  # would be a syntax error, if it were read
    (project.providers / "stolen.yaml").symlink_to(outside)
    (project.providers / "nowhere-here.yaml").symlink_to("/run/secrets/on-the-replica.yaml")
    (project.providers / "dangling.yaml").symlink_to("missing.yaml")  # inside, to nothing: skipped
    (project.root / "shared").mkdir()
    (project.root / "shared" / "spare.yaml").write_text(
        SERVER_FILE.format(id="spare", purposes="chat", enabled="true")
    )
    (project.providers / "spare.yaml").symlink_to(Path("..") / "shared" / "spare.yaml")  # inside: fine
    code, out, _ = run(capsys, "validate")
    assert code == 1
    why = "a symbolic link out of the repository (or into its .git): the service refuses it unread"
    assert out.splitlines() == [
        f"providers.d/nowhere-here.yaml:1: error: {why}",
        f"providers.d/stolen.yaml:1: error: {why}",
    ]
    code, out, _ = run(capsys, "validate", "providers.d/spare.yaml")
    assert (code, out) == (0, "")


def test_a_fifo_or_a_file_over_the_limit_is_refused_without_being_read_whole(
    project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/reference.md §3: "no more than 1 MiB"; a FIFO named on the command line used to
    block `validate` for ever, waiting for a writer."""
    os.mkfifo(project.providers / "fifo.yaml")
    (project.providers / "big.yaml").write_bytes(b"kind: routing\n" + b"#" * (1 << 20))
    code, out, _ = run(capsys, "validate", "providers.d/fifo.yaml", "providers.d/big.yaml")
    assert code == 1
    assert out.splitlines() == [
        "providers.d/big.yaml:1: error: file is 1,048,590 bytes; the limit is 1,048,576 (1 MiB)",
        "providers.d/fifo.yaml:1: error: cannot read: not a regular file",
    ]


def test_a_file_name_holding_a_line_break_is_shown_escaped_on_its_one_line(
    project: SopsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/reference.md §3: `validate` prints one line per problem, `FILE:LINE: error: MESSAGE`;
    a file's name (a pull request chooses it) must not start a line of its own, a forged
    problem line in a CI log."""
    name = "a.yaml:1: error: forged\nz.yaml"
    (project.providers / name).write_text(SERVER_FILE.format(id="x", purposes="chat", enabled="true"))
    code, out, _ = run(capsys, "validate", "providers.d")
    assert code == 1
    assert out.splitlines() == [
        "providers.d/a.yaml:1: error: forged\\nz.yaml:2: error: `id` is 'x' but the file is named "
        "'a.yaml:1: error: forged\\nz'; they must be equal"
    ]
