"""`switchboard encrypt FILE…`: encrypt files in place with the project's `.sops.yaml` rules."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from service.config.models import SECRET_FIELDS
from service.crypto.sops import Sops
from service.files import write_atomically
from service.settings import Settings

_NULL = "tag:yaml.org,2002:null"


def run(ns: argparse.Namespace, settings: Settings) -> int:
    """Encrypt each file, replacing it atomically; a secret written unquoted is quoted first."""
    sops = Sops.from_settings(settings)
    for path in ns.files:
        quoted = quote_secrets(Path(path).read_bytes())
        if quoted is not None:
            write_atomically(Path(path), quoted)
        sops.encrypt_in_place(path)
        print(f"encrypted {path}")
    return 0


def quote_secrets(data: bytes) -> bytes | None:
    """`data` with each top-level secret written unquoted (`api_key: 123456789012345`) quoted, as
    the string it was typed as, so that sops encrypts it as a string (`type:str`,
    docs/reference.md §2.4); None when there is none (or the file is not YAML: sops says why).

    Every plain scalar is quoted, not only those PyYAML reads as a number: sops reads YAML 1.2,
    where `012345678901234` is a number and `yes` a string, the other way round from PyYAML's
    YAML 1.1. A null (no value) is left as it is."""
    try:
        node = yaml.compose(data.decode("utf-8"), Loader=yaml.SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError):
        return None
    if not isinstance(node, yaml.MappingNode):
        return None
    if any(isinstance(key, yaml.ScalarNode) and key.value == "sops" for key, _ in node.value):
        return None  # encrypted already: sops refuses it as it stands
    text = data.decode("utf-8")
    spans = [
        (value.start_mark.index, value.end_mark.index, value.value)
        for key, value in node.value
        if isinstance(key, yaml.ScalarNode)
        and key.value in SECRET_FIELDS
        and isinstance(value, yaml.ScalarNode)
        and value.style is None
        and value.tag != _NULL
    ]
    for start, end, typed in sorted(spans, reverse=True):
        text = text[:start] + json.dumps(typed) + text[end:]
    return text.encode() if spans else None
