"""Age identities and the `.sops.yaml` that names their recipients.

An identity is written once, in age's `keys.txt` format, mode 0600, never overwritten.
`.sops.yaml` is edited by a YAML round trip: keys and rule order are kept, the comment block
at the top of the file is kept, other comments are lost (PyYAML does not carry them). The
rule Switchboard needs (SPEC 2.4) is created when no rule covers `providers.d/`.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyrage
import yaml

from service.errors import ConfigError, KeyFileExists, Problem
from service.files import write_atomically

PROVIDERS_PATH_REGEX = r"providers.d/.*\.ya?ml$"
ENCRYPTED_REGEX = r"^(api_key)$"
_SAMPLE_PROVIDER_FILE = "providers.d/example.yaml"


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


def load_sops_config(path: Path) -> dict[str, Any]:
    """The parsed `.sops.yaml`; `{}` when the file does not exist. Raises ConfigError if malformed."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        raise ConfigError([Problem(str(path), line, "not valid YAML")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([Problem(str(path), 1, "must be a mapping with `creation_rules`")])
    rules = data.get("creation_rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise ConfigError([Problem(str(path), 1, "`creation_rules` must be a list of mappings")])
    return data


def _rule_for(rules: list[dict[str, Any]], relpath: str) -> dict[str, Any] | None:
    """The first rule whose path_regex matches, as sops chooses (no path_regex matches all)."""
    for rule in rules:
        regex = rule.get("path_regex")
        if regex is None:
            return rule
        try:
            if re.search(str(regex), relpath):
                return rule
        except re.error:
            continue
    return None


def _age_list(value: Any) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def _rule_recipients(rule: dict[str, Any]) -> list[str]:
    found = _age_list(rule.get("age"))
    for group in rule.get("key_groups") or []:
        if isinstance(group, dict):
            found += _age_list(group.get("age"))
    return found


def recipients(path: Path) -> list[str]:
    """The age recipients of the rule that covers `providers.d/` files (empty if none)."""
    rule = _rule_for(load_sops_config(path).get("creation_rules", []), _SAMPLE_PROVIDER_FILE)
    return _rule_recipients(rule) if rule is not None else []


def _check_recipient(path: Path, recipient: str) -> None:
    try:
        pyrage.x25519.Recipient.from_str(recipient)
    except pyrage.RecipientError:
        raise ConfigError([Problem(str(path), 0, f"not an age recipient: {recipient!r}")]) from None


def add_recipient(path: Path, recipient: str) -> bool:
    """Add `recipient` to the `providers.d/` rule, creating the SPEC rule first when none covers it.

    Returns False when the recipient was already there (nothing is written).
    """
    path = Path(path)
    _check_recipient(path, recipient)
    config = load_sops_config(path)
    rules: list[dict[str, Any]] = config.setdefault("creation_rules", [])
    rule = _rule_for(rules, _SAMPLE_PROVIDER_FILE)
    if rule is None:
        # First, so that no later catch-all rule shadows it (the first match wins).
        rules.insert(
            0,
            {"path_regex": PROVIDERS_PATH_REGEX, "encrypted_regex": ENCRYPTED_REGEX, "age": recipient},
        )
    elif recipient in _rule_recipients(rule):
        return False
    elif "key_groups" in rule:
        raise ConfigError([Problem(str(path), 0, "the providers.d rule uses key_groups; edit it by hand")])
    else:
        rule["age"] = _with_age(rule.get("age"), [*_age_list(rule.get("age")), recipient])
    _write_config(path, config)
    return True


def remove_recipient(path: Path, recipient: str) -> bool:
    """Remove `recipient` from the `providers.d/` rule; False when it was not there.

    Refuses (ConfigError) to remove the last recipient: nobody could encrypt any more.
    """
    path = Path(path)
    config = load_sops_config(path)
    rule = _rule_for(config.get("creation_rules", []), _SAMPLE_PROVIDER_FILE)
    if rule is None or recipient not in _age_list(rule.get("age")):
        return False
    remaining = [r for r in _age_list(rule.get("age")) if r != recipient]
    if not remaining and not rule.get("key_groups"):
        raise ConfigError([Problem(str(path), 0, "refusing to remove the last age recipient")])
    rule["age"] = _with_age(rule.get("age"), remaining)
    _write_config(path, config)
    return True


def _with_age(old: Any, new: list[str]) -> str | list[str]:
    """Keep the shape the user chose: a YAML list stays a list, a string stays comma-separated."""
    return new if isinstance(old, list) else ",".join(new)


def _write_config(path: Path, config: dict[str, Any]) -> None:
    header = ""
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        for line in lines:
            if not line.lstrip().startswith("#"):
                break
            header += line
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=1000)
    write_atomically(path, (header + body).encode("utf-8"), mode=0o644)


def check_sops_config(path: Path, files: list[str]) -> list[str]:
    """Problems, in plain words, with how `.sops.yaml` at `path` covers the given provider files.

    `files` are paths relative to the directory of `.sops.yaml`, or absolute. For each, the
    first rule whose path_regex matches must encrypt `api_key` for at least one age recipient.
    """
    path = Path(path)
    if not path.exists():
        return [f"{path.name}: missing; run `switchboard keygen` to create it"]
    try:
        rules = load_sops_config(path).get("creation_rules", [])
    except ConfigError as exc:
        return [p.message if p.line == 0 else f"{path.name}:{p.line}: {p.message}" for p in exc.problems]
    root = path.resolve().parent
    problems: list[str] = []
    for number, rule in enumerate(rules, 1):
        try:
            re.compile(str(rule.get("path_regex", "")))
        except re.error:
            problems.append(
                f"creation rule {number} of {path.name}: path_regex is not a valid regular expression"
            )
    for file in files:
        relpath = _relative_to(root, file)
        rule = _rule_for(rules, relpath)
        if rule is None:
            problems.append(f"{relpath}: no creation rule in {path.name} covers this file")
            continue
        problems += [f"{relpath}: {p}" for p in _rule_problems(rule, path.name, rules.index(rule) + 1)]
    return problems


def _relative_to(root: Path, file: str) -> str:
    p = Path(file)
    if not p.is_absolute():
        return p.as_posix()
    try:
        return p.resolve().relative_to(root).as_posix()
    except ValueError:
        return p.as_posix()


def _rule_problems(rule: dict[str, Any], config_name: str, number: int) -> list[str]:
    where = f"creation rule {number} of {config_name}"
    problems = []
    regex = rule.get("encrypted_regex")
    if regex is None:
        problems.append(
            f"{where} has no encrypted_regex, so sops would encrypt every field (want ^(api_key)$)"
        )
    else:
        try:
            if not re.search(str(regex), "api_key"):
                problems.append(f"{where}: encrypted_regex {regex!r} does not match api_key")
        except re.error:
            problems.append(f"{where}: encrypted_regex {regex!r} is not a valid regular expression")
    if not _rule_recipients(rule):
        problems.append(f"{where} has no age recipient")
    return problems
