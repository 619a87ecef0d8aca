"""A provider's key in a write (docs/reference.md §8): sent back masked, decrypted to be edited,
encrypted for the recipients of the committed `.sops.yaml`.

A client that PUTs back the document a GET gave it sends the key masked (`Shown`): that keeps
the key, and any other mask is refused. A file that holds a key is decrypted by sops to be
edited (its MAC covers every value); the new one is encrypted in memory, never on disk, for
the recipients of `.sops.yaml` as committed at the base, never of a working copy.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from service.config.loader import Loaded
from service.config.secret import MASK
from service.config.sops_rules import check_sops_config, recipients
from service.crypto.sops import Sops
from service.errors import Conflict, SopsError, SopsNoKey, Unprocessable
from service.runtime.checks import problem
from service.vcs.gitrepo import GitRepo


@dataclass(frozen=True)
class Shown:
    """An `api_key` sent as the API shows keys (`****` and the last four characters): a client
    that PUTs back the document a GET gave it. It stands for the current key when it is that
    key's mask, which keeps the key as leaving `api_key` out does (and, like that, is not a key
    sent: it moves no key elsewhere); any other mask is refused, never stored as a key."""

    text: str


def masked(value: Any) -> bool:
    """Whether `value` is a key as the API shows keys, masked."""
    return isinstance(value, str) and value.startswith(MASK)


def mask_refused(path: str) -> Unprocessable:
    """422 for a masked key that is not the current key's mask (or where there is none)."""
    return Unprocessable(
        "`api_key` is a masked key (as the API shows keys), not a key: leave `api_key` out to keep "
        "the current one, or send the new key",
        problems=[problem(path, "api_key", "a masked key, not a key")],
    )


def plaintext(sops: Sops, name: str, data: bytes, loaded: Loaded) -> bytes:
    """The file's plaintext YAML: decrypted by sops when it holds a key (its MAC covers every value)."""
    if not loaded.encrypted:
        return data
    try:
        return sops.decrypt_text(data, name)
    except SopsNoKey:
        raise Conflict(
            f"{name} holds a key, so changing it needs the service's identity "
            "(SOPS_AGE_KEY_FILE), and this one cannot decrypt it"
        ) from None
    except SopsError as exc:
        raise Conflict(f"{name}: {exc.case}") from None


def encrypt(sops: Sops, text: bytes, name: str, target: str, committed: bytes, *, applies: bool) -> bytes:
    """`text` with its secrets encrypted by sops (in memory, never on disk) for the recipients of
    `committed` (`.sops.yaml` as committed at the base). `target` is the file as sops matches it
    (`sops_name`); `applies`: the service applies what it writes, so it must read the key."""
    with tempfile.TemporaryDirectory(prefix="switchboard-sops-") as folder:
        config = Path(folder) / ".sops.yaml"
        config.write_bytes(committed)  # public recipients and rules: no secret
        problems = check_sops_config(config, [target])
        if problems:
            raise Unprocessable(
                "`.sops.yaml` cannot encrypt this file",
                problems=[problem(".sops.yaml", "", p) for p in problems],
            )
        if applies:
            own = sops.own_recipients()
            if own and not own & set(recipients(config)):
                raise Unprocessable(
                    "the service could not read this key: its identity is not a recipient in .sops.yaml",
                    problems=[
                        problem(".sops.yaml", "", "the service's identity is not among the recipients")
                    ],
                )
        try:
            return sops.encrypt(text, target, config=config)
        except SopsError as exc:
            raise Unprocessable(
                f"{name}: cannot encrypt: {exc.case}", problems=[problem(name, "api_key", exc.case)]
            ) from None


def committed_sops_config(
    repo: GitRepo | None, where: str | None, configured: Path, base: str | None, local: str | None
) -> bytes:
    """`.sops.yaml` (`where` in the repository, None: outside it; `configured` as set) as
    committed at `base`: the recipients a write encrypts a key for (reference §8).

    Conflict when it is not in the repository or not committed, and, with `local` (the
    commit the working tree is at), when it has uncommitted changes there: a key is never
    encrypted for recipients nobody committed (someone who may edit the working tree, not
    the repo).
    """
    if where is None:
        raise Conflict(
            f"{configured} is outside the repository: a key is encrypted only for "
            "the recipients of a committed .sops.yaml"
        )
    committed = repo.read_file(base, where) if repo is not None and base else None
    if committed is None:
        raise Conflict(
            f"{where} is not committed: commit it first (a key is encrypted only for the recipients "
            "of the committed .sops.yaml)"
        )
    if local is not None and _changed_locally(
        repo,
        where,
        local,
        committed if local == base or repo is None else repo.read_file(local, where),
    ):
        raise Conflict(
            f"{where} has uncommitted changes: commit or discard them first (a key is encrypted "
            "only for the recipients of the committed .sops.yaml)"
        )
    return committed


def _changed_locally(repo: GitRepo | None, path: str, base: str | None, committed: bytes | None) -> bool:
    """Whether the working tree or the index holds another `path` than `committed` (at `base`)."""
    assert repo is not None  # noqa: S101 - a path in the repository has one
    try:
        working: bytes | None = (repo.root / path).read_bytes()
    except FileNotFoundError:
        working = None
    if working != committed:
        return True
    staged = repo.run("diff-index", "--cached", "--name-only", base or "HEAD", "--", path)
    return bool(staged.strip())


def sops_name(sops_path: str | None, path: str) -> str:
    """A repository path as sops matches it against `path_regex`: relative to the folder of
    `.sops.yaml` (`sops_path`, as when sops runs there)."""
    folder = PurePosixPath(sops_path or ".sops.yaml").parent
    try:
        return PurePosixPath(path).relative_to(folder).as_posix()
    except ValueError:
        return path
