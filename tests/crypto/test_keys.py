"""service.crypto.keys: age identity files and .sops.yaml rules, on real files."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import TYPE_CHECKING

import pyrage
import pytest
import yaml

from service.config import sops_rules
from service.crypto import keys
from service.crypto.sops import Sops
from service.errors import ConfigError, KeyFileExists

if TYPE_CHECKING:
    from conftest import AgeIdentity


def _recipient() -> str:
    return keys.generate_identity()[1]


def test_generate_identity_returns_a_matching_key_pair() -> None:
    secret, recipient = keys.generate_identity()
    assert secret.startswith("AGE-SECRET-KEY-1")
    assert recipient.startswith("age1")
    assert str(pyrage.x25519.Identity.from_str(secret).to_public()) == recipient


def test_default_key_file_is_where_sops_looks(tmp_path: Path) -> None:
    assert keys.default_key_file(tmp_path) == tmp_path / ".config/sops/age/keys.txt"
    assert keys.default_key_file(tmp_path, tmp_path / "xdg") == tmp_path / "xdg/sops/age/keys.txt"


def test_write_identity_makes_a_private_age_key_file(tmp_path: Path) -> None:
    path = keys.default_key_file(tmp_path)
    recipient = keys.write_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for directory in (path.parent, path.parent.parent, path.parent.parent.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    created, public, secret = path.read_text().splitlines()
    assert created.startswith("# created: ")
    assert public == f"# public key: {recipient}"
    assert secret.startswith("AGE-SECRET-KEY-1")
    assert keys.identity_recipient(path) == recipient


def test_write_identity_never_overwrites_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    keys.write_identity(path)
    before = path.read_bytes()
    with pytest.raises(KeyFileExists, match="never overwrites") as info:
        keys.write_identity(path)
    assert path.read_bytes() == before
    assert "AGE-SECRET-KEY" not in str(info.value) + repr(info.value)


def test_identity_file_written_here_is_usable_by_sops(age_identity: AgeIdentity, tmp_path: Path) -> None:
    keys.add_recipient(tmp_path / ".sops.yaml", age_identity.recipient)
    (tmp_path / "providers.d").mkdir()
    sops = Sops(age_key_file=age_identity.key_file, project_root=tmp_path)
    data = sops.encrypt(b"id: x\napi_key: sk-test-1234567890\n", "providers.d/x.yaml")
    assert sops.decrypt(data, "providers.d/x.yaml")["api_key"] == "sk-test-1234567890"


def test_add_recipient_creates_the_spec_rule(tmp_path: Path) -> None:
    path, recipient = tmp_path / ".sops.yaml", _recipient()
    assert keys.add_recipient(path, recipient) is True
    assert yaml.safe_load(path.read_text()) == {
        "creation_rules": [
            {"path_regex": r"providers.d/.*\.ya?ml$", "encrypted_regex": "^(api_key)$", "age": recipient}
        ]
    }
    assert sops_rules.check_sops_config(path, ["providers.d/a.yaml", "providers.d/b.yml"]) == []


def test_add_recipient_twice_is_a_no_op(tmp_path: Path) -> None:
    path, recipient = tmp_path / ".sops.yaml", _recipient()
    keys.add_recipient(path, recipient)
    before = path.read_bytes()
    assert keys.add_recipient(path, recipient) is False
    assert path.read_bytes() == before


def test_add_recipient_appends_comma_separated_and_keeps_other_rules_and_header(tmp_path: Path) -> None:
    first, second = _recipient(), _recipient()
    path = tmp_path / ".sops.yaml"
    path.write_text(
        "# Project sops rules.\n"
        "creation_rules:\n"
        "  - path_regex: providers.d/.*\\.ya?ml$\n"
        "    encrypted_regex: ^(api_key)$\n"
        f"    age: {first}\n"
        "  - path_regex: secrets/.*\n"
        f"    age: {first}\n"
    )
    keys.add_recipient(path, second)
    text = path.read_text()
    assert text.startswith("# Project sops rules.\n")
    rules = yaml.safe_load(text)["creation_rules"]
    assert rules[0]["age"] == f"{first},{second}"
    assert rules[1] == {"path_regex": "secrets/.*", "age": first}
    assert sops_rules.recipients(path) == [first, second]


def test_add_recipient_keeps_a_yaml_list_a_list(tmp_path: Path) -> None:
    first, second = _recipient(), _recipient()
    path = tmp_path / ".sops.yaml"
    path.write_text(
        f"creation_rules:\n  - path_regex: providers.d/\n    encrypted_regex: api_key\n    age: [{first}]\n"
    )
    keys.add_recipient(path, second)
    assert yaml.safe_load(path.read_text())["creation_rules"][0]["age"] == [first, second]


def test_add_recipient_puts_a_new_rule_before_a_catch_all(tmp_path: Path) -> None:
    path, recipient = tmp_path / ".sops.yaml", _recipient()
    path.write_text("creation_rules:\n  - path_regex: ^other/\n    age: " + _recipient() + "\n")
    keys.add_recipient(path, recipient)
    assert yaml.safe_load(path.read_text())["creation_rules"][0]["age"] == recipient


def test_add_recipient_rejects_what_is_not_an_age_recipient(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an age recipient"):
        keys.add_recipient(tmp_path / ".sops.yaml", "age1notreally")
    assert not (tmp_path / ".sops.yaml").exists()


def test_remove_recipient_drops_it_but_never_the_last(tmp_path: Path) -> None:
    first, second = _recipient(), _recipient()
    path = tmp_path / ".sops.yaml"
    keys.add_recipient(path, first)
    keys.add_recipient(path, second)
    assert keys.remove_recipient(path, first) is True
    assert sops_rules.recipients(path) == [second]
    assert keys.remove_recipient(path, first) is False
    with pytest.raises(ConfigError, match="last age recipient"):
        keys.remove_recipient(path, second)
    assert sops_rules.recipients(path) == [second]


def test_recipients_of_a_missing_config_is_empty(tmp_path: Path) -> None:
    assert sops_rules.recipients(tmp_path / ".sops.yaml") == []


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("creation_rules:\n  - path_regex: a\n    age: age1x\ncreation_rules: []\n", 4),
        ("creation_rules:\n  - path_regex: a\n    age: age1x\n    age: age1y\n", 4),
    ],
)
def test_load_sops_config_refuses_a_duplicate_key_as_sops_does(tmp_path: Path, text: str, line: int) -> None:
    """sops refuses to load a `.sops.yaml` with a key twice; PyYAML took the last one, so
    `validate` checked rules sops never reads (a review found it)."""
    path = tmp_path / ".sops.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        sops_rules.load_sops_config(path)
    (problem,) = raised.value.problems
    assert (problem.line, problem.message) == (line, "duplicate key: sops refuses to load it")


def test_load_sops_config_reports_invalid_yaml_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / ".sops.yaml"
    path.write_text("creation_rules:\n  - path_regex: [\n")
    with pytest.raises(ConfigError) as info:
        sops_rules.load_sops_config(path)
    assert info.value.problems[0].line >= 2


def test_check_sops_config_reports_a_missing_file(tmp_path: Path) -> None:
    assert sops_rules.check_sops_config(tmp_path / ".sops.yaml", ["providers.d/a.yaml"]) == [
        ".sops.yaml: missing; run `switchboard keygen` to create it"
    ]


def test_check_sops_config_reports_files_no_rule_covers(tmp_path: Path) -> None:
    path = tmp_path / ".sops.yaml"
    path.write_text(
        f"creation_rules:\n  - path_regex: ^providers.d/a\\.yaml$\n    encrypted_regex: ^(api_key)$\n"
        f"    age: {_recipient()}\n"
    )
    problems = sops_rules.check_sops_config(
        path, ["providers.d/a.yaml", str(tmp_path / "providers.d/b.yaml")]
    )
    assert problems == ["providers.d/b.yaml: no creation rule in .sops.yaml covers this file"]


def test_check_sops_config_uses_the_first_matching_rule_like_sops(tmp_path: Path) -> None:
    path = tmp_path / ".sops.yaml"
    path.write_text(
        f"creation_rules:\n  - age: {_recipient()}\n"
        f"  - path_regex: providers.d/\n    encrypted_regex: ^(api_key)$\n    age: {_recipient()}\n"
    )
    [problem] = sops_rules.check_sops_config(path, ["providers.d/a.yaml"])
    assert problem.startswith("providers.d/a.yaml: creation rule 1 of .sops.yaml has no encrypted_regex")


def test_check_sops_config_wants_api_key_encrypted_for_an_age_recipient(tmp_path: Path) -> None:
    path = tmp_path / ".sops.yaml"
    path.write_text("creation_rules:\n  - path_regex: providers.d/\n    encrypted_regex: ^(password)$\n")
    assert sops_rules.check_sops_config(path, ["providers.d/a.yaml"]) == [
        "providers.d/a.yaml: creation rule 1 of .sops.yaml: "
        "encrypted_regex '^(password)$' does not match api_key",
        "providers.d/a.yaml: creation rule 1 of .sops.yaml has no age recipient",
    ]


@pytest.mark.parametrize(
    ("regex", "matched"),
    [
        (".*", "base_url, budget, cache_write, cached_input, clients"),
        ("^(api_key|base_url)$", "base_url"),
        ("key", "api_key"),  # not a readable field: only the secret
    ],
)
def test_check_sops_config_wants_every_field_but_the_secret_readable(
    tmp_path: Path, regex: str, matched: str
) -> None:
    """docs/reference.md §2.4: "Only secret fields are encrypted, so ids, URLs and routing stay
    readable and reviewable in a pull request"; a wider `encrypted_regex` hides them."""
    path = tmp_path / ".sops.yaml"
    rule = f"  - path_regex: providers.d/\n    encrypted_regex: '{regex}'\n    age: {_recipient()}\n"
    path.write_text("creation_rules:\n" + rule)
    problems = sops_rules.check_sops_config(path, ["providers.d/a.yaml"])
    if matched == "api_key":
        assert problems == []
    else:
        assert len(problems) == 1
        where = "providers.d/a.yaml: creation rule 1 of .sops.yaml"
        assert problems[0].startswith(f"{where}: encrypted_regex {regex!r} also matches {matched}")
        assert problems[0].endswith("which must stay readable for review (want ^(api_key)$)")


