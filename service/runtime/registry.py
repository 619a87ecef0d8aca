"""The live configuration: the current `Snapshot`, swapped atomically, and what changed.

`Registry.apply` takes the set of files to try (each one parsed and decrypted already),
builds the next snapshot, and records the difference to the previous one in the event log
with the commit and author it came from. A set whose cross-file checks fail is refused as
a whole and the previous snapshot stays.

What readers see is one immutable `State` (snapshot, refused files, commits, readiness,
whether authentication is required), published in one assignment: take `registry.state`
once per request and read only that, and nothing can pair a new snapshot with an old list
of refusals. `apply` runs in a worker thread (it appends fsynced events and asks git), one
at a time; it knows nothing of asyncio. `on_apply` callbacks hear of every outcome.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from service.config.loader import MAX_FILE_BYTES, Loaded
from service.config.models import AiServer, ApiKey, Clients
from service.config.secret import Secret
from service.config.snapshot import NO_GIT, Attribution, Snapshot, newcomers
from service.config.view import ConfigView, diff_views
from service.errors import EventLogError, Problem, SnapshotRejected
from service.files import leads_outside, read_limited
from service.journal.events import ConfigRejected, draft_from_change
from service.journal.log import EventLog
from service.runtime.state import Refusal, State
from service.vcs.attribution import Attributor, Batch

log = logging.getLogger(__name__)

_FIRST_LOAD_ATTEMPTS = 8
_PROVIDER_KINDS = ("ai_server", "api_key")

CLIENTS_GONE = (
    "the clients file was removed; its last good clients stay until a clients file is back "
    "(authentication is never turned off while the service runs)"
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one `apply` did: the snapshot now current, and how many events it recorded."""

    snapshot: Snapshot
    applied: bool
    events: int
    refused: Mapping[str, str] = field(default_factory=dict)


OnApply = Callable[[Outcome], None]


