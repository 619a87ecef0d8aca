"""Every problem of a set of files, as `switchboard validate` reports it for CI and pre-commit.

It needs no key. Files are parsed and checked one by one, then together (cross-file checks
over each folder involved, so a single changed file is still checked against its siblings),
and `.sops.yaml` is checked to cover the files that hold secrets. With `decrypt`, each
encrypted file also goes through sops, which checks its MAC. A file that is a symbolic link
out of the repository is reported unread, as the service refuses it (docs/reference.md §4).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from service.config.loader import (
    MAX_FILE_BYTES,
    Decrypter,
    Loaded,
    config_files,
    declared_kind,
    decrypt,
    is_config_file,
    parse,
    too_large,
)
from service.config.models import SECRET_FIELDS
from service.config.snapshot import cross_check
from service.config.sops_rules import check_sops_config
from service.errors import FileRejected, Problem
from service.files import leads_outside, read_limited

_PROVIDER_KINDS = ("ai_server", "api_key")
LINK_OUT = "a symbolic link out of the repository (or into its .git): the service refuses it unread"


def collect(paths: Iterable[Path]) -> list[Path]:
    """The documents named: files as given, folders expanded to their documents."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += config_files(path)
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def validate(
    paths: Iterable[Path],
    *,
    sops: Decrypter | None = None,
    sops_config: Path | None = None,
    root: Path | None = None,
) -> list[Problem]:
    """Every problem in the files at `paths`; decrypts too when a `Sops` is given.

    `root`: the repository (the configuration root); links out of it are reported, not read.
    """
    paths = list(paths)
    named = collect(paths)
    if root is not None:  # a link out may lead nowhere here and somewhere on a replica
        named += [p for p in _dangling_links(paths) if _link_out(p, root)]
    problems: list[Problem] = []
    loaded: dict[Path, Loaded] = {}
    refused: set[str] = set()  # ids of refused provider files: routing may name them, as in the service
    out = {p for p in named if root is not None and _link_out(p, root)}
    for path in named:
        if path in out:
            problems.append(Problem(_display(path), 1, LINK_OUT))
            continue
        try:
            loaded[path] = _load(path, refused)
            if sops is not None:
                decrypt(loaded[path], sops)
        except FileRejected as exc:
            problems += exc.problems
    siblings = {p for folder in {p.parent for p in named} for p in collect([folder])} - set(named)
    for path in sorted(siblings):
        if root is not None and _link_out(path, root):
            continue
        try:
            loaded[path] = _load(path, refused)
        except FileRejected:
            continue  # only the files named are reported; a broken sibling is its own change
    problems += cross_check(loaded.values(), refused)
    secret_files = [p for p in named if p in loaded and holds_secrets(loaded[p])]
    if secret_files:
        config = sops_config or _find_sops_config(secret_files[0])
        for message in check_sops_config(config, [str(p.resolve()) for p in secret_files]):
            problems.append(Problem(_display(config), 1, message))
    return sorted(dict.fromkeys(problems), key=lambda p: (p.file, p.line))


def _dangling_links(paths: Iterable[Path]) -> list[Path]:
    """The documents' names in the folders named that are links to nothing (here)."""
    found: list[Path] = []
    for folder in paths:
        if folder.is_dir():
            found += sorted(
                p for p in folder.iterdir() if p.is_symlink() and not p.exists() and is_config_file(p.name)
            )
    return found


def _link_out(path: Path, root: Path) -> bool:
    """Whether `path` is a link leading out of the repository the service would see it in: `root`
    when the file is in it (as named, links not resolved), else the folder holding its folder
    (as the service names files of a folder outside its root)."""
    named = path.absolute()
    boundary = root.absolute()
    if not named.is_relative_to(boundary):
        boundary = named.parent.parent
    return leads_outside(named, boundary)


def _load(path: Path, refused: set[str]) -> Loaded:
    """The file parsed; when it is refused and says it is a provider, its id joins `refused`."""
    file = _display(path)
    try:
        data, size = read_limited(path, MAX_FILE_BYTES)  # as the service reads: never a FIFO, never whole
    except OSError as exc:
        raise FileRejected([Problem(file, 1, f"cannot read: {exc.strerror}")]) from None
    try:
        if size is not None:
            raise too_large(file, size)
        return parse(file, data)
    except FileRejected:
        if declared_kind(data) in _PROVIDER_KINDS:
            refused.add(path.stem)  # a provider's id is its file's name
        raise


def holds_secrets(loaded: Loaded) -> bool:
    """Whether a file holds a secret field (encrypted or not), so `.sops.yaml` must cover it."""
    return loaded.encrypted or any(getattr(loaded.document, f, None) is not None for f in SECRET_FIELDS)


def _find_sops_config(start: Path) -> Path:
    """`.sops.yaml` in the file's folder or the nearest parent, as sops looks for it."""
    folder = start.resolve().parent
    for candidate in (folder, *folder.parents):
        if (candidate / ".sops.yaml").exists():
            return candidate / ".sops.yaml"
    return Path(".sops.yaml")


def _display(path: Path) -> str:
    if not path.is_absolute():
        return path.as_posix()
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else Path(relative).as_posix()