def test_check_sops_config_reports_a_posix_class_that_sops_reads_otherwise(tmp_path: Path) -> None:
    """docs/reference.md §2.4: `encrypted_regex` matching api_key "and no other field". sops reads
    it as Go does, where `[[:lower:]]` is the lower-case letters; Python's `re` reads the same
    text as a set of `[:lowe` and a `]`, so the check saw no field but api_key matched while sops
    encrypted `base_url`."""
    regex = "^(api_key|[[:lower:]]+_url)$"
    path = tmp_path / ".sops.yaml"
    recipient = _recipient()
    rule = f"  - path_regex: providers.d/\n    encrypted_regex: '{regex}'\n    age: {recipient}\n"
    path.write_text("creation_rules:\n" + rule)
    plain = b"kind: ai_server\nid: a\nserver_type: vllm\nbase_url: http://h/v1\napi_key: sk-1\n"
    encrypted = Sops(project_root=tmp_path).encrypt(plain, "providers.d/a.yaml")
    assert yaml.safe_load(encrypted)["base_url"].startswith("ENC[")  # as sops reads the rule
    assert sops_rules.check_sops_config(path, ["providers.d/a.yaml"]) == [
        "providers.d/a.yaml: creation rule 1 of .sops.yaml: encrypted_regex "
        f"{regex!r} holds a character class `[:lower:]`, which sops reads otherwise than this check; "
        "spell its characters out (want ^(api_key)$)"
    ]


