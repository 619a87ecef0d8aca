"""The file a refused write names (docs/reference.md §8): each of a 422's `problems` says its
`file`, the problems found in the request's body too.

A body is checked before the files it changes are read (a `kind` that is not the route's, an
`id` that is not the path's, a `sops` field, an `api_key` that is no string): such a problem is
made without a file, and named here by the file the write would change, as answers name files
(`providers.d/<id>.yaml`): the file served for that id or that routing, else where the write
would make it, else (for a body with no usable `id`) the folder.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

from service.config.models import ID_PATTERN, AiServer, ApiKey, Routing
from service.config.snapshot import Snapshot
from service.errors import Unprocessable
from service.settings import Settings


def file_of(settings: Settings, snapshot: Snapshot, kind: str, subject: object) -> str:
    """The file a write of `kind` (`routing`, `api_key`, `ai_server`) to `subject` (a provider
    id, or a purpose) changes, as answers name files."""
    for path, loaded in sorted(snapshot.files.items()):
        document = loaded.document
        if kind == "routing" and isinstance(document, Routing):
            return path
        if kind != "routing" and isinstance(document, AiServer | ApiKey) and document.id == subject:
            return path
    if kind == "routing":
        return _shown(settings, "routing.yaml")
    if isinstance(subject, str) and re.fullmatch(ID_PATTERN, subject):
        return _shown(settings, f"{subject}.yaml")
    return _shown(settings, "")


@contextlib.contextmanager
def naming(file: Callable[[], str]) -> Iterator[None]:
    """Within it, a refusal's problems that name no file name `file()` (found on a refusal only)."""
    try:
        yield
    except Unprocessable as refused:
        found = refused.extra.get("problems")
        if isinstance(found, list) and any(isinstance(p, dict) and not p.get("file") for p in found):
            named = file()
            refused.extra["problems"] = [
                {**p, "file": named} if isinstance(p, dict) and not p.get("file") else p for p in found
            ]
        raise


def _shown(settings: Settings, name: str) -> str:
    """`name` in the configuration folder, relative to what answers name files from."""
    folder = settings.providers_dir.absolute()
    path = folder / name if name else folder
    try:
        return path.relative_to(settings.files_root.absolute()).as_posix()
    except ValueError:
        return path.as_posix()