class Registry:
    """Holds the current state, and records every change of it in the event log."""

    def __init__(self, events: EventLog, root: Path, attributor: Attributor | None = None) -> None:
        self.events = events
        self.root = root
        self.attributor = attributor
        self.on_apply: list[OnApply] = []
        """Called with the `Outcome` of every apply, applied or refused, in order, in the
        applying thread (a worker thread: hand over to a loop with `call_soon_threadsafe`).
        A callback that raises is logged; the others still run."""
        self._state = State()
        self._lock = threading.Lock()
        self._attributed_head: str | None = None
        self._view: ConfigView = events.checkpoint()
        """What the log says the configuration is: the first apply records the difference."""

    @property
    def state(self) -> State:
        """The current state. Take it once per request and read only that one."""
        return self._state

    @property
    def snapshot(self) -> Snapshot:
        """The current snapshot (`state.snapshot`)."""
        return self._state.snapshot

    @property
    def ready(self) -> bool:
        return self._state.ready

    @property
    def refused(self) -> Mapping[str, str]:
        return self._state.refused

    @property
    def last_applied_commit(self) -> str | None:
        return self._state.last_applied_commit

    @property
    def last_attempted_commit(self) -> str | None:
        return self._state.last_attempted_commit

    @property
    def attribution(self) -> Mapping[str, Attribution]:
        """Where each file of the current snapshot came from (commit, author)."""
        return self._state.snapshot.attribution

    def apply(
        self,
        candidate: Mapping[str, Loaded],
        rejected: Mapping[str, Refusal | str],
        *,
        source: Path | None = None,
        holder: Path | None = None,
    ) -> Outcome:
        """Try `candidate` (file -> loaded) as the next configuration; `rejected` failed on their own.

        Files in `rejected` that are new or have a new reason get a `config.rejected` event.
        A refused provider file without a good version still counts as known, so routing
        naming it applies (docs/reference.md §4). On the first load a set that fails its cross-file checks
        is retried without the files at fault, so that a broken routing file cannot keep the
        service from starting. One apply at a time, from any thread; EventLogError once the
        log is closed (the service is stopping), before anything is recorded.

        `source` is the folder the files were read from, links resolved: behind a link that
        git-sync swaps, commits and authors are asked of that worktree's repository. With
        `holder`, it is where the folder would be, under `holder`, the folder found holding it
        (resolved): missing there, and git says so at the commit served (`service.vcs.absence`),
        so the candidate is empty.
        """
        with self._lock:
            if self.events.closed:
                raise EventLogError(f"{self.events.path}: the event log is closed; nothing applied")
            if source is not None and self.attributor is not None:
                self.attributor.follow(source)
            pinned = self.attributor.pinned() if self.attributor else contextlib.nullcontext(None)
            with pinned as head:
                if source_gone(source, holder=holder):
                    # The worktree read was removed since (git-sync swapped the link on): what it
                    # held cannot be attributed, and a newer one is there to read instead.
                    state = self._state
                    outcome = Outcome(state.snapshot, False, 0, state.refused)
                else:
                    outcome = self._apply(candidate, {f: _refusal(r) for f, r in rejected.items()}, head)
            for callback in list(self.on_apply):
                try:
                    callback(outcome)
                except Exception:
                    log.exception("an on_apply callback failed")
        return outcome

    def wait(self, reason: str) -> None:
        """Not ready yet, and why: the first load cannot be done now (the folder cannot be
        listed, so an empty configuration would be served as if it were the one). Once ready,
        nothing: the last good configuration is served, and refusals say what is wrong."""
        with self._lock:
            if not self._state.ready:
                self._state = replace(self._state, waiting=reason)

    def _apply(
        self, candidate: Mapping[str, Loaded], rejected: Mapping[str, Refusal], head: str | None
    ) -> Outcome:
        state = self._state
        files = dict(candidate)
        refusals = dict(rejected)
        _keep_clients(files, refusals, state.snapshot)
        for file, problem in newcomers(files, self._applied(state)).items():
            refusals[file] = Refusal(f"line {problem.line}: {problem.message}", _kind(files.pop(file)))
        recorded = self._record_rejections(refusals, state.refused)
        unavailable = _unavailable(files, refusals)
        generation = state.snapshot.generation + 1
        for _ in range(_FIRST_LOAD_ATTEMPTS if not state.ready else 1):
            try:
                snapshot = Snapshot.build(files, generation, unavailable)
                break
            except SnapshotRejected as exc:
                reasons = _by_file(exc.problems)
                at_fault = {f: Refusal(r, _kind(files.get(f))) for f, r in reasons.items()}
                recorded += self._record_rejections(at_fault, state.refused)
                refusals.update(at_fault)
                if state.ready:
                    self._state = replace(
                        state,
                        refused=_reasons(refusals),
                        last_attempted_commit=head,
                        auth_required=_auth_required(state, refusals),
                    )
                    return Outcome(state.snapshot, False, recorded, self._state.refused)
                files = {f: loaded for f, loaded in files.items() if f not in reasons}
        else:
            snapshot = Snapshot(generation=generation)
        snapshot, changed = self._swap(state, snapshot, head)
        self._state = State(
            snapshot=snapshot,
            refused=_reasons(refusals),
            ready=True,
            last_applied_commit=head,
            last_attempted_commit=head,
            auth_required=_auth_required(state, refusals) or snapshot.clients is not None,
        )
        return Outcome(snapshot, True, recorded + changed, self._state.refused)

    def _swap(self, state: State, snapshot: Snapshot, head: str | None) -> tuple[Snapshot, int]:
        """The snapshot to publish, with its attribution, and how many change events it recorded."""
        old = state.snapshot
        same_files = {f: x.sha256 for f, x in old.files.items()} == {
            f: x.sha256 for f, x in snapshot.files.items()
        }
        if same_files and old.unavailable == snapshot.unavailable and old.generation > 0:
            if head != self._attributed_head:
                # Same files, new HEAD (a commit, or git moving HEAD after writing the files):
                # the answers' commits are refreshed; nothing changed, so no event.
                current = {self.root / f: x.data for f, x in old.files.items()}
                return self._attributed(old, self._attribute_batch(current), head), 0
            return old, 0
        view = snapshot.view()
        changes = diff_views(
            self._view,
            view,
            _secrets_changed(old, snapshot),
            routing_file=self._file_of("routing", snapshot, old),
            clients_file=self._file_of("clients", snapshot, old),
            token_changed=_tokens_changed(old, snapshot),
        )
        contents: dict[Path, bytes | None] = {self.root / f: x.data for f, x in snapshot.files.items()}
        for change in changes:
            if change.file is not None and change.file not in snapshot.files:
                contents[self.root / change.file] = None  # removed
        batch = self._attribute_batch(contents)
        attribution = batch.files
        snapshot = self._attributed(snapshot, batch, head)
        for change in changes:
            who = attribution.get(self.root / change.file, NO_GIT) if change.file else NO_GIT
            draft = draft_from_change(
                change, commit=who.commit, author=who.author, uncommitted=who.uncommitted
            )
            self.events.append(draft)
        self._view = view
        if not changes and state.ready:  # same configuration, new bytes (a re-encryption)
            snapshot = replace(snapshot, generation=old.generation)
        return snapshot, len(changes)

    def _applied(self, state: State) -> dict[str, str]:
        """The routing and clients files applied: the snapshot's, or at the first load the ones
        the log last named, so that a restart keeps the file the service kept (docs/reference.md §4)."""
        files = {k: state.snapshot.file_of_kind(k) for k in ("routing", "clients")}
        if not state.ready:
            files = {k: f or self.events.last_file_of(f"{k}.updated") for k, f in files.items()}
        return {k: f for k, f in files.items() if f is not None}

    def _file_of(self, kind: str, new: Snapshot, old: Snapshot) -> str | None:
        """The file a routing or clients change names: the new one, the old one, or (at the
        first load after a restart, when it was removed while the service was down) the one
        the log last named."""
        return new.file_of_kind(kind) or old.file_of_kind(kind) or self.events.last_file_of(f"{kind}.updated")

    def _attributed(self, snapshot: Snapshot, batch: Batch, head: str | None) -> Snapshot:
        """`snapshot` carrying its files' attribution, so a reader needs nothing else: each
        file's commits, and the commit where the folder last changed when it is whole at HEAD."""
        self._attributed_head = head
        files = {f: batch.files.get(self.root / f, NO_GIT) for f in snapshot.files}
        whole = head is not None and all(a.commit == head for a in files.values())
        return replace(
            snapshot,
            attribution=MappingProxyType(files),
            commit=head if whole else None,
            changed=(batch.changed or head) if whole else None,
            order=MappingProxyType(dict(batch.order)) if whole else MappingProxyType({}),
        )

    def _record_rejections(self, refusals: Mapping[str, Refusal], before: Mapping[str, str]) -> int:
        fresh = {f: r.reason for f, r in refusals.items() if before.get(f) != r.reason}
        attribution = self._attribute({self.root / f: _read(self.root / f, self.root) for f in fresh})
        for file, reason in sorted(fresh.items()):
            who = attribution.get(self.root / file, NO_GIT)
            log.warning("refused %s: %s", file, reason)
            self.events.append(
                ConfigRejected(
                    subject=Path(file).stem,
                    file=file,
                    reason=reason,
                    commit=who.commit,
                    author=who.author,
                    uncommitted=who.uncommitted,
                )
            )
        return len(fresh)

    def _attribute(self, contents: Mapping[Path, bytes | None]) -> Mapping[Path, Attribution]:
        return self._attribute_batch(contents).files if contents else {}

    def _attribute_batch(self, contents: Mapping[Path, bytes | None]) -> Batch:
        """The batch's attribution; without files (an empty folder) still where the folder last
        changed, the commit part of the lists' tags (docs/reference.md §9), asked of git."""
        if self.attributor is None:
            return Batch({}, None)
        return self.attributor.attribute_batch(contents)


