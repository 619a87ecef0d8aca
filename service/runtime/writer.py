"""Writes over HTTP that become git commits (SPEC 8): the old admin API, with git as the trail.

A write never takes a shortcut into the registry. It becomes a file and a commit, and comes
back through the same path as any change (the watcher's reload), so the event log records it
with its commit and author like a merged pull request:

1. Read the file from HEAD (the base); refuse a file with local edits (409) or one that
   changed since the client's `If-Match` (412).
2. Build the new file: edited as a YAML round trip (comments kept), a plaintext `api_key`
   encrypted by sops for the `.sops.yaml` recipients in memory; validated exactly as
   `switchboard validate` would validate the commit (the file, then the folder at HEAD with
   it), so a refusal (422) writes nothing.
3. Commit it with plumbing (no hook runs), author `NAME <NAME@clients.switchboard.invalid>`.
4. `branch` mode: the commit goes to `switchboard/<verb>-<id>-<n>` and nothing is applied (202).
   With `SWITCHBOARD_GIT_PUSH`, push; a rejected push is rebuilt on the remote's head (and
   validated again), at most 3 times, or the write fails and nothing local moved (409).
5. `commit` mode: with the watcher held off, move the branch and the files, then reload once;
   the answer carries the generation that applied it. A failure puts branch and files back.

Writes are applied one at a time, in the order they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from service.config import editing
from service.config.loader import Loaded, is_config_file, parse
from service.config.models import ID_PATTERN, PURPOSES, SECRET_FIELDS, Routing
from service.config.secret import unsendable
from service.config.snapshot import Snapshot, cross_check
from service.config.sops_rules import check_sops_config, recipients
from service.crypto.rotation import file_recipients
from service.crypto.sops import Sops
from service.errors import (
    Conflict,
    FileRejected,
    Forbidden,
    GitError,
    MethodNotAllowed,
    NotFound,
    PreconditionFailed,
    Problem,
    SopsError,
    SopsNoKey,
    Unprocessable,
)
from service.runtime.registry import Outcome, Registry
from service.runtime.watcher import Reloader, link_folders
from service.settings import Settings
from service.vcs.commit import Committer, Identity, message
from service.vcs.gitrepo import GitRepo, blob_sha

log = logging.getLogger(__name__)

Mode = Literal["commit", "branch", "off"]
Verb = Literal["create", "update", "delete"]
ProviderKind = Literal["api_key", "ai_server"]

PUSH_ATTEMPTS = 3
APPLY_WAIT_S = 15.0
"""How long a write pushed from a git-sync checkout waits for git-sync to bring it back (its
default period is 10 s); then it is answered 202, pending."""
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_BRANCH_ATTEMPTS = 5
_KEEP = object()
DESTINATION_FIELDS = ("base_url", "provider")
"""The fields that decide where a provider's key is sent (`provider`: the vendor's default URL)."""


@dataclass(frozen=True, slots=True)
class Written:
    """What a write did: its commit, and the generation that applied it (None in branch mode)."""

    verb: Verb
    kind: str
    subject: str
    file: str
    commit: str
    blob: str | None
    """The git blob id of the file written (None when it was deleted): the answer's ETag."""
    generation: int | None = None
    snapshot: Snapshot | None = None
    branch: str | None = None
    changed: bool = True
    """False when the write asked for what the file already says: no commit was made."""
    pending: bool = False
    """Pushed, but not applied here yet (git-sync had not brought it within `apply_wait_s`)."""


@dataclass(slots=True)
class _Draft:
    """One file's change, rebuilt on each base a push retry lands on."""

    verb: Verb
    kind: str
    subject: str
    make: Callable[[Mapping[str, bytes], str | None], tuple[str, bytes | None, bool]]
    """(files at the base, the base) -> (repo path, new content or None, changed)."""
    if_match: str | None = None
    paths: list[str] = field(default_factory=list)


def resolve_mode(settings: Settings, repo: GitRepo | None) -> Mode:
    """`SWITCHBOARD_WRITE_MODE`, or `commit` inside a git repository and `off` outside one."""
    if settings.write_mode is not None:
        return settings.write_mode if repo is not None else "off"
    return "commit" if repo is not None else "off"


