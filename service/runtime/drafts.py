"""Drafting a write (docs/reference.md §8): a request turned into the change of one file, on the
files at a base.

A draft is made on what git holds at a base, never on the working tree, so that a push the
remote refused can be drafted again on the remote's head. Making it reads the file from the
base and refuses one that changed since the client's `If-Match` (412); edits the YAML as a
round trip (comments kept) and encrypts a plaintext `api_key` with sops for the `.sops.yaml`
recipients, in memory; and refuses what would send a kept key somewhere else (403). The writer
then validates the result (`checks.check_folder`) and commits it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from service.config import editing
from service.config.loader import Loaded, parse
from service.config.models import SECRET_FIELDS
from service.config.secret import mask
from service.config.upstreams import AllowedUpstreams, Lookup, system_lookup
from service.crypto.rotation import file_recipients
from service.crypto.sops import Sops
from service.errors import (
    Conflict,
    FileRejected,
    Forbidden,
    GitError,
    NotFound,
    PreconditionFailed,
    Unprocessable,
)
from service.runtime.api_keys import (
    Shown,
    committed_sops_config,
    encrypt,
    mask_refused,
    masked,
    plaintext,
    sops_name,
)
from service.runtime.checks import (
    KEEP,
    check_body,
    check_destination,
    check_route,
    problem,
    provider_body,
)
from service.runtime.routing_file import check_no_broken_routing, purposes_naming, routing_file
from service.settings import Settings
from service.vcs.gitrepo import GitRepo, blob_sha

Verb = Literal["create", "update", "delete"]
Rules = Callable[[], bytes]
"""The committed `.sops.yaml` a key is encrypted by, read when one is (`Drafter.committed_rules`)."""
RouteChange = Mapping[str, Any] | Callable[[Any], Mapping[str, Any]]
"""A route, or a function of the route the routing file has for its purpose (None: none)."""
ProviderKind = Literal["api_key", "ai_server"]


DESTINATION_FIELDS = ("base_url", "provider", "server_type")
"""The fields that decide where and how a provider's key is sent: `provider` names the
vendor's default URL, and `provider` or `server_type` the protocol, so the paths and headers
the key goes in (`tei`: `/rerank` and `/info` at the server's root; `anthropic`: `x-api-key`)."""


class StaleTag(PreconditionFailed):
    """412: `If-Match` names another version of `path` than the base's. The writer answers 409
    instead when `path` has local changes: they are what is in the way (the tag a `GET` gave is
    the local version's, which the watcher serves), not a change since."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class NoFile(NotFound):
    """404: the provider has no file at the base. The writer answers 409 instead when one of
    `paths` has local changes: a file not committed yet, which the watcher serves, is in the
    way of the write, not missing."""

    def __init__(self, message: str, paths: tuple[str, ...]) -> None:
        super().__init__(message)
        self.paths = paths


@dataclass(frozen=True, slots=True)
class Draft:
    """One file's change, made again on each base a push retry lands on."""

    verb: Verb
    kind: str
    subject: str
    make: Callable[[Mapping[str, bytes], Rules], tuple[str, bytes | None, bool]]
    """(files at the base, the base's `.sops.yaml`) -> (repo path, new content or None, changed)."""


class Drafter:
    """Turns the requests of the HTTP layer into drafts, refusing what no commit should say."""

    def __init__(
        self,
        settings: Settings,
        sops: Sops,
        repo: GitRepo | None,
        *,
        applies: bool,
        lookup: Lookup = system_lookup,
    ) -> None:
        self.settings = settings
        self.sops = sops
        self.allowed = AllowedUpstreams.parse(settings.allowed_upstreams)
        """Where a provider may send requests (SWITCHBOARD_ALLOWED_UPSTREAMS): a write naming
        anywhere else is refused (422)."""
        self.lookup = lookup
        """Resolves a `base_url`'s host name, to check where it leads (called off the loop)."""
        self.repo = repo
        """The repository written to (the writer moves it to git-sync's git directory)."""
        self.folder = repo.relative(settings.providers_dir) if repo is not None else ""
        """The configuration folder, relative to the repository's top level."""
        self.sops_path: str | None = None
        """`.sops.yaml`, relative to the repository's top level (None: outside the repository)."""
        if repo is not None:
            with contextlib.suppress(GitError):
                self.sops_path = repo.relative(settings.sops_config)
        self.applies = applies
        """Whether this service applies what it writes (commit mode): then it must read the keys."""

    def create(self, kind: ProviderKind, body: Mapping[str, Any]) -> Draft:
        """A new provider file from `body` (its fields; `api_key` in plaintext)."""
        document = provider_body(kind, body)
        if masked(document.get("api_key")):
            raise mask_refused("")
        provider_id = str(document["id"])

        def make(files: Mapping[str, bytes], rules: Rules) -> tuple[str, bytes | None, bool]:
            if self._find(files, provider_id) is not None:
                raise Conflict(f"a provider `{provider_id}` exists already; PUT or PATCH it instead")
            path = self._path(f"{provider_id}.yaml")
            check_destination(self.display(path), document, self.allowed, self.lookup)
            return path, self._render(path, None, document, rules), True

        return Draft("create", kind, provider_id, make)

    def replace(
        self,
        kind: ProviderKind,
        provider_id: str,
        body: Mapping[str, Any],
        if_match: str | None,
        *,
        key_readable: bool,
    ) -> Draft:
        """The whole document of `provider_id` replaced by `body` (`api_key` left out: kept).

        `key_readable`: the client may read decrypted keys (`secrets:read`); see `_update`.
        """
        document = provider_body(kind, body, provider_id=provider_id)
        if masked(document.get("api_key")):  # sent back as a GET showed it
            document["api_key"] = Shown(document["api_key"])
        sends_key = isinstance(document.get("api_key"), str)
        if "api_key" not in document:
            document["api_key"] = KEEP
        return self._update(kind, provider_id, lambda current: document, if_match, sends_key, key_readable)

    def patch(
        self,
        kind: ProviderKind,
        provider_id: str,
        patch: Mapping[str, Any],
        if_match: str | None,
        *,
        key_readable: bool,
    ) -> Draft:
        """`provider_id`'s document with a JSON merge patch (RFC 7386); `key_readable` as in `replace`."""
        for name in ("kind", "id"):
            if name in patch and patch[name] != (kind if name == "kind" else provider_id):
                raise Unprocessable(
                    f"`{name}` cannot be changed", problems=[problem("", name, "cannot be changed")]
                )
        if isinstance(patch, Mapping) and masked(patch.get("api_key")):  # as a GET showed it
            patch = {**patch, "api_key": Shown(patch["api_key"])}
        return self._update(
            kind,
            provider_id,
            lambda current: editing.merge_patch(current, patch),
            if_match,
            isinstance(patch.get("api_key"), str),
            key_readable,
        )

    def delete(self, kind: ProviderKind, provider_id: str, if_match: str | None) -> Draft:
        """Remove `provider_id`'s file; 409 while routing names it."""

        def make(files: Mapping[str, bytes], rules: Rules) -> tuple[str, bytes | None, bool]:
            path, _ = self._existing(files, kind, provider_id)
            self._check_match(path, files, if_match)
            naming = purposes_naming(files, provider_id, self.display)
            if naming:
                raise Conflict(
                    f"routing names `{provider_id}` for {', '.join(naming)}; change the route first"
                )
            return path, None, True

        return Draft("delete", kind, provider_id, make)

    def route(self, purpose: str, route: RouteChange, if_match: str | None) -> Draft:
        """Set the route of `purpose` in the routing file (made when there is none); `route`
        may be a function of the route the file has (None: none), made on each base."""
        check_route(purpose, route if isinstance(route, Mapping) else {})

        def make(files: Mapping[str, bytes], rules: Rules) -> tuple[str, bytes | None, bool]:
            found = routing_file(files, self.display)
            original: bytes | None = None
            current: dict[str, Any] = {"kind": "routing", "purposes": {}}
            path = self._path("routing.yaml")
            if found is None:
                if if_match is not None:  # the file the tag names is gone: it changed since
                    raise StaleTag(
                        "there is no routing file now: the one `If-Match` names was removed since; "
                        "read the route again",
                        path,
                    )
                check_no_broken_routing(files, self.display)
                if path in files:  # a provider named `routing`: never written over
                    raise Conflict(
                        f"there is no routing file, and {self.display(path)}, where a route write makes "
                        "one, is a file of another kind: rename it through git first"
                    )
            else:
                path, original = found
                self._check_match(path, files, if_match)
                current = editing.load(original)
            given = current.get("purposes")
            purposes: dict[str, Any] = dict(given) if isinstance(given, Mapping) else {}
            wanted = dict(route) if isinstance(route, Mapping) else dict(route(purposes.get(purpose)))
            check_route(purpose, wanted)
            if purposes.get(purpose) == wanted:
                return path, files.get(path), False
            purposes[purpose] = wanted
            document = {**current, "kind": "routing", "purposes": purposes}
            return path, _yaml(original, document), True

        return Draft("update", "routing", purpose, make)

    # -- updating a provider --------------------------------------------------------------------

    def _update(
        self,
        kind: ProviderKind,
        provider_id: str,
        change: Callable[[dict[str, Any]], Any],
        if_match: str | None,
        sends_key: bool,
        key_readable: bool,
    ) -> Draft:
        """Change an existing provider. The service's identity lets it re-encrypt a key it keeps,
        but a client that neither sends the key nor may read it cannot change where the key goes:
        the MAC covers every value so that nobody sends a key they cannot read to a host of
        their choosing (docs/reference.md §2.4), and a write over HTTP keeps that promise (403).

        A write that sends a key is never "no change", even when it is the current key: the
        answer must not tell a client whether its guess was the key."""

        def make(files: Mapping[str, bytes], rules: Rules) -> tuple[str, bytes | None, bool]:
            path, loaded = self._existing(files, kind, provider_id)
            self._check_match(path, files, if_match)
            original = plaintext(self.sops, self.display(path), files[path], loaded)
            current = editing.load(original)
            desired = change(dict(current))
            if not isinstance(desired, Mapping):
                raise Unprocessable(
                    "the result is not a document", problems=[problem(path, "", "not a mapping")]
                )
            document = dict(desired)
            if document.get("api_key") is KEEP:
                if "api_key" in current:
                    document["api_key"] = current["api_key"]
                else:
                    del document["api_key"]
            shown = document.get("api_key")
            if isinstance(shown, Shown):  # the current key, as the API masks it: kept
                key = current.get("api_key")
                if not isinstance(key, str) or mask(key) != shown.text:
                    raise mask_refused(self.display(path))
                document["api_key"] = key
            document.setdefault("kind", kind)
            document.setdefault("id", provider_id)
            if document == current and not sends_key:
                return path, files[path], False
            check_body(document)
            moved = [f for f in DESTINATION_FIELDS if document.get(f) != current.get(f)]
            keyed = current.get("api_key") is not None and document.get("api_key") is not None
            kept = keyed and not (sends_key or key_readable)
            if kept and moved:
                raise Forbidden(
                    f"changing `{'`, `'.join(moved)}` of {self.display(path)} would send its key "
                    "somewhere else: send `api_key` with the change (or be a client with secrets:read)"
                )
            if moved:
                check_destination(self.display(path), document, self.allowed, self.lookup)
            data = self._render(path, original, document, rules)
            gained = file_recipients(data) - file_recipients(files[path]) if kept else set()
            if gained:  # a recipient added to .sops.yaml would read a key nobody rotated for it
                raise Conflict(
                    f"{self.display(path)}: keeping its key would encrypt it for recipients it does not "
                    f"have ({', '.join(sorted(gained))}): run `switchboard rotate` first, or send `api_key`"
                )
            return path, data, True

        return Draft("update", kind, provider_id, make)

    def _render(self, path: str, original: bytes | None, document: Mapping[str, Any], rules: Rules) -> bytes:
        """The file's new bytes: YAML, with any secret encrypted by sops (in memory, never on disk),
        for the recipients of the committed `.sops.yaml` (`rules`), never of a working copy."""
        text = _yaml(original, document)
        if not any(document.get(name) is not None for name in SECRET_FIELDS):
            return text
        name = self.display(path)
        committed = rules()
        return encrypt(
            self.sops, text, name, sops_name(self.sops_path, path), committed, applies=self.applies
        )

    def committed_rules(self, base: str | None, local: str | None) -> bytes:
        """`.sops.yaml` as committed at `base`: the recipients a write encrypts a key for
        (`api_keys.committed_sops_config`)."""
        return committed_sops_config(self.repo, self.sops_path, self.settings.sops_config, base, local)

    # -- files ------------------------------------------------------------------------------------

    @property
    def repo_root(self) -> Path:
        assert self.repo is not None  # noqa: S101
        return self.repo.root

    def display(self, path: str) -> str:
        """A repository path as events and answers name files (relative to the configuration root)."""
        absolute = (self.repo_root / path).absolute()
        try:
            return absolute.relative_to(self.settings.files_root.absolute()).as_posix()
        except ValueError:
            return path

    def _path(self, name: str) -> str:
        return f"{self.folder}/{name}" if self.folder not in ("", ".") else name

    def _find(self, files: Mapping[str, bytes], provider_id: str) -> str | None:
        for ext in ("yaml", "yml"):
            path = self._path(f"{provider_id}.{ext}")
            if path in files:
                return path
        return None

    def _existing(self, files: Mapping[str, bytes], kind: str, provider_id: str) -> tuple[str, Loaded]:
        path = self._find(files, provider_id)
        if path is None:
            paths = tuple(self._path(f"{provider_id}.{ext}") for ext in ("yaml", "yml"))
            raise NoFile(f"no provider `{provider_id}`", paths)
        try:
            loaded = parse(self.display(path), files[path])
        except FileRejected as exc:
            raise Conflict(
                f"{self.display(path)} is not valid in git: {exc.reason}; fix it through git"
            ) from None
        if loaded.document.kind != kind:
            raise NotFound(f"`{provider_id}` is an {loaded.document.kind}, not an {kind}")
        return path, loaded

    def _check_match(self, path: str, files: Mapping[str, bytes], if_match: str | None) -> None:
        if if_match is None:
            return
        current = blob_sha(files[path])
        tags = [t.strip().removeprefix("W/").strip('"').split(".")[0] for t in if_match.split(",")]
        if "*" not in tags and current not in tags:
            raise StaleTag(f"{self.display(path)} changed since (it is now {current}); read it again", path)


def _yaml(original: bytes | None, document: Mapping[str, Any]) -> bytes:
    """`document` as YAML: an edit of `original` (its comments kept), or a new file."""
    return editing.render_edit(original, document) if original is not None else editing.render_new(document)
