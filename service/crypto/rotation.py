"""Rotation (`switchboard rotate`): a new data key for every encrypted file, for `.sops.yaml`'s recipients.

Removing a recipient from a file's metadata alone is not a rotation: whoever held that
identity may have kept the old data key, and with it every value ever encrypted under it.
So each file gets a new data key (`sops rotate`), wrapped for exactly the recipients of the
updated `.sops.yaml`.

One file at a time, and each one whole: the file is copied to a hidden temporary file beside
it (which the watcher ignores), rotated there, fsynced, decrypted and compared with the
plaintext from before, and only then renamed over the original. A failure stops the run with
the file named; the files before it are new, it and the ones after are as they were, and
running `rotate` again finishes the job. Plaintext never reaches the disk.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from service.config.loader import config_files
from service.config.sops_rules import recipients
from service.crypto.keys import add_recipient, remove_recipient
from service.crypto.sops import Sops
from service.errors import SopsError, SopsFailed, SopsNoKey
from service.files import fsync_path

Progress = Callable[[Path], None]
"""Called after each file is rotated."""


@dataclass(frozen=True, slots=True)
class Rotation:
    """What a run did: the recipients files now have, and the files rotated, in order."""

    recipients: tuple[str, ...]
    rotated: tuple[Path, ...]


class RotationStopped(SopsFailed):
    """A file could not be rotated; the files before it were, it and the rest are unchanged."""

    def __init__(self, file: str, message: str, done: Sequence[Path], pending: Sequence[Path]) -> None:
        super().__init__(file, message)
        self.done = tuple(done)
        self.pending = tuple(pending)


# -- recipients --------------------------------------------------------------------------------


def update_recipients(sops_config: Path, add: Iterable[str] = (), remove: Iterable[str] = ()) -> list[str]:
    """Add, then remove, age recipients in `.sops.yaml`; returns the recipients it now names.

    Adding first lets one run replace the last recipient. Raises ConfigError for a malformed
    recipient, or when the last one would go.
    """
    for recipient in add:
        add_recipient(sops_config, recipient)
    for recipient in remove:
        remove_recipient(sops_config, recipient)
    return recipients(sops_config)


def file_recipients(data: bytes) -> set[str]:
    """The age recipients in a file's sops metadata."""
    tree = _yaml(data)
    meta = tree.get("sops") if tree else None
    entries = meta.get("age") if isinstance(meta, dict) else None
    return {str(e["recipient"]) for e in entries or [] if isinstance(e, dict) and "recipient" in e}


def encrypted_files(folder: Path) -> list[Path]:
    """The documents of `folder` that carry a sops block, in name order."""
    found = []
    for path in config_files(folder):
        tree = _yaml(path.read_bytes())
        if tree and "sops" in tree:
            found.append(path)
    return found


def _yaml(data: bytes) -> dict[str, object] | None:
    try:
        tree = yaml.safe_load(data)
    except yaml.YAMLError:
        return None
    return tree if isinstance(tree, dict) else None


# -- rotating ----------------------------------------------------------------------------------


def rotate(
    files: Sequence[Path], sops: Sops, desired: Sequence[str], *, progress: Progress | None = None
) -> Rotation:
    """Rotate each file in turn for exactly the `desired` recipients. Raises RotationStopped."""
    done: list[Path] = []
    for index, path in enumerate(files):
        try:
            rotate_file(path, sops, desired)
        except SopsError as exc:
            raise RotationStopped(sops.relative(path), exc.case, done, files[index:]) from None
        done.append(path)
        if progress is not None:
            progress(path)
    return Rotation(tuple(desired), tuple(done))


def rotate_file(path: Path, sops: Sops, desired: Sequence[str]) -> None:
    """Give one file a new data key for `desired`, replacing it atomically once it checks out."""
    name = sops.relative(path)
    data = path.read_bytes()
    before = sops.decrypt(data, name)
    current = file_recipients(data)
    add = sorted(set(desired) - current)
    remove = sorted(current - set(desired))
    # A dot-name keeps the watcher and `validate` away; the real suffix tells sops the format.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.rotate{path.suffix}")
    try:
        _write_synced(tmp, data, path.stat().st_mode & 0o777)
        sops.rotate(tmp, add_age=add, remove_age=remove)
        fsync_path(tmp)
        rotated = tmp.read_bytes()
        _check(name, rotated, before, desired, sops)
        tmp.replace(path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _check(name: str, rotated: bytes, before: dict[str, object], desired: Sequence[str], sops: Sops) -> None:
    if rotated == b"" or file_recipients(rotated) != set(desired):
        raise SopsFailed(name, "after rotation the file's recipients are not those of .sops.yaml")
    try:
        after = sops.decrypt(rotated, name)
    except SopsNoKey:
        raise SopsFailed(
            name,
            "the rotated file cannot be checked: the identity in use is not among the new recipients "
            "(run rotate with a key that stays)",
        ) from None
    if after != before:
        raise SopsFailed(name, "the rotated file does not decrypt to the same values")


def _write_synced(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