def source_gone(source: Path | None, *, holder: Path | None = None) -> bool:
    """The worktree `source` was read from was removed since (git-sync swapped its link on): the
    folder read, or for a missing folder the `holder` found holding it, is no longer there."""
    if source is None:
        return False
    return not (holder or source).is_dir()


def _refusal(value: Refusal | str) -> Refusal:
    return value if isinstance(value, Refusal) else Refusal(value)


def _reasons(refusals: Mapping[str, Refusal]) -> Mapping[str, str]:
    return MappingProxyType({f: r.reason for f, r in sorted(refusals.items())})


def _kind(loaded: Loaded | None) -> str | None:
    return loaded.document.kind if loaded is not None else None


def _keep_clients(files: dict[str, Loaded], refusals: dict[str, Refusal], current: Snapshot) -> None:
    """A clients file removed while the service runs keeps its last good clients (docs/reference.md §6)."""
    if any(isinstance(loaded.document, Clients) for loaded in files.values()):
        return
    kept = current.file_of_kind("clients")
    if kept is not None:
        files[kept] = current.files[kept]
        refusals.setdefault(kept, Refusal(CLIENTS_GONE, "clients"))


def _auth_required(state: State, refusals: Mapping[str, Refusal]) -> bool:
    """Authentication stays on once a clients file was seen, good or refused (docs/reference.md §2.3);
    a file the cross-file checks refused counts too (two clients files at the first load)."""
    return state.auth_required or any(r.kind == "clients" for r in refusals.values())


