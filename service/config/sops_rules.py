"""`.sops.yaml` read: which creation rule covers a file, its recipients, and what is wrong with it.

Reading only: `service.crypto.keys` edits the file (`keygen`, `rotate`). `validate` and the
write API check here that `.sops.yaml` encrypts `api_key` of every file that holds one,
for at least one age recipient (docs/reference.md §2.4).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from service.config.metering import Budget, Limits, Price
from service.config.models import MODELS, SECRET_FIELDS, Client, Route
from service.errors import ConfigError, Problem

PROVIDERS_PATH_REGEX = r"providers.d/.*\.ya?ml$"
ENCRYPTED_REGEX = r"^(api_key)$"
SAMPLE_PROVIDER_FILE = "providers.d/example.yaml"
"""A path the `providers.d/` rule must match, to find that rule."""
_READABLE_FIELDS = sorted(
    {
        name
        for model in (*MODELS.values(), Route, Client, Limits, Price, Budget)
        for name in model.model_fields
    }
    - set(SECRET_FIELDS)
)
"""Keys sops must leave readable: every field of every document but the secrets (sops' `encrypted_regex`
applies to keys at any depth)."""
_POSIX_CLASS = re.compile(r"\[:\^?[a-z]+:\]")
"""A POSIX class such as `[:lower:]`: sops reads its regular expressions as Go does, where
`[[:lower:]]` means the lower-case letters; Python's `re` reads `[:lowe` and a `]` instead."""


class _Duplicate(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


class _Unique(yaml.SafeLoader):
    """PyYAML's safe loader refusing a key twice in one mapping, as sops refuses it (PyYAML
    takes the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<`: merged by PyYAML, as by sops
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) or key is None:
                if key in seen:
                    raise _Duplicate(key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_sops_config(path: Path) -> dict[str, Any]:
    """The parsed `.sops.yaml`; `{}` when the file does not exist. Raises ConfigError if malformed."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Unique)  # noqa: S506 - a SafeLoader
    except _Duplicate as exc:
        raise ConfigError([Problem(str(path), exc.line, "duplicate key: sops refuses to load it")]) from None
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


def rule_for(rules: list[dict[str, Any]], relpath: str) -> dict[str, Any] | None:
    """The first rule whose path_regex matches, as sops chooses (no path_regex matches all)."""
    for rule in rules:
        regex = rule.get("path_regex")
        if regex is None:
            return rule
        if _POSIX_CLASS.search(str(regex)):  # read otherwise by sops: `check_sops_config` reports it
            continue
        try:
            if re.search(str(regex), relpath):
                return rule
        except re.error:
            continue
    return None


def age_list(value: Any) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def rule_recipients(rule: dict[str, Any]) -> list[str]:
    found = age_list(rule.get("age"))
    for group in rule.get("key_groups") or []:
        if isinstance(group, dict):
            found += age_list(group.get("age"))
    return found


def recipients(path: Path) -> list[str]:
    """The age recipients of the rule that covers `providers.d/` files (empty if none)."""
    rule = rule_for(load_sops_config(path).get("creation_rules", []), SAMPLE_PROVIDER_FILE)
    return rule_recipients(rule) if rule is not None else []


def every_recipient(data: bytes | None) -> set[str] | None:
    """The age recipients of every creation rule in `.sops.yaml`'s content (empty without one);
    None when it cannot be read, which `check_sops_config` reports."""
    try:
        parsed = yaml.safe_load(data) if data else None
    except yaml.YAMLError:
        return None
    rules = parsed.get("creation_rules") if isinstance(parsed, dict) else None
    if not isinstance(rules, list):
        return None if parsed else set()
    return {r for rule in rules if isinstance(rule, dict) for r in rule_recipients(rule)}


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
        if posix := _POSIX_CLASS.search(str(rule.get("path_regex", ""))):
            problems.append(
                f"creation rule {number} of {path.name}: path_regex {rule['path_regex']!r} holds a "
                f"character class `{posix.group()}`, which sops reads otherwise than this check; spell its "
                "characters out"
            )
            continue
        try:
            re.compile(str(rule.get("path_regex", "")))
        except re.error:
            problems.append(
                f"creation rule {number} of {path.name}: path_regex is not a valid regular expression"
            )
    for file in files:
        relpath = _relative_to(root, file)
        rule = rule_for(rules, relpath)
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
    elif posix := _POSIX_CLASS.search(str(regex)):
        problems.append(
            f"{where}: encrypted_regex {regex!r} holds a character class `{posix.group()}`, which sops "
            "reads otherwise than this check; spell its characters out (want ^(api_key)$)"
        )
    else:
        try:
            if not re.search(str(regex), "api_key"):
                problems.append(f"{where}: encrypted_regex {regex!r} does not match api_key")
            readable = [name for name in _READABLE_FIELDS if re.search(str(regex), name)]
            if readable:
                problems.append(
                    f"{where}: encrypted_regex {regex!r} also matches {', '.join(readable)}, which must stay "
                    "readable for review (want ^(api_key)$)"
                )
        except re.error:
            problems.append(f"{where}: encrypted_regex {regex!r} is not a valid regular expression")
    if rule.get("mac_only_encrypted") not in (None, False):
        problems.append(
            f"{where} sets mac_only_encrypted: the MAC would not cover the URLs and other cleartext "
            "values (docs/reference.md §2.4); remove it"
        )
    if not rule_recipients(rule):
        problems.append(f"{where} has no age recipient")
    return problems
