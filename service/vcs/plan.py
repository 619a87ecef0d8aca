"""The plan of a pull request (`switchboard plan [BASE [HEAD]]`): what it changes in the configuration.

Both sides are read from git without a checkout (HEAD may be the working tree) and built
with `parse` alone, so no key is needed: a changed secret shows as changed ciphertext. When
a key is at hand, both sides of a changed secret are decrypted to tell a re-encryption from
a new key. A key-holding file of HEAD carrying the MAC of a BASE file, or of a version in
BASE's history, while its data differs was changed outside sops: a problem, as the service
refuses it (docs/reference.md §2.4). The output is Markdown for a pull request comment (or
JSON), and the exit code is 1 when the service would refuse HEAD: the problems `validate`
would report there, and these.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from service.config.loader import Loaded, config_files, is_config_file, parse, refused_provider
from service.config.models import AiServer, ApiKey, Clients, Routing
from service.config.secret import Sealed, mask
from service.config.snapshot import Snapshot, cross_check, file_of_kind
from service.config.sops_mac import Known, sharing_a_mac
from service.config.sops_rules import check_sops_config, every_recipient
from service.config.validation import LINK_OUT, holds_secrets
from service.config.view import ConfigView, diff_views
from service.crypto.rotation import file_recipients
from service.crypto.sops import Sops
from service.errors import FileRejected, Problem, SopsError
from service.files import leads_outside
from service.settings import Settings
from service.vcs.gitrepo import GitRepo
from service.vcs.limit_changes import limit_changes
from service.vcs.seals import history_seals

CIPHERTEXT_CHANGED = "ciphertext changed (re-encrypted or a new key)"
RE_ENCRYPTED = "re-encrypted; the key is unchanged"


@dataclass(frozen=True, slots=True)
class Side:
    """One side of the comparison: the files of `providers.d/` and `.sops.yaml` at a revision."""

    rev: str | None
    """The revision as named (`main`, `HEAD~1`), or None for the working tree / no commit."""
    commit: str | None
    files: Mapping[str, bytes]
    sops_config: bytes | None
    refused: Mapping[str, str] = field(default_factory=dict)
    """Files not read, and why: in the working tree, links out of the repository (docs/reference.md §4)."""

    @property
    def label(self) -> str:
        if self.commit is None:
            return "the working tree" if self.rev is None else self.rev
        return f"`{self.rev}` ({self.commit[:10]})"


@dataclass(frozen=True, slots=True)
class Configuration:
    """A side built as the service would build it: files, problems and the masked view."""

    loaded: Mapping[str, Loaded]
    problems: list[Problem]
    view: ConfigView


@dataclass(slots=True)
class Plan:
    """The difference between two sides, with what a reviewer should know about it."""

    base: Side
    head: Side
    changes: list[dict[str, Any]] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    limits: list[str] = field(default_factory=list)
    """Each limit or budget the change raises, lowers, sets or removes, in words (docs/reference.md §13)."""

    @property
    def refused(self) -> bool:
        """Whether the service would refuse HEAD."""
        return bool(self.problems)


# -- reading both sides ------------------------------------------------------------------------


def read_sides(
    repo: GitRepo, settings: Settings, base_rev: str | None, head_rev: str | None
) -> tuple[Side, Side]:
    """BASE (default: the merge base with the default branch) and HEAD (default: the work tree)."""
    if base_rev is None:
        head_commit = repo.head()
        branch = repo.default_branch()
        base_commit = repo.merge_base("HEAD", branch) if head_commit and branch else head_commit
        base = _side_at(repo, settings, base_commit, branch or "HEAD") if base_commit else _empty()
    else:
        base = _side_at(repo, settings, repo.resolve(base_rev), base_rev)
    head = (
        _worktree(settings)
        if head_rev is None
        else _side_at(repo, settings, repo.resolve(head_rev), head_rev)
    )
    return base, head


def _side_at(repo: GitRepo, settings: Settings, commit: str, name: str) -> Side:
    folder = repo.relative(settings.providers_dir)
    shown = _shown_folder(settings)
    files = {
        f"{shown}/{Path(path).name}": data
        for path, data in repo.read_tree(commit, folder).items()
        if is_config_file(Path(path).name)
    }
    sops_config = repo.read_file(commit, repo.relative(settings.sops_config))
    return Side(name, commit, files, sops_config)


def _worktree(settings: Settings) -> Side:
    folder = settings.providers_dir
    shown = _shown_folder(settings)
    links = (
        [p for p in folder.iterdir() if p.is_symlink() and is_config_file(p.name)] if folder.is_dir() else []
    )
    out = {p.name for p in links if leads_outside(p, settings.files_root)}  # never read: a PR's link
    files = {
        f"{shown}/{path.name}": path.read_bytes() for path in config_files(folder) if path.name not in out
    }
    config = settings.sops_config.read_bytes() if settings.sops_config.exists() else None
    return Side(None, None, files, config, {f"{shown}/{name}": LINK_OUT for name in sorted(out)})


def _empty() -> Side:
    return Side("an empty repository", None, {}, None)


def _shown_folder(settings: Settings) -> str:
    """The providers folder as files are named in messages and views (`providers.d`)."""
    return settings.providers.as_posix().rstrip("/") or "."


# -- building a side ---------------------------------------------------------------------------


def build(
    side: Side, last_good: Mapping[str, Loaded] | None = None, earlier: Callable[[], Known] | None = None
) -> Configuration:
    """Every problem `validate` would report for `side`, and its view.

    A file that fails keeps its `last_good` version in the view, as the service keeps a
    refused file's last good version; it is still a problem. A key-holding file carrying the
    MAC of a `last_good` file, or of the version that first carried it in git's history
    (`earlier`: BASE's and HEAD's, read only when a key-holding file changed), or of another
    file of `side`, with other data was changed outside sops.
    """
    loaded: dict[str, Loaded] = {}
    problems: list[Problem] = []
    known = _seals(last_good or {})
    history: Known | None = None
    for file, data in sorted(side.files.items()):
        try:
            loaded[file] = parse(file, data)
            outside = loaded[file].changed_outside_sops(known)
            base = (last_good or {}).get(file)
            seal = loaded[file].seal
            if earlier is not None and (outside is not None or _changed_seal(loaded[file], base)):
                history = earlier() if history is None else history
                if seal is not None and seal.mac in history:  # sops wrote its first version
                    first = loaded[file].changed_outside_sops(history)
                    outside = first if outside is None or first is None else outside
            if outside is not None:
                del loaded[file]
                raise outside
        except FileRejected as exc:
            problems += exc.problems
            if last_good and file in last_good:
                loaded[file] = last_good[file]
    fresh = [(f, x.line("sops", "mac"), x.seal) for f, x in loaded.items() if x.data == side.files.get(f)]
    for file, problem in sharing_a_mac(fresh).items():
        problems.append(problem)
        del loaded[file]
        if last_good and file in last_good:
            loaded[file] = last_good[file]
    problems += [Problem(file, 1, reason) for file, reason in side.refused.items()]
    refused = {refused_provider(f, data) for f, data in side.files.items() if f not in loaded}
    problems += cross_check(loaded.values(), {r for r in refused if r is not None})
    problems += _coverage(side, [f for f, item in loaded.items() if holds_secrets(item)])
    return Configuration(MappingProxyType(loaded), sorted(set(problems), key=_order), _view(loaded))


def _changed_seal(now: Loaded, base: Loaded | None) -> bool:
    """A key-holding file whose MAC is not its BASE version's: a new one, or taken from elsewhere."""
    return now.seal is not None and (base is None or base.seal is None or base.seal.mac != now.seal.mac)


