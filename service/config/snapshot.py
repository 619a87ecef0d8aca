"""The whole configuration at one moment: an immutable `Snapshot` built from loaded files.

Building a snapshot runs the cross-file checks (unique ids, one routing and one clients
file, routing naming enabled providers that list the purpose); a set of files that fails
them is refused as a whole. Every request reads one snapshot from start to end.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from service.config.loader import Decrypter, Loaded, config_files, decrypt, parse
from service.config.models import AiServer, ApiKey, Clients, Provider, Routing
from service.config.secret import mask
from service.config.sops_mac import Known, sharing_a_mac
from service.config.view import ConfigView
from service.errors import ConfigError, FileRejected, Problem, SnapshotRejected

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Attribution:
    """Where a file's current content came from (docs/reference.md §5): its commit and author.

    `commit` is HEAD when the file is committed unchanged there, else None with `uncommitted`;
    `author` is the author of the last commit touching the file. `changed`, for a file committed
    unchanged, is the last commit of HEAD's first-parent line that changed it (or the file a
    link leads to): the commit part of its answer's tag (docs/reference.md §6). Outside git, all null.
    `service.vcs.attribution` asks git; the snapshot only carries the answers.
    """

    commit: str | None
    author: str | None
    uncommitted: bool
    changed: str | None = None


NO_GIT = Attribution(None, None, False)


def cross_check(files: Iterable[Loaded], unavailable: Collection[str] = ()) -> list[Problem]:
    """Problems between files: duplicate ids, more than one routing or clients file (each of
    them), bad routing.

    `unavailable` are provider ids whose files exist but are refused (docs/reference.md §4): routing may
    name them, as it may name any provider a file defines.
    """
    problems: list[Problem] = []
    providers: dict[str, Loaded] = {}
    singles: dict[str, list[Loaded]] = {}
    for loaded in sorted(files, key=lambda f: f.file):
        doc = loaded.document
        if isinstance(doc, AiServer | ApiKey):
            if doc.id in providers:
                other = providers[doc.id].file
                message = f"id `{doc.id}` is also defined in {other}"
                problems.append(Problem(loaded.file, loaded.line("id"), message, "id"))
            else:
                providers[doc.id] = loaded
        else:
            singles.setdefault(doc.kind, []).append(loaded)
    for kind, claimants in singles.items():
        if len(claimants) > 1:  # none is taken over the others: which one is meant is unknown
            for loaded in claimants:
                others = ", ".join(c.file for c in claimants if c is not loaded)
                message = (
                    f"more than one {kind} file: {others} also defines `kind: {kind}`; "
                    f"none is applied while there is more than one"
                )
                problems.append(Problem(loaded.file, loaded.line("kind"), message, "kind"))
    routing = singles["routing"][0] if len(singles.get("routing", ())) == 1 else None
    if routing is not None and isinstance(routing.document, Routing):
        known = {k: v.document for k, v in providers.items() if isinstance(v.document, AiServer | ApiKey)}
        problems += _check_routing(routing, routing.document, known, unavailable)
    return problems


def newcomers(files: Mapping[str, Loaded], applied: Mapping[str, str]) -> dict[str, Problem]:
    """Routing or clients files beside the one applied (`applied`: kind -> file; docs/reference.md
    §4): refused, each on its own, while the applied one stays. Before one is applied, none is
    kept over the others (`cross_check` refuses them all)."""
    found: dict[str, Problem] = {}
    for kind in ("routing", "clients"):
        kept = applied.get(kind)
        if kept is None or kept not in files or files[kept].document.kind != kind:
            continue
        for file, loaded in sorted(files.items()):
            if file != kept and loaded.document.kind == kind:
                message = (
                    f"more than one {kind} file: {kept} is the {kind} file applied, and stays; "
                    f"this one is refused while both are there"
                )
                found[file] = Problem(file, loaded.line("kind"), message, "kind")
    return found


def _check_routing(
    loaded: Loaded, routing: Routing, providers: Mapping[str, Provider], unavailable: Collection[str]
) -> list[Problem]:
    problems = []
    for purpose, route in routing.purposes.items():
        for role, ids in (("primary", route.primary), ("fallbacks", route.fallbacks)):
            for index, provider_id in enumerate(ids):
                line = loaded.line("purposes", purpose, role, index)
                path = f"purposes.{purpose}.{role}.{index}"
                provider = providers.get(provider_id)
                where = f"routing for `{purpose}` names `{provider_id}`"
                if provider is None and provider_id in unavailable:
                    continue  # known, skipped until a good version of its file arrives
                if provider is None:
                    problems.append(Problem(loaded.file, line, f"{where}, which does not exist", path))
                elif not provider.enabled:
                    problems.append(Problem(loaded.file, line, f"{where}, which is disabled", path))
                elif purpose not in provider.purposes:
                    message = f"{where}, whose purposes ({', '.join(provider.purposes)}) lack `{purpose}`"
                    problems.append(Problem(loaded.file, line, message, path))
    return problems


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The configuration at one generation. Never mutated: a change builds a new one."""

    generation: int = 0
    files: Mapping[str, Loaded] = field(default_factory=lambda: _EMPTY)
    providers: Mapping[str, Provider] = field(default_factory=lambda: _EMPTY)
    routing: Routing | None = None
    clients: Clients | None = None
    attribution: Mapping[str, Attribution] = field(default_factory=lambda: _EMPTY)
    """Where each file came from (commit, author), set by the registry when it swaps this in."""
    commit: str | None = None
    """The commit this whole configuration is, when every file is committed unchanged in it."""
    changed: str | None = None
    """With `commit`: the last commit of its first-parent line that touched `providers.d/` (a
    removal included), where this configuration last changed; the commit part of the tag of
    an answer built from several files (docs/reference.md §6). Otherwise None."""
    order: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    """With `commit`: the commits of its first-parent line that last touched its files, newest
    first (0: the newest), so that which of two files' `changed` is the later is known without
    git: the commit part of the tag of an answer built from some of the files (a route, a list)
    is the latest of theirs (docs/reference.md §6). Empty otherwise."""
    unavailable: frozenset[str] = frozenset()
    """Provider ids whose files are refused and have no good version (docs/reference.md §4): routing may
    name them, and every reader skips them (they are not in `providers`) until one arrives."""

    @classmethod
    def build(
        cls, files: Mapping[str, Loaded], generation: int = 0, unavailable: Collection[str] = ()
    ) -> Snapshot:
        """A snapshot of these files, or SnapshotRejected with every cross-file problem.

        `unavailable`: the ids of refused provider files that count as known (`cross_check`).
        """
        problems = cross_check(files.values(), unavailable)
        if problems:
            raise SnapshotRejected(problems)
        providers: dict[str, Provider] = {}
        routing = clients = None
        for loaded in files.values():
            doc = loaded.document
            if isinstance(doc, AiServer | ApiKey):
                providers[doc.id] = doc
            elif isinstance(doc, Routing):
                routing = doc
            else:
                clients = doc
        return cls(
            generation=generation,
            files=MappingProxyType(dict(sorted(files.items()))),
            providers=MappingProxyType(dict(sorted(providers.items()))),
            routing=routing,
            clients=clients,
            unavailable=frozenset(unavailable) - providers.keys(),
        )

    def file_of(self, provider_id: str) -> str | None:
        """The file that defines a provider."""
        for path, loaded in self.files.items():
            doc = loaded.document
            if isinstance(doc, AiServer | ApiKey) and doc.id == provider_id:
                return path
        return None

    def file_of_kind(self, kind: str) -> str | None:
        """The file holding the `kind: routing` or `kind: clients` document, whatever its name."""
        return file_of_kind(self.files, kind)

    def attribution_of(self, file: str) -> Attribution:
        """The commit and author of one file of this snapshot (all null outside git)."""
        return self.attribution.get(file, NO_GIT)

    def view(self) -> ConfigView:
        """The masked configuration, as events record it and `state --at` rebuilds it."""
        providers = {}
        for path, loaded in self.files.items():
            doc = loaded.document
            if isinstance(doc, AiServer | ApiKey):
                providers[doc.id] = {**doc.model_dump(mode="json"), "file": path}
        routing = (
            {p: r.model_dump(mode="json") for p, r in sorted(self.routing.purposes.items())}
            if self.routing
            else {}
        )
        clients = (
            {
                c.name: {"scopes": list(c.scopes)}
                | ({"limits": c.limits.model_dump(mode="json", exclude_none=True)} if c.limits else {})
                # Masked like a key: a token replaced alone is a change the log must show.
                | {"token_sha256": mask(c.token_sha256)}
                for c in self.clients.clients
            }
            if self.clients
            else {}
        )
        return {"providers": dict(sorted(providers.items())), "routing": routing, "clients": clients}


