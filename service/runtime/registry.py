"""The live configuration: the current `Snapshot`, swapped atomically, and what changed.

`Registry.apply` takes the set of files to try (each one parsed and decrypted already),
builds the next snapshot, and records the difference to the previous one in the event log
with the commit and author it came from. A set whose cross-file checks fail is refused as
a whole and the previous snapshot stays. Readers take `registry.snapshot` once per request:
an attribute read, so they see the old or the new snapshot, never a mix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from service.config.loader import Loaded
from service.config.models import AiServer, ApiKey
from service.config.secret import Secret
from service.config.snapshot import NO_GIT, Attribution, Snapshot
from service.config.view import ConfigView, diff_views
from service.errors import Problem, SnapshotRejected
from service.journal.events import ConfigRejected, draft_from_change
from service.journal.log import EventLog
from service.vcs.attribution import Attributor

log = logging.getLogger(__name__)

_FIRST_LOAD_ATTEMPTS = 8


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one `apply` did: the snapshot now current, and how many events it recorded."""

    snapshot: Snapshot
    applied: bool
    events: int
    refused: Mapping[str, str] = field(default_factory=dict)


class Registry:
    """Holds the current snapshot and the files refused, and records every change."""

    def __init__(self, events: EventLog, root: Path, attributor: Attributor | None = None) -> None:
        self.events = events
        self.root = root
        self.attributor = attributor
        self.ready = False
        self.refused: Mapping[str, str] = MappingProxyType({})
        """Files refused now, with the reason: their last good version (if any) is served."""
        self.last_applied_commit: str | None = None
        self.last_attempted_commit: str | None = None
        self._snapshot = Snapshot()
        self._attributed_head: str | None = None
        self._view: ConfigView = events.checkpoint()
        """What the log says the configuration is: the first apply records the difference."""

    @property
    def snapshot(self) -> Snapshot:
        """The current snapshot. Take it once per request and read only that one."""
        return self._snapshot

    @property
    def attribution(self) -> Mapping[str, Attribution]:
        """Where each file of the current snapshot came from (commit, author)."""
        return self._snapshot.attribution

    def apply(self, candidate: Mapping[str, Loaded], rejected: Mapping[str, str]) -> Outcome:
        """Try `candidate` (file -> loaded) as the next configuration; `rejected` failed on their own.

        Files in `rejected` that are new or have a new reason get a `config.rejected` event.
        On the first load a set that fails its cross-file checks is retried without the
        files at fault, so that a broken routing file cannot keep the service from starting.
        """
        head = self.attributor.head() if self.attributor else None
        self.last_attempted_commit = head
        refused = dict(rejected)
        recorded = self._record_rejections(rejected)
        files = dict(candidate)
        for _ in range(_FIRST_LOAD_ATTEMPTS if not self.ready else 1):
            try:
                snapshot = Snapshot.build(files, self._snapshot.generation + 1)
                break
            except SnapshotRejected as exc:
                reasons = _by_file(exc.problems)
                recorded += self._record_rejections(reasons)
                refused.update(reasons)
                if self.ready:
                    self.refused = MappingProxyType(refused)
                    return Outcome(self._snapshot, False, recorded, self.refused)
                files = {f: loaded for f, loaded in files.items() if f not in reasons}
        else:
            snapshot = Snapshot(generation=self._snapshot.generation + 1)
        recorded += self._swap(snapshot, head)
        self.last_applied_commit = head
        self.refused = MappingProxyType(refused)
        self.ready = True
        return Outcome(self._snapshot, True, recorded, self.refused)

    def _swap(self, snapshot: Snapshot, head: str | None) -> int:
        old = self._snapshot
        same_files = {f: x.sha256 for f, x in old.files.items()} == {
            f: x.sha256 for f, x in snapshot.files.items()
        }
        if same_files and old.generation > 0:
            if head != self._attributed_head:
                # Same files, new HEAD (a commit, or git moving HEAD after writing the files):
                # the answers' commits are refreshed; nothing changed, so no event.
                current = {self.root / f: x.data for f, x in old.files.items()}
                self._snapshot = self._attributed(old, self._attribute(current), head)
            return 0
        view = snapshot.view()
        changes = diff_views(
            self._view,
            view,
            _secrets_changed(old, snapshot),
            routing_file=self._file_of("routing", snapshot, old),
            clients_file=self._file_of("clients", snapshot, old),
        )
        contents: dict[Path, bytes | None] = {self.root / f: x.data for f, x in snapshot.files.items()}
        for change in changes:
            if change.file is not None and change.file not in snapshot.files:
                contents[self.root / change.file] = None  # removed
        attribution = self._attribute(contents)
        snapshot = self._attributed(snapshot, attribution, head)
        for change in changes:
            who = attribution.get(self.root / change.file, NO_GIT) if change.file else NO_GIT
            draft = draft_from_change(
                change, commit=who.commit, author=who.author, uncommitted=who.uncommitted
            )
            self.events.append(draft)
        if changes or not self.ready:
            self._snapshot = snapshot
        else:  # same configuration, new bytes (a re-encryption): no new generation
            self._snapshot = replace(snapshot, generation=old.generation)
        self._view = view
        return len(changes)

    def _file_of(self, kind: str, new: Snapshot, old: Snapshot) -> str | None:
        """The file a routing or clients change names: the new one, the old one, or (at the
        first load after a restart, when it was removed while the service was down) the one
        the log last named."""
        return new.file_of_kind(kind) or old.file_of_kind(kind) or self.events.last_file_of(f"{kind}.updated")

    def _attributed(
        self, snapshot: Snapshot, attribution: Mapping[Path, Attribution], head: str | None
    ) -> Snapshot:
        """`snapshot` carrying its files' attribution, so a reader needs nothing else."""
        self._attributed_head = head
        files = {f: attribution.get(self.root / f, NO_GIT) for f in snapshot.files}
        whole = head is not None and all(a.commit == head for a in files.values())
        return replace(snapshot, attribution=MappingProxyType(files), commit=head if whole else None)

    def _record_rejections(self, reasons: Mapping[str, str]) -> int:
        fresh = {f: r for f, r in reasons.items() if self.refused.get(f) != r}
        attribution = self._attribute({self.root / f: _read(self.root / f) for f in fresh})
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
        if not contents or self.attributor is None:
            return {}
        return self.attributor.attribute(contents)


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


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