def _unavailable(files: Mapping[str, Loaded], refusals: Mapping[str, Refusal]) -> frozenset[str]:
    """Ids of refused provider files with no good version to serve (a file's id is its name)."""
    return frozenset(
        Path(file).stem
        for file, refusal in refusals.items()
        if refusal.kind in _PROVIDER_KINDS and file not in files
    )


def _by_file(problems: list[Problem]) -> dict[str, str]:
    reasons: dict[str, list[str]] = {}
    for problem in problems:
        reasons.setdefault(problem.file, []).append(f"line {problem.line}: {problem.message}")
    return {file: "; ".join(messages) for file, messages in reasons.items()}


def _secrets_changed(old: Snapshot, new: Snapshot) -> frozenset[str]:
    changed = set()
    for provider_id, provider in new.providers.items():
        before = old.providers.get(provider_id)
        if isinstance(provider, AiServer | ApiKey) and isinstance(before, AiServer | ApiKey):
            a, b = before.api_key, provider.api_key
            if isinstance(a, Secret) and isinstance(b, Secret) and a != b:
                changed.add(provider_id)
    return frozenset(changed)


def _tokens_changed(old: Snapshot, new: Snapshot) -> frozenset[str]:
    """Names of the clients whose token hash changed: recorded even when the masks match."""
    if old.clients is None or new.clients is None:
        return frozenset()
    before = {c.name: c.token_sha256 for c in old.clients.clients}
    return frozenset(
        c.name for c in new.clients.clients if before.get(c.name, c.token_sha256) != c.token_sha256
    )


def _read(path: Path, root: Path) -> bytes | None:
    """A refused file's content, for its attribution; never more than the 1 MiB limit.

    A file over the limit gives its head, so it is attributed as uncommitted (with the
    author of its last commit): reading it whole is what its refusal is there to avoid. A
    symbolic link out of the repository is never read (docs/reference.md §4): it gives its
    target, what git holds for a link, so it is under HEAD only once committed.
    """
    try:
        if not path.is_symlink():
            return read_limited(path, MAX_FILE_BYTES, follow=False)[0]
        if leads_outside(path, root):
            return os.fsencode(path.readlink())
        return read_limited(Path(os.path.realpath(path)), MAX_FILE_BYTES, follow=False)[0]
    except OSError:
        return None