def test_check_sops_config_reports_a_posix_class_in_a_path_regex(tmp_path: Path) -> None:
    """docs/reference.md §2.4: the first rule whose `path_regex` matches "(as sops chooses)" is
    checked. sops reads `[[:lower:]]` as the lower-case letters, so it chose a first rule (here
    with `mac_only_encrypted`) that this check, reading the text otherwise, passed over."""
    recipient = _recipient()
    path = tmp_path / ".sops.yaml"
    path.write_text(
        "creation_rules:\n"
        "  - path_regex: providers\\.d/[[:lower:]]\n    encrypted_regex: ^(api_key)$\n"
        f"    age: {recipient}\n    mac_only_encrypted: true\n"
        f"  - path_regex: providers.d/\n    encrypted_regex: ^(api_key)$\n    age: {recipient}\n"
    )
    plain = b"kind: api_key\nid: a\nprovider: openai\napi_key: sk-1\n"
    encrypted = Sops(project_root=tmp_path).encrypt(plain, "providers.d/a.yaml")
    assert yaml.safe_load(encrypted)["sops"]["mac_only_encrypted"] is True  # sops chose rule 1
    assert (
        "creation rule 1 of .sops.yaml: path_regex 'providers\\\\.d/[[:lower:]]' holds a character "
        "class `[:lower:]`, which sops reads otherwise than this check; spell its characters out"
        in (sops_rules.check_sops_config(path, ["providers.d/a.yaml"]))
    )


def test_check_sops_config_reports_an_invalid_regex(tmp_path: Path) -> None:
    path = tmp_path / ".sops.yaml"
    path.write_text(f"creation_rules:\n  - path_regex: providers.d/(\n    age: {_recipient()}\n")
    problems = sops_rules.check_sops_config(path, ["providers.d/a.yaml"])
    assert "creation rule 1 of .sops.yaml: path_regex is not a valid regular expression" in problems


def test_recipients_change_and_every_comment_and_the_layout_of_sops_yaml_stay(tmp_path: Path) -> None:
    first, second, third = _recipient(), _recipient(), _recipient()
    path = tmp_path / ".sops.yaml"
    original = (
        "# Project sops rules.\n"
        "creation_rules:\n"
        "  # provider files: only the key is encrypted\n"
        "  - path_regex: providers.d/.*\\.ya?ml$\n"
        "    encrypted_regex: '^(api_key)$'  # keep ids and URLs reviewable\n"
        "    age:\n"
        f"      - {first}  # ops laptop\n"
        "  # everything else\n"
        "  - path_regex: secrets/.*\n"
        f"    age: {first}\n"
    )
    path.write_text(original)

    keys.add_recipient(path, second)
    keys.add_recipient(path, third)
    keys.remove_recipient(path, second)

    assert path.read_text() == original.replace(
        f"      - {first}  # ops laptop\n", f"      - {first}  # ops laptop\n      - {third}\n"
    )
    assert sops_rules.recipients(path) == [first, third]