def file_of_kind(files: Mapping[str, Loaded], kind: str) -> str | None:
    """The first file (by name) whose document is of `kind`; None when there is none."""
    return next((f for f, loaded in sorted(files.items()) if loaded.document.kind == kind), None)


def load_folder(
    folder: Path, shown: str, sops: Decrypter | None = None, known: Known | None = None
) -> Snapshot:
    """A snapshot of the files in `folder` (named `shown/x.yaml`), decrypted when `sops` is given.

    A key-holding file carrying the MAC of a `known` version (or of another file of the
    folder) while its data differs was changed outside sops (docs/reference.md §2.4): a
    problem, found before anything is decrypted. Raises ConfigError with every problem of
    every file, or SnapshotRejected.
    """
    parsed: dict[str, Loaded] = {}
    problems: list[Problem] = []
    for path in config_files(folder):
        name = f"{shown.rstrip('/')}/{path.name}"
        try:
            loaded = parse(name, path.read_bytes())
            outside = loaded.changed_outside_sops(known or {})
            if outside is not None:
                raise outside
            parsed[name] = loaded
        except FileRejected as exc:
            problems += exc.problems
    shared = sharing_a_mac((f, x.line("sops", "mac"), x.seal) for f, x in parsed.items())
    problems += shared.values()
    files: dict[str, Loaded] = {}
    for name, loaded in parsed.items():
        try:
            if name not in shared:
                files[name] = decrypt(loaded, sops) if sops is not None else loaded
        except FileRejected as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return Snapshot.build(files)


_T = TypeVar("_T")


class PerSnapshot(Generic[_T]):
    """A value derived from a snapshot, built on first sight of each new snapshot and reused.

    Request handlers read the registry's current snapshot; what they render from it (JSON,
    routing plans) is computed once per snapshot here instead of once per request.
    """

    def __init__(self, build: Callable[[Snapshot], _T]) -> None:
        self._build = build
        self._last: tuple[Snapshot, _T] | None = None

    def of(self, snapshot: Snapshot) -> _T:
        """The value for `snapshot`: the one built before when it is the same snapshot."""
        last = self._last
        if last is None or last[0] is not snapshot:
            last = self._last = (snapshot, self._build(snapshot))
        return last[1]