class Writer:
    """Turns writes into commits, one at a time, and waits until the service has applied each."""

    def __init__(
        self,
        settings: Settings,
        sops: Sops,
        registry: Registry,
        reloader: Reloader,
        repo: GitRepo | None,
    ) -> None:
        self.settings = settings
        self.sops = sops
        self.registry = registry
        self.reloader = reloader
        self.mode = resolve_mode(settings, repo)
        self.repo = repo
        self.committer = Committer(repo, Identity.parse(settings.git_committer)) if repo is not None else None
        self.lock = asyncio.Lock()
        """Held while a write runs; a pull (runtime.sync) takes it too, so neither moves the branch
        under the other."""
        self._folder = repo.relative(settings.providers_dir) if repo is not None else ""
        self.apply_wait_s = APPLY_WAIT_S
        """With git-sync: how long a write pushed waits for the swap that brings it (SPEC 12)."""

    def recover(self) -> None:
        """Finish or clear a write a crash cut short; run before the first load."""
        if self.committer is not None:
            done = self.committer.recover()
            if done:
                log.warning("writes: %s", done)

    # -- what the HTTP layer calls -------------------------------------------------------------

    async def create(
        self, kind: ProviderKind, body: Mapping[str, Any], client: str, reason: str | None
    ) -> Written:
        """A new provider file from `body` (its fields; `api_key` in plaintext)."""
        document = _provider_body(kind, body)
        provider_id = str(document["id"])

        def make(files: Mapping[str, bytes], base: str | None) -> tuple[str, bytes | None, bool]:
            if self._find(files, provider_id) is not None:
                raise Conflict(f"a provider `{provider_id}` exists already; PUT or PATCH it instead")
            path = self._path(f"{provider_id}.yaml")
            return path, self._render(path, None, document), True

        return await self._write(_Draft("create", kind, provider_id, make), client, reason)

    async def replace(
        self,
        kind: ProviderKind,
        provider_id: str,
        body: Mapping[str, Any],
        client: str,
        reason: str | None,
        if_match: str | None,
        *,
        key_readable: bool,
    ) -> Written:
        """The whole document of `provider_id` replaced by `body` (`api_key` left out: kept).

        `key_readable`: the client may read decrypted keys (`secrets:read`); see `_update`.
        """
        document = _provider_body(kind, body, provider_id=provider_id)
        sends_key = isinstance(document.get("api_key"), str)
        if "api_key" not in document:
            document["api_key"] = _KEEP
        return await self._update(
            kind, provider_id, lambda current: document, client, reason, if_match, sends_key, key_readable
        )

    async def patch(
        self,
        kind: ProviderKind,
        provider_id: str,
        patch: Mapping[str, Any],
        client: str,
        reason: str | None,
        if_match: str | None,
        *,
        key_readable: bool,
    ) -> Written:
        """`provider_id`'s document with a JSON merge patch (RFC 7386); `key_readable` as in `replace`."""
        for name in ("kind", "id"):
            if name in patch and patch[name] != (kind if name == "kind" else provider_id):
                raise Unprocessable(
                    f"`{name}` cannot be changed", problems=[_problem("", name, "cannot be changed")]
                )
        return await self._update(
            kind,
            provider_id,
            lambda current: editing.merge_patch(current, patch),
            client,
            reason,
            if_match,
            isinstance(patch.get("api_key"), str),
            key_readable,
        )

    async def delete(
        self, kind: ProviderKind, provider_id: str, client: str, reason: str | None, if_match: str | None
    ) -> Written:
        """Remove `provider_id`'s file; 409 while routing names it."""

        def make(files: Mapping[str, bytes], base: str | None) -> tuple[str, bytes | None, bool]:
            path, _ = self._existing(files, kind, provider_id)
            self._check_match(path, files, if_match)
            naming = _purposes_naming(files, provider_id, self._display)
            if naming:
                raise Conflict(
                    f"routing names `{provider_id}` for {', '.join(naming)}; change the route first"
                )
            return path, None, True

        return await self._write(_Draft("delete", kind, provider_id, make), client, reason)

    async def route(
        self, purpose: str, route: Mapping[str, Any], client: str, reason: str | None, if_match: str | None
    ) -> Written:
        """Set the route of `purpose` in the routing file (made when there is none)."""
        if purpose not in PURPOSES:
            raise NotFound(f"unknown purpose `{purpose}`; one of {', '.join(PURPOSES)}")
        if not isinstance(route, Mapping):
            raise Unprocessable(
                "the route must be a JSON object", problems=[_problem("", "", "not an object")]
            )
        if editing.depth(route) > editing.MAX_DEPTH:
            raise Unprocessable(
                "the route nests too deeply", problems=[_problem("", "", "nested too deeply")]
            )

        def make(files: Mapping[str, bytes], base: str | None) -> tuple[str, bytes | None, bool]:
            found = _routing_file(files, self._display)
            if found is None:
                _check_no_broken_routing(files, self._display)
            original: bytes | None = None
            current: dict[str, Any] = {"kind": "routing", "purposes": {}}
            path = self._path("routing.yaml")
            if found is not None:
                path, original = found
                self._check_match(path, files, if_match)
                current = editing.load(original)
            given = current.get("purposes")
            purposes: dict[str, Any] = dict(given) if isinstance(given, Mapping) else {}
            if purposes.get(purpose) == dict(route):
                return path, files.get(path), False
            purposes[purpose] = dict(route)
            document = {**current, "kind": "routing", "purposes": purposes}
            data = (
                editing.render_edit(original, document)
                if original is not None
                else editing.render_new(document)
            )
            return path, data, True

        return await self._write(_Draft("update", "routing", purpose, make), client, reason)

    # -- updating a provider --------------------------------------------------------------------

    async def _update(
        self,
        kind: ProviderKind,
        provider_id: str,
        change: Callable[[dict[str, Any]], Any],
        client: str,
        reason: str | None,
        if_match: str | None,
        sends_key: bool,
        key_readable: bool,
    ) -> Written:
        """Change an existing provider. The service's identity lets it re-encrypt a key it keeps,
        but a client that neither sends the key nor may read it cannot change where the key goes:
        the MAC covers every value so that nobody sends a key they cannot read to a host of
        their choosing (SPEC 2.4), and a write over HTTP keeps that promise (403).

        A write that sends a key is never "no change", even when it is the current key: the
        answer must not tell a client whether its guess was the key."""

        def make(files: Mapping[str, bytes], base: str | None) -> tuple[str, bytes | None, bool]:
            path, loaded = self._existing(files, kind, provider_id)
            self._check_match(path, files, if_match)
            original = self._plaintext(path, files[path], loaded)
            current = editing.load(original)
            desired = change(dict(current))
            if not isinstance(desired, Mapping):
                raise Unprocessable(
                    "the result is not a document", problems=[_problem(path, "", "not a mapping")]
                )
            document = dict(desired)
            if document.get("api_key") is _KEEP:
                if "api_key" in current:
                    document["api_key"] = current["api_key"]
                else:
                    del document["api_key"]
            document.setdefault("kind", kind)
            document.setdefault("id", provider_id)
            if document == current and not sends_key:
                return path, files[path], False
            _check_body(document)
            moved = [f for f in DESTINATION_FIELDS if document.get(f) != current.get(f)]
            keyed = current.get("api_key") is not None and document.get("api_key") is not None
            kept = keyed and not (sends_key or key_readable)
            if kept and moved:
                raise Forbidden(
                    f"changing `{'`, `'.join(moved)}` of {self._display(path)} would send its key "
                    "somewhere else: send `api_key` with the change (or be a client with secrets:read)"
                )
            data = self._render(path, original, document)
            gained = file_recipients(data) - file_recipients(files[path]) if kept else set()
            if gained:  # a recipient added to .sops.yaml would read a key nobody rotated for it
                raise Conflict(
                    f"{self._display(path)}: keeping its key would encrypt it for recipients it does not "
                    f"have ({', '.join(sorted(gained))}): run `switchboard rotate` first, or send `api_key`"
                )
            return path, data, True

        return await self._write(_Draft("update", kind, provider_id, make), client, reason)

    def _plaintext(self, path: str, data: bytes, loaded: Loaded) -> bytes:
        """The file's plaintext YAML: decrypted by sops when it holds a key (its MAC covers every value)."""
        if not loaded.encrypted:
            return data
        try:
            return self.sops.decrypt_text(data, self._display(path))
        except SopsNoKey:
            raise Conflict(
                f"{self._display(path)} holds a key, so changing it needs the service's identity "
                "(SOPS_AGE_KEY_FILE), and this one cannot decrypt it"
            ) from None
        except SopsError as exc:
            raise Conflict(f"{self._display(path)}: {exc.case}") from None

    def _render(self, path: str, original: bytes | None, document: Mapping[str, Any]) -> bytes:
        """The file's new bytes: YAML, with any secret encrypted by sops (in memory, never on disk)."""
        text = (
            editing.render_edit(original, document) if original is not None else editing.render_new(document)
        )
        if not any(document.get(name) is not None for name in SECRET_FIELDS):
            return text
        name = self._display(path)
        problems = check_sops_config(self.settings.sops_config, [str(self.repo_root / path)])
        if problems:
            raise Unprocessable(
                "`.sops.yaml` cannot encrypt this file",
                problems=[_problem(".sops.yaml", "", p) for p in problems],
            )
        if self.mode == "commit":
            own = self.sops.own_recipients()
            if own and not own & set(recipients(self.settings.sops_config)):
                raise Unprocessable(
                    "the service could not read this key: its identity is not a recipient in .sops.yaml",
                    problems=[
                        _problem(".sops.yaml", "", "the service's identity is not among the recipients")
                    ],
                )
        try:
            return self.sops.encrypt(text, str(self.repo_root / path))
        except SopsError as exc:
            raise Unprocessable(
                f"{name}: cannot encrypt: {exc.case}", problems=[_problem(name, "api_key", exc.case)]
            ) from None

    # -- the common path ----------------------------------------------------------------------

    async def _write(self, draft: _Draft, client: str, reason: str | None) -> Written:
        if self.mode == "off" or self.committer is None:
            why = "outside a git repository" if self.repo is None else "SWITCHBOARD_WRITE_MODE is off"
            raise MethodNotAllowed(f"writes over HTTP are off ({why}): change the files through git")
        async with self.lock:
            synced = await asyncio.to_thread(self._delivery)
            written = await self._commit(draft, client, reason, synced)
        if written.pending:  # pushed from git-sync's checkout: applied when git-sync brings it
            return await self._until_applied(written)
        return written

    def _delivery(self) -> str | None:
        """The commit git-sync's checkout is at, when this replica is fed by git-sync; None when
        it writes to a branch of its own. MethodNotAllowed when a replica that pulls or is
        synced has nowhere to push a write.

        With the built-in pull or git-sync, the remote is the truth: a commit made here alone
        would be served by this replica only, and (with the pull) keep its branch from ever
        fast-forwarding again. A git-sync checkout is a worktree behind a swapped link, on a
        detached HEAD, and git-sync's: it is never moved here (nor even read after this, since
        git-sync may delete it any moment). The commit is built in the repository's own git
        directory, pushed, and applied when git-sync brings it back.
        """
        assert self.committer is not None  # noqa: S101 - checked by _write
        synced: str | None = None
        if link_folders(self.settings.providers_dir):
            found = self._checkout()
            if found is not None:
                synced, repo = found
                if repo.root != self.committer.repo.root:
                    self.repo, self.committer = (
                        repo,
                        Committer(repo, self.committer.committer, stopping=self.committer.stopping),
                    )
        if self.settings.git_push is None and (synced or self.settings.git_pull is not None):
            feed = "git-sync" if synced else "SWITCHBOARD_GIT_PULL"
            raise MethodNotAllowed(
                f"this replica is fed from a remote ({feed}), so a write must reach the remote first: "
                "set SWITCHBOARD_GIT_PUSH, or write through git"
            )
        return synced

    def _checkout(self) -> tuple[str, GitRepo] | None:
        """(HEAD, the repository's git directory) of the detached worktree behind the link; None
        for a branch checked out. A worktree git-sync removes under the question is asked again."""
        for _ in range(3):
            worktree = GitRepo.find(self.settings.providers_dir)
            if worktree is None:
                return None
            try:
                if worktree.run("symbolic-ref", "-q", "HEAD", ok=(0, 1)).strip():
                    return None
                head = worktree.head()
                common = worktree.run("rev-parse", "--path-format=absolute", "--git-common-dir")
            except GitError:
                continue  # swapped and removed meanwhile
            if head is not None:
                return head, GitRepo(Path(common.decode().strip()))
        raise Conflict("the checkout behind the providers link kept changing; try again")

    async def _commit(
        self, draft: _Draft, client: str, reason: str | None, synced: str | None = None
    ) -> Written:
        committer = self.committer
        assert committer is not None  # noqa: S101 - checked by _write
        local: str | None = synced
        ref = "HEAD"
        if synced is None:
            ref = await asyncio.to_thread(committer.ref)
            if self.mode == "commit":
                _branch_name(ref)  # a commit on a detached HEAD is lost at the next checkout or sync
            local = await asyncio.to_thread(committer.resolve, ref)
        subject = f"{draft.verb} {draft.kind} {draft.subject}"
        text = message(subject, reason, client)
        author = Identity.client(client)
        base = local
        target: str | None = None
        for attempt in range(1, PUSH_ATTEMPTS + 1):
            check = attempt == 1 and synced is None  # git-sync's checkouts hold no local edits
            path, data, changed = await asyncio.to_thread(self._prepare, draft, base, check)
            if not changed:
                return await self._unchanged(draft, path, data, base)
            commit = await asyncio.to_thread(committer.build, base, {path: data}, author=author, text=text)
            if self.mode == "branch":
                branch = await asyncio.to_thread(self._branch, draft, commit)
                rejected = await self._push(commit, branch) if self.settings.git_push else None
                if rejected is not None:
                    await asyncio.to_thread(committer.repo.run, "update-ref", "-d", f"refs/heads/{branch}")
                    raise Conflict(f"the push of {branch} failed: {rejected}")
                return Written(
                    draft.verb,
                    draft.kind,
                    draft.subject,
                    self._display(path),
                    commit,
                    blob_sha(data) if data is not None else None,
                    branch=branch,
                )
            if not self.settings.git_push:
                return await self._apply(draft, ref, local, commit, path, data)
            target = target or await self._target(ref, local, synced is not None)
            rejected = await self._push(commit, target)
            if rejected is None:
                if synced is not None:  # git-sync's checkout is not moved here: it brings the commit back
                    blob = blob_sha(data) if data is not None else None
                    name = self._display(path)
                    return Written(draft.verb, draft.kind, draft.subject, name, commit, blob, pending=True)
                if base != local and not await asyncio.to_thread(self._descends, commit, local):
                    raise Conflict(
                        "the push landed, but the local branch has commits the remote lacks, so it was not "
                        "moved: reconcile the local branch with the remote"
                    )
                return await self._apply(draft, ref, local, commit, path, data)
            log.info("push of %s rejected (attempt %d): %s", subject, attempt, rejected)
            if attempt == PUSH_ATTEMPTS:
                raise Conflict(f"the push was refused {PUSH_ATTEMPTS} times; nothing was written: {rejected}")
            try:
                base = await asyncio.to_thread(committer.fetch, self.settings.git_push, target)
            except GitError as exc:
                raise Conflict(
                    f"the push was refused and the fetch failed; nothing was written: {exc}"
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _target(self, ref: str, local: str | None, synced: bool) -> str:
        """The remote branch a write is pushed to: the current branch's name, or, from git-sync's
        detached checkout, the branch it follows (`SWITCHBOARD_GIT_PULL`'s, else asked of the remote)."""
        assert self.committer is not None and self.settings.git_push is not None  # noqa: S101
        if not synced:
            return _branch_name(ref)
        if self.settings.git_pull is not None:
            return self.settings.git_pull.partition("/")[2]
        try:
            return await asyncio.to_thread(self.committer.remote_branch, self.settings.git_push, local)
        except GitError as exc:
            raise Conflict(f"cannot tell which branch of the remote to push to: {exc}") from None

    async def _until_applied(self, written: Written) -> Written:
        """`written` once this replica applies its commit (or one after it), or still pending
        after `apply_wait_s`; never longer."""
        loop = asyncio.get_running_loop()
        applied = asyncio.Event()

        def wake(outcome: Outcome) -> None:  # in the applying thread
            loop.call_soon_threadsafe(applied.set)

        self.registry.on_apply.append(wake)
        deadline = loop.time() + self.apply_wait_s
        try:
            while True:
                applied.clear()
                state = self.registry.state
                if state.last_applied_commit is not None and await asyncio.to_thread(
                    self._landed, written.commit, state.last_applied_commit
                ):
                    snapshot = state.snapshot
                    return replace(written, generation=snapshot.generation, snapshot=snapshot, pending=False)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    log.info("%s pushed; not applied within %gs", written.commit[:12], self.apply_wait_s)
                    return written
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(applied.wait(), remaining)
        finally:
            self.registry.on_apply.remove(wake)

    def _landed(self, commit: str, applied: str) -> bool:
        if commit == applied:
            return True
        repo = self.repo  # the repository's own git directory, which git-sync never removes
        if repo is None:
            return False
        try:
            repo.run("merge-base", "--is-ancestor", commit, applied)
        except GitError:
            return False
        return True

    def _descends(self, commit: str, ancestor: str | None) -> bool:
        """Whether `ancestor` is in `commit`'s history (so moving a branch to it loses nothing)."""
        assert self.repo is not None  # noqa: S101
        if ancestor is None:
            return True
        try:
            self.repo.run("merge-base", "--is-ancestor", ancestor, commit)
        except GitError:
            return False
        return True

    def _prepare(self, draft: _Draft, base: str | None, first: bool) -> tuple[str, bytes | None, bool]:
        """Files at `base`, the draft's change on them, validated as `validate` would; raises 4xx."""
        assert self.repo is not None  # noqa: S101
        files = self.repo.read_tree(base, self._folder) if base else {}
        path, data, changed = draft.make(files, base)
        if first and self.committer is not None and self.committer.is_dirty(path, base):
            raise Conflict(
                f"{self._display(path)} has local changes that are not committed; "
                "commit or discard them first (a write never overwrites them)"
            )
        if changed:
            self._validate(files, path, data)
        return path, data, changed

    def _validate(self, files: Mapping[str, bytes], path: str, data: bytes | None) -> None:
        name = self._display(path)
        loaded: dict[str, Loaded] = {}
        if data is not None:
            try:
                loaded[name] = parse(name, data)
            except FileRejected as exc:
                raise Unprocessable(
                    f"{name} would not be valid ({len(exc.problems)} problem(s))",
                    problems=_problems(exc.problems),
                ) from None
        for other, content in files.items():
            if other == path or not is_config_file(PurePosixPath(other).name):
                continue
            try:
                loaded[self._display(other)] = parse(self._display(other), content)
            except FileRejected:
                continue  # a broken sibling is its own change, as `validate` reports it
        problems = cross_check(loaded.values())
        if problems:
            raise Unprocessable(
                f"the configuration would not be valid ({len(problems)} problem(s))",
                problems=_problems(problems),
            )

    async def _push(self, commit: str, branch: str) -> str | None:
        assert self.committer is not None and self.settings.git_push is not None  # noqa: S101
        return await asyncio.to_thread(self.committer.push, self.settings.git_push, commit, branch)

    async def _apply(
        self, draft: _Draft, ref: str, local: str | None, commit: str, path: str, data: bytes | None
    ) -> Written:
        """Move the branch and files to `commit` with the watcher held off, then reload once."""
        committer = self.committer
        assert committer is not None  # noqa: S101
        paths = await asyncio.to_thread(committer.changed, local, commit)
        dirty = [p for p in paths if await asyncio.to_thread(committer.is_dirty, p, local)]
        if dirty:
            raise Conflict(
                f"{', '.join(self._display(p) for p in dirty)}: local changes that are not committed; "
                "a write never overwrites them"
            )
        async with self.reloader.exclusive() as reload:
            try:
                moved = await asyncio.to_thread(committer.advance, ref, local, commit)
            except GitError as exc:
                raise Conflict(f"git refused the write; nothing changed: {exc}") from None
            name = self._display(path)
            refusal = await self._refusal(reload, name)
            if refusal is not None and not self.settings.git_push:
                await asyncio.to_thread(committer.undo, ref, local, commit, moved)
                await self._refusal(reload, name)
                raise Conflict(f"the service did not apply the write, and it was undone: {refusal}")
        snapshot = self.registry.snapshot
        blob = blob_sha(data) if data is not None else None
        return Written(
            draft.verb, draft.kind, draft.subject, name, commit, blob, snapshot.generation, snapshot
        )

    @staticmethod
    async def _refusal(reload: Callable[[], Awaitable[Outcome]], name: str) -> str | None:
        """Reload; why the written file `name` was not applied, or None when it was.

        Not applied: the file refused, the batch refused as a whole (files with local edits may
        make it fail cross-file checks that passed at HEAD), or the reload failing outright.
        """
        try:
            outcome = await reload()
        except Exception:  # a write must not stay half-applied, whatever went wrong
            log.exception("the reload after a write failed")
            return "the reload failed (see the service log)"
        if name in outcome.refused:
            return outcome.refused[name]
        if not outcome.applied:
            return "; ".join(f"{file}: {reason}" for file, reason in sorted(outcome.refused.items()))
        return None

    async def _unchanged(self, draft: _Draft, path: str, data: bytes | None, base: str | None) -> Written:
        snapshot = self.registry.snapshot
        blob = blob_sha(data) if data is not None else None
        return Written(
            draft.verb,
            draft.kind,
            draft.subject,
            self._display(path),
            base or "",
            blob,
            snapshot.generation,
            snapshot,
            changed=False,
        )

    def _branch(self, draft: _Draft, commit: str) -> str:
        """A new branch `switchboard/<verb>-<id>-<n>` at `commit` (never an existing one).

        `n` follows the highest taken, found in one listing (trying numbers one git call each
        made the thousandth write of an id cost a thousand calls). An id may hold `..`, which
        a ref name may not: it is written `.`.
        """
        assert self.repo is not None  # noqa: S101
        stem = f"switchboard/{draft.verb}-{re.sub(r'[.]{2,}', '.', draft.subject)}"
        listed = self.repo.run("for-each-ref", "--format=%(refname:strip=2)", f"refs/heads/{stem}-*")
        tails = (line.removeprefix(f"{stem}-") for line in listed.decode().splitlines())
        highest = max((int(t) for t in tails if t.isdigit()), default=0)
        for n in range(highest + 1, highest + 1 + _BRANCH_ATTEMPTS):
            try:
                self.repo.run("update-ref", f"refs/heads/{stem}-{n}", commit, "0" * 40)
            except GitError:
                continue  # taken meanwhile (another replica?): the next number
            return f"{stem}-{n}"
        raise Conflict(f"no free branch name under {stem}-")

    # -- files ------------------------------------------------------------------------------------

    @property
    def repo_root(self) -> Path:
        assert self.repo is not None  # noqa: S101
        return self.repo.root

    def _path(self, name: str) -> str:
        return f"{self._folder}/{name}" if self._folder not in ("", ".") else name

    def _display(self, path: str) -> str:
        """A repository path as events and answers name files (relative to the configuration root)."""
        absolute = (self.repo_root / path).absolute()
        try:
            return absolute.relative_to(self.settings.files_root.absolute()).as_posix()
        except ValueError:
            return path

    def _find(self, files: Mapping[str, bytes], provider_id: str) -> str | None:
        for ext in ("yaml", "yml"):
            path = self._path(f"{provider_id}.{ext}")
            if path in files:
                return path
        return None

    def _existing(self, files: Mapping[str, bytes], kind: str, provider_id: str) -> tuple[str, Loaded]:
        path = self._find(files, provider_id)
        if path is None:
            raise NotFound(f"no provider `{provider_id}`")
        try:
            loaded = parse(self._display(path), files[path])
        except FileRejected as exc:
            raise Conflict(
                f"{self._display(path)} is not valid in git: {exc.reason}; fix it through git"
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
            raise PreconditionFailed(
                f"{self._display(path)} changed since (it is now {current}); read it again"
            )


# -- request bodies -------------------------------------------------------------------------------


def _provider_body(kind: str, body: Mapping[str, Any], provider_id: str | None = None) -> dict[str, Any]:
    if not isinstance(body, Mapping):
        raise Unprocessable("the body must be a JSON object", problems=[_problem("", "", "not an object")])
    document = dict(body)
    given = document.setdefault("kind", kind)
    if given != kind:
        raise Unprocessable(
            f"`kind` is {given!r} but this route writes {kind!r}",
            problems=[_problem("", "kind", f"must be {kind}")],
        )
    if provider_id is not None and document.setdefault("id", provider_id) != provider_id:
        raise Unprocessable(
            "`id` must be the id in the path", problems=[_problem("", "id", "must match the path")]
        )
    if not isinstance(document.get("id"), str) or not re.fullmatch(ID_PATTERN, document["id"]):
        problem = _problem("", "id", f"required: a string matching {ID_PATTERN}")
        raise Unprocessable(
            "`id` must be a lowercase name that the file can be named after", problems=[problem]
        )
    _check_body(document)
    return document


def _check_body(document: dict[str, Any]) -> None:
    """What must hold before anything is rendered or encrypted; a key's surrounding whitespace
    (a line break pasted with it) is trimmed here, so the file holds the key alone."""
    if "sops" in document:
        raise Unprocessable("`sops` is written by sops", problems=[_problem("", "sops", "not a field")])
    for name in SECRET_FIELDS:
        value = document.get(name)
        if value is not None and value is not _KEEP and not isinstance(value, str):
            raise Unprocessable(
                f"`{name}` must be a string", problems=[_problem("", name, "must be a string")]
            )
        if isinstance(value, str):
            value = document[name] = value.strip()
        if isinstance(value, str) and unsendable(value):  # no header can carry it
            raise Unprocessable(
                f"`{name}` holds a control character (a pasted line break?); a key is one line",
                problems=[_problem("", name, "holds a control character")],
            )
    if editing.depth(document) > editing.MAX_DEPTH:
        raise Unprocessable("the document nests too deeply", problems=[_problem("", "", "nested too deeply")])


def _problem(file: str, path: str, message: str) -> dict[str, str]:
    return {"file": file, "path": path, "message": message}


def _problems(problems: list[Problem]) -> list[dict[str, str]]:
    return [_problem(p.file, p.path, p.message) for p in problems]


def _branch_name(ref: str) -> str:
    if not ref.startswith("refs/heads/"):
        raise Conflict(
            "HEAD is detached (a git-sync checkout?): a write needs a branch to commit to "
            "(check one out, or use SWITCHBOARD_WRITE_MODE=branch)"
        )
    return ref.removeprefix("refs/heads/")


def _routing_file(files: Mapping[str, bytes], display: Callable[[str], str]) -> tuple[str, bytes] | None:
    for path, data in sorted(files.items()):
        if not is_config_file(PurePosixPath(path).name):
            continue
        try:
            loaded = parse(display(path), data)
        except FileRejected:
            continue
        if isinstance(loaded.document, Routing):
            return path, data
    return None


def _check_no_broken_routing(files: Mapping[str, bytes], display: Callable[[str], str]) -> None:
    """Conflict when a routing file in git does not load: a route written beside it, or over
    it, would drop every purpose it holds (the service still serves them from its last good
    version)."""
    for path, data in sorted(files.items()):
        if not is_config_file(PurePosixPath(path).name):
            continue
        try:
            parse(display(path), data)
        except FileRejected as exc:
            if PurePosixPath(path).stem == "routing" or _ROUTING_KIND.search(data):
                raise Conflict(
                    f"{display(path)} is not valid in git ({exc.reason}); fix it through git first, "
                    "since a route written now would drop the routes it holds"
                ) from None


_ROUTING_KIND = re.compile(rb"""(?m)^kind[ \t]*:[ \t]*(routing|'routing'|"routing")[ \t]*(#.*)?$""")
"""`kind: routing` at the top level, found without loading YAML that failed to load (an alias
bomb, say)."""


def _purposes_naming(
    files: Mapping[str, bytes], provider_id: str, display: Callable[[str], str]
) -> list[str]:
    found = _routing_file(files, display)
    if found is None:
        return []
    routing = parse(display(found[0]), found[1]).document
    assert isinstance(routing, Routing)  # noqa: S101
    return [p for p, r in sorted(routing.purposes.items()) if provider_id in r.primary + r.fallbacks]
