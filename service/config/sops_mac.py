"""What sops' MAC does not vouch for, and how a file changed outside sops is told anyway.

sops' MAC hashes the file's values concatenated in order, with no separators, no key names
and no structure. Without the identity, bytes can move between adjacent values (`base_url:
https://llm.com` and `name: "pany.com/v1GPU box"`) and keys can be renamed (`enabled: false`
to `name: 'False'`): the MAC still passes, and the key goes to another host.

The tell: every write through sops (edit, encrypt, rotate, the service's own writes) makes a
new MAC: a fresh IV, or a new data key (`sops edit` reuses the IV when the joined values and
the second of `lastmodified` are the same; `switchboard edit` then rotates the data key). A
file made without the identity cannot have one, so it keeps the MAC of the version it was
made from, byte for byte, while what it says differs. A `Seal` holds both halves of a
key-holding file: which MAC it carries, and a fingerprint of its data (comments and
formatting aside). Comparing it with the seals of versions known good needs no decryption
(docs/reference.md §2.4).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from service.errors import Problem, printable

_ENC = re.compile(r"^ENC\[AES256_GCM,data:(.+),iv:(.+),tag:(.+),type:(.+)\]")
"""An encrypted value as sops matches it (its own pattern: `.` stops at a line break only)."""

_KEY_GROUPS = frozenset(
    {"age", "pgp", "kms", "gcp_kms", "hckms", "azure_kv", "hc_vault", "key_groups", "shamir_threshold"}
)
"""Fields of the `sops:` block holding the data key wrapped for each recipient: `sops updatekeys`
rewrites them and keeps the MAC, so they are not part of what a seal compares."""

_SHOWN_NAMES = 5


@dataclass(frozen=True, slots=True)
class Seal:
    """Which MAC a key-holding file carries, and what its data is."""

    mac: str
    """The MAC's ciphertext, IV and tag, decoded: two spellings of one MAC (sops' base64 skips
    some bytes) are one, and a MAC sops writes anew differs (a new IV, or a new data key)."""
    fingerprint: tuple[tuple[str, str], ...]
    """Each top-level key, in order, with a digest of its value; the `sops:` block last, without
    its key groups."""


Known = Mapping[str, tuple[str, Seal]]
"""Versions known good, by their MAC: the MAC's IV -> (the file, its seal)."""


def seal_of(tree: Mapping[str, Any], meta: object) -> Seal | None:
    """The seal of a document (`tree`, without its `sops:` block `meta`); None when it has no MAC."""
    if not isinstance(meta, dict) or not isinstance(mac := meta.get("mac"), str):
        return None
    fields = [(str(key), _digest(value)) for key, value in tree.items()]
    fields.append(("sops", _digest({k: v for k, v in meta.items() if k not in _KEY_GROUPS})))
    return Seal(_mac_identity(mac), tuple(fields))


def changed_outside_sops(file: str, line: int, seal: Seal | None, known: Known) -> Problem | None:
    """The refusal of a file carrying the MAC of a known version while its data differs."""
    if seal is None or seal.mac not in known:
        return None
    was_file, was = known[seal.mac]
    if was.fingerprint == seal.fingerprint:
        return None  # the same data: comments, quoting or layout changed, which sops allows
    whose = "the previous version's" if was_file == file else f"that of {printable(was_file)}"
    message = (
        f"MAC mismatch: the file was changed without sops: its MAC is {whose}, but "
        f"{_what_differs(was, seal)} (sops' MAC does not cover names or where values begin and "
        "end); restore the file from git, then change it with `switchboard edit`"
    )
    return Problem(file, line, message, "sops")


def sharing_a_mac(files: Iterable[tuple[str, int, Seal | None]]) -> dict[str, Problem]:
    """The refusal of each of `files` (file, line of its MAC, seal: one side, one reload) that
    carries the MAC of another of them with other data. Which one sops wrote cannot be told,
    so each is refused: a legitimate copy under another name differs in its `id` and so has a
    MAC of its own (docs/reference.md §2.4)."""
    by_mac: dict[str, list[tuple[str, int, Seal]]] = {}
    for file, line, seal in files:
        if seal is not None:
            by_mac.setdefault(seal.mac, []).append((file, line, seal))
    refused: dict[str, Problem] = {}
    for group in by_mac.values():
        distinct = {s.fingerprint: (f, s) for f, _, s in reversed(group)}  # the first file of each
        if len(distinct) < 2:
            continue
        for file, line, seal in group:
            other = next(x for fp, x in distinct.items() if fp != seal.fingerprint)
            problem = changed_outside_sops(file, line, seal, {seal.mac: other})
            if problem:
                refused[file] = problem
    return refused


def _what_differs(was: Seal, now: Seal) -> str:
    old, new = dict(was.fingerprint), dict(now.fingerprint)
    names = [k for k in dict.fromkeys([*new, *old]) if old.get(k) != new.get(k)]
    if not names:
        return "the order of its keys differs"
    shown = [f"`{printable(name[:40])}`" for name in names[:_SHOWN_NAMES]]
    if len(names) > _SHOWN_NAMES:
        shown[-1] = f"{len(names) - _SHOWN_NAMES + 1} more"
    if len(shown) == 1:
        return f"{shown[0]} differs"
    return f"{', '.join(shown[:-1])} and {shown[-1]} differ"


def _mac_identity(mac: str) -> str:
    match = _ENC.match(mac)
    if match is None:
        return f"raw:{mac}"  # sops refuses it anyway; an exact copy is still told
    return ":".join(_decoded(match.group(i)) for i in (1, 2, 3))


def _decoded(text: str) -> str:
    """Base64 `text` as the bytes it stands for (hex): its other spellings sops accepts are one."""
    cleaned = re.sub(r"[^A-Za-z0-9+/]", "", text)
    try:
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4)).hex()
    except (binascii.Error, ValueError):
        return cleaned


def _digest(value: object) -> str:
    text = json.dumps(_canonical(value), ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _canonical(value: object) -> object:
    """`value` as JSON that tells every YAML type apart (`'False'` from `false`), order kept."""
    if isinstance(value, dict):
        return {"map": [[_canonical(k), _canonical(v)] for k, v in value.items()]}
    if isinstance(value, list):
        return {"seq": [_canonical(v) for v in value]}
    if isinstance(value, set | frozenset):
        return {"set": sorted(json.dumps(_canonical(v), ensure_ascii=True) for v in value)}
    if value is None or isinstance(value, str | bool | int):
        return value
    return {type(value).__name__: repr(value)}  # float, dates and times, binary