def earlier_seals(repo: GitRepo, settings: Settings, base: Side, head: Side | None = None) -> Known:
    """`history_seals` of BASE and of HEAD (the pull request's own commits; the work tree's HEAD)."""
    head_commit = None if head is None else head.commit or repo.head()
    return history_seals(repo, settings, [c for c in (base.commit, head_commit) if c])


def _seals(loaded: Mapping[str, Loaded]) -> Known:
    """The MACs of the base's key-holding files: a head file carrying one with other data was
    changed outside sops, under its name or another (docs/reference.md §2.4)."""
    return {x.seal.mac: (f, x.seal) for f, x in sorted(loaded.items()) if x.seal is not None}


def _order(problem: Problem) -> tuple[str, int, str]:
    return problem.file, problem.line, problem.message


def _coverage(side: Side, secret_files: list[str]) -> list[Problem]:
    """`.sops.yaml` of this side must cover every file that holds secrets (as `validate` checks)."""
    if not secret_files:
        return []
    with tempfile.TemporaryDirectory(prefix="switchboard-plan-") as tmp:
        config = Path(tmp) / ".sops.yaml"
        if side.sops_config is not None:
            config.write_bytes(side.sops_config)
        return [Problem(".sops.yaml", 1, m) for m in check_sops_config(config, secret_files)]


def _view(loaded: Mapping[str, Loaded]) -> ConfigView:
    routing = next((x.document for x in loaded.values() if isinstance(x.document, Routing)), None)
    clients = next((x.document for x in loaded.values() if isinstance(x.document, Clients)), None)
    snapshot = Snapshot(
        files=MappingProxyType(dict(sorted(loaded.items()))), routing=routing, clients=clients
    )
    return snapshot.view()


# -- comparing ---------------------------------------------------------------------------------


