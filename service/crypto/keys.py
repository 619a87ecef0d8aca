"""Age identities and the `.sops.yaml` that names their recipients.

An identity is written once, in age's `keys.txt` format, mode 0600, never overwritten.
`.sops.yaml` is edited by a ruamel.yaml round trip: every comment, the key and rule order,
quoting and the file's indentation are kept, and only the recipients change. The rule
Switchboard needs (docs/reference.md §2.4) is created when no rule covers `providers.d/`.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pyrage

from service.config.roundtrip import CommentedMap, CommentedSeq, Document, YAMLError, append
from service.config.sops_rules import (
    ENCRYPTED_REGEX,
    PROVIDERS_PATH_REGEX,
    SAMPLE_PROVIDER_FILE,
    age_list,
    load_sops_config,
    rule_for,
    rule_recipients,
)
from service.errors import ConfigError, KeyFileExists, Problem
from service.files import write_atomically


def generate_identity() -> tuple[str, str]:
    """A new age X25519 identity: (its secret key text, its recipient `age1…`)."""
    identity = pyrage.x25519.Identity.generate()
    return str(identity), str(identity.to_public())


def default_key_file(home: Path, config_home: Path | None = None) -> Path:
    """Where sops looks for age identities: `$XDG_CONFIG_HOME/sops/age/keys.txt`, else `~/.config/…`."""
    return (config_home if config_home is not None else home / ".config") / "sops" / "age" / "keys.txt"


def write_identity(path: Path) -> str:
    """Generate an identity into a new key file at `path` (0600, parents 0700); returns its recipient.

    Raises KeyFileExists when `path` exists: an identity is never overwritten.
    """
    path = Path(path)
    missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)
    secret, recipient = generate_identity()
    created = datetime.now(UTC).replace(microsecond=0).isoformat()
    text = f"# created: {created}\n# public key: {recipient}\n{secret}\n"
    try:
        # O_EXCL: a file (or symlink) created meanwhile by someone else is not overwritten either.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileExists(f"{path}: an identity file already exists; keygen never overwrites one") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return recipient


def recipients_of(identities: str) -> set[str]:
    """The recipients of every age identity in `identities` (a key file's text, or SOPS_AGE_KEY)."""
    found = set()
    for line in identities.splitlines():
        if line.strip().startswith("AGE-SECRET-KEY-"):
            try:
                found.add(str(pyrage.x25519.Identity.from_str(line.strip()).to_public()))
            except pyrage.IdentityError:
                continue
    return found


def identity_recipient(path: Path) -> str:
    """The recipient of the first identity in an age key file (to report an existing one)."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("AGE-SECRET-KEY-"):
            try:
                return str(pyrage.x25519.Identity.from_str(line.strip()).to_public())
            except pyrage.IdentityError:
                break
    raise ConfigError([Problem(str(path), 0, "no valid age identity in this key file")])


# -- .sops.yaml --------------------------------------------------------------------------


def is_recipient(text: str) -> bool:
    """Whether `text` is an age X25519 recipient (`age1…`)."""
    try:
        pyrage.x25519.Recipient.from_str(text)
    except pyrage.RecipientError:
        return False
    return True


def _check_recipient(path: Path, recipient: str) -> None:
    if not is_recipient(recipient):
        raise ConfigError([Problem(str(path), 0, f"not an age recipient: {recipient!r}")])


def add_recipient(path: Path, recipient: str) -> bool:
    """Add `recipient` to the `providers.d/` rule, creating the documented rule first when none covers it.

    Returns False when the recipient was already there (nothing is written).
    """
    path = Path(path)
    _check_recipient(path, recipient)
    document = _edit(path)
    config = document.data
    rules = config.setdefault("creation_rules", CommentedSeq())
    rule = rule_for(rules, SAMPLE_PROVIDER_FILE)
    if rule is None:
        # First, so that no later catch-all rule shadows it (the first match wins).
        fields = [
            ("path_regex", PROVIDERS_PATH_REGEX),
            ("encrypted_regex", ENCRYPTED_REGEX),
            ("age", recipient),
        ]
        rules.insert(0, CommentedMap(fields))
    elif recipient in rule_recipients(rule):
        return False
    elif "key_groups" in rule:
        raise ConfigError([Problem(str(path), 0, "the providers.d rule uses key_groups; edit it by hand")])
    elif isinstance(rule.get("age"), list):
        append(rule["age"], recipient)  # in place: the list keeps its comments and its style
    else:
        rule["age"] = ",".join([*age_list(rule.get("age")), recipient])
    _write(path, document)
    return True


def remove_recipient(path: Path, recipient: str) -> bool:
    """Remove `recipient` from the `providers.d/` rule; False when it was not there.

    Refuses (ConfigError) to remove the last recipient: nobody could encrypt any more.
    """
    path = Path(path)
    document = _edit(path)
    rule = rule_for(document.data.get("creation_rules", []), SAMPLE_PROVIDER_FILE)
    if rule is None or recipient not in age_list(rule.get("age")):
        return False
    remaining = [r for r in age_list(rule.get("age")) if r != recipient]
    if not remaining and not rule.get("key_groups"):
        raise ConfigError([Problem(str(path), 0, "refusing to remove the last age recipient")])
    age = rule.get("age")
    if isinstance(age, list):  # the shape the user chose: a YAML list stays a list
        for index in reversed(range(len(age))):
            if str(age[index]).strip() == recipient:
                del age[index]
    else:  # and a string stays comma-separated
        rule["age"] = ",".join(remaining)
    _write(path, document)
    return True


def _edit(path: Path) -> Document:
    """`.sops.yaml`, checked as sops reads it, loaded for an edit that keeps its comments."""
    load_sops_config(path)  # the checks, with their messages
    try:
        return Document.read(path)
    except YAMLError:  # valid for PyYAML, yet ruamel cannot keep it as written
        raise ConfigError([Problem(str(path), 0, "cannot be edited while keeping its comments")]) from None


def _write(path: Path, document: Document) -> None:
    write_atomically(path, document.dump().encode("utf-8"), mode=None if path.exists() else 0o644)