def make_plan(
    base: Side, head: Side, *, sops: Sops | None = None, earlier: Callable[[], Known] | None = None
) -> Plan:
    """The plan from `base` to `head`; `sops` (optional) tells re-encryptions from new keys;
    `earlier` (optional) gives the MACs of BASE's history (`earlier_seals`)."""
    before = build(base)
    after = build(head, last_good=before.loaded, earlier=earlier)
    result = Plan(base, head, problems=after.problems)
    old_files, new_files = _by_id(before.loaded), _by_id(after.loaded)
    secrets = {
        pid: note
        for pid in sorted(old_files.keys() & new_files.keys())
        if (note := _secret_note(old_files[pid], new_files[pid], sops))
    }
    named = {
        kind: file_of_kind(after.loaded, kind) or file_of_kind(before.loaded, kind)
        for kind in ("routing", "clients")
    }
    for change in diff_views(
        before.view, after.view, routing_file=named["routing"], clients_file=named["clients"]
    ):
        payload = asdict(change)
        note = secrets.get(change.subject) if change.type == "provider.updated" else None
        if note:
            payload["changes"]["api_key"] = {**payload["changes"].get("api_key", {}), "note": note}
        result.changes.append(payload)
    updated = {c["subject"] for c in result.changes if c["type"] == "provider.updated"}
    for pid in sorted(secrets.keys() - updated):
        shown = after.view["providers"][pid].get("api_key")
        fields = {"api_key": {"old": shown, "new": shown, "note": secrets[pid]}}
        result.changes.append(
            {"type": "provider.updated", "subject": pid, "file": new_files[pid].file, "changes": fields}
        )
    result.secrets = secrets
    result.warnings = _warnings(before, after) + _recipients_changed(base, head)
    result.limits = limit_changes(before.view, after.view)
    return result


def _by_id(loaded: Mapping[str, Loaded]) -> dict[str, Loaded]:
    found: dict[str, Loaded] = {}
    for item in loaded.values():
        if isinstance(item.document, AiServer | ApiKey):
            found.setdefault(item.document.id, item)
    return found


def _secret_note(old: Loaded, new: Loaded, sops: Sops | None) -> str | None:
    """How the secret of one provider changed, in words that reveal nothing of it."""
    notes = []
    a, b = getattr(old.document, "api_key", None), getattr(new.document, "api_key", None)
    if isinstance(a, Sealed) and isinstance(b, Sealed) and a.ciphertext != b.ciphertext:
        notes.append(_decrypted_note(old, new, sops) or CIPHERTEXT_CHANGED)
    gone, added = (
        file_recipients(old.data) - file_recipients(new.data),
        file_recipients(new.data) - file_recipients(old.data),
    )
    if added or gone:
        parts = [f"+{r[:16]}…" for r in sorted(added)] + [f"-{r[:16]}…" for r in sorted(gone)]
        notes.append(f"sops recipients {' '.join(parts)}")
    return "; ".join(notes) or None


def _decrypted_note(old: Loaded, new: Loaded, sops: Sops | None) -> str | None:
    if sops is None:
        return None
    try:
        a = sops.decrypt(old.data, old.file).get("api_key")
        b = sops.decrypt(new.data, new.file).get("api_key")
    except SopsError:
        return None  # no key here, or one side is broken (reported as a problem already)
    if a == b:
        return RE_ENCRYPTED
    return f"a new key: {mask(str(a))} → {mask(str(b))}"


def _recipients_changed(base: Side, head: Side) -> list[str]:
    """Who can read the keys is the reviewer's to approve (docs/reference.md §2.4)."""
    old, new = every_recipient(base.sops_config), every_recipient(head.sops_config)
    if old is None or new is None or old == new:
        return []
    parts = [
        f"{verb} {', '.join(sorted(r))}" for verb, r in (("adds", new - old), ("removes", old - new)) if r
    ]
    return [
        f"`.sops.yaml` changes its recipients: {'; '.join(parts)}. An identity added can decrypt "
        "every key encrypted from now on, and every file `switchboard rotate` re-encrypts"
    ]


def _warnings(before: Configuration, after: Configuration) -> list[str]:
    warnings: list[str] = []
    old_routes, new_routes = before.view["routing"], after.view["routing"]
    old_providers, new_providers = before.view["providers"], after.view["providers"]
    for purpose, route in sorted(new_routes.items()):
        if not route.get("fallbacks") and old_routes.get(purpose) != route:
            warnings.append(f"`{purpose}` has no fallback: when its primaries fail, its requests fail")
    for pid, provider in sorted(new_providers.items()):
        was = old_providers.get(pid)
        if was and was.get("enabled") and not provider.get("enabled"):
            active = _purposes_naming(old_routes, pid)
            if active:
                warnings.append(f"`{pid}` was active for {_join(active)} and is now disabled")
    for pid in sorted(old_providers.keys() - new_providers.keys()):
        named = _purposes_naming(new_routes, pid)
        if named:
            warnings.append(
                f"`{pid}` is removed but routing for {_join(named)} still names it: "
                "the service would refuse this change"
            )
    for problem in after.problems:
        if "plaintext" in problem.message:
            warnings.append(
                f"{problem.file}: a plaintext secret; once pushed it is in git history, "
                "so revoke it at the vendor and commit a new key, encrypted"
            )
    return warnings


def _purposes_naming(routes: Mapping[str, Any], pid: str) -> list[str]:
    return [p for p, r in sorted(routes.items()) if pid in r.get("primary", []) + r.get("fallbacks", [])]


def _join(purposes: Iterable[str]) -> str:
    return ", ".join(f"`{p}`" for p in purposes)
