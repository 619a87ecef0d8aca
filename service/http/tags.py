"""Weak tags (docs/reference.md §6, §9): what they are made of, and how a client's tag is judged.

A tag is `W/"<blob>.<commit>.<hash>"`: the git blob id of the answer's file (`-` for an answer
built from several), the commit at which its configuration last changed (`-` outside git or
uncommitted), and a hash of what the answer means: its configuration and each provider's
confirmed health status and reason, never a measurement (`checked_at`, `latency_ms`, counters),
a replica's circuits, its generation, its index or the commit it serves. The commit is the last
of the served commit's first-parent line that touched the provider's file, for a provider; the
latest of those of the routing file and the providers it names, for a route (`Snapshot.order`
tells which is the later); the last that touched `providers.d/` at all (a removal too, and for
an empty folder the one that emptied it, or the line's first commit when it never held a file),
for a list (the registry's attribution, computed at reload). So a commit of another file, or
outside the folder, changes no provider's or route's tag and wakes no query held on it;
replicas serving one commit with one health give one tag, whatever their event logs hold,
and a consumer behind a balancer without affinity can hold its query on any of them. Such a
commit is still one of the served history: a client's tag naming one this replica has not
applied is `AHEAD`, one it served or that precedes it is not.

A client's tag is judged against this replica's answer (`Tags.judge`):

- `MATCH`: the same tag; the client's copy is current.
- `AHEAD`: it names a commit this replica has not applied (not in its repository yet, or a
  descendant of what it serves) and never served. Answering would be a step back: the query
  holds until the replica applies it, or answers 304 when `wait` runs out.
- `UNSEEN`: it differs only in its hash (same file, same commit: health seen differently by
  another replica), and this replica never gave it. Answering at once would bounce a consumer
  between replicas that disagree, as fast as it can ask: the query holds until this replica's
  answer changes, or is answered with the current content when `wait` runs out.
- `DIFFERS`: anything else (an older commit, a commit of another history that the repository
  holds, a commit this replica served and left: a rollback, garbage): answered now, as
  docs/reference.md §9 says of a rewritten history.

What a commit is to the served one is known without git for the commits this replica served
(`applied`, told by the registry) and the served commit's last `MAX_ANCESTORS` ancestors
(asked of git once per served commit): the tags consumers hold. Any other asks git
(`merge-base`), in a thread, once per commit and served commit (cached), at most
`LOOKUPS_PER_S` a second: made-up commits cannot keep git busy (past the rate a tag is taken
as `AHEAD`, which only holds a query), nor use up the lookups a consumer's tag needs.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from enum import Enum
from typing import NamedTuple

from aiohttp import web

from service.errors import GitError
from service.vcs.gitrepo import GitRepo

log = logging.getLogger(__name__)

REMEMBERED_S = 330.0
"""How long a tag given is remembered: longer than the longest `wait` (300 s)."""
MAX_REMEMBERED = 100_000
MAX_VERDICTS = 4096
LOOKUPS_PER_S = 20
MAX_TAGS = 16
"""Tags of one `If-None-Match` looked at, at most."""
MAX_ANCESTORS = 4096
"""Ancestors of the served commit known without asking git."""
MAX_APPLIED = 1024
"""Commits this replica served, remembered (the newest)."""

_ID = r"([0-9a-f]{40}(?:[0-9a-f]{24})?|-)"
_TAG = re.compile(rf'^(?:W/)?"{_ID}\.{_ID}\.([0-9a-f]{{1,64}})"$')
_HEX_COMMIT = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


class Verdict(Enum):
    MATCH = "match"
    AHEAD = "ahead"
    UNSEEN = "unseen"
    DIFFERS = "differs"


class Parts(NamedTuple):
    blob: str
    commit: str
    hash: str


def make(blob: str | None, commit: str | None, meaning: bytes) -> str:
    """The weak tag of an answer of `blob`'s file at `commit` that means `meaning`."""
    digest = hashlib.blake2b(meaning, digest_size=12).hexdigest()
    return f'W/"{blob or "-"}.{commit or "-"}.{digest}"'


def parse(tag: str) -> Parts | None:
    """The parts of a tag this service makes; None for any other."""
    found = _TAG.match(tag.strip())
    return Parts(found[1], found[2], found[3]) if found else None


def listed(header: str | None) -> list[str]:
    """The tags of an `If-None-Match` header (weak or not, `*` included), at most `MAX_TAGS`."""
    if not header:
        return []
    return [t.strip() for t in header.split(",", MAX_TAGS)[:MAX_TAGS] if t.strip()]


def _bare(tag: str) -> str:
    return tag.strip().removeprefix("W/")


Relation = str
"""`applied` (the commit or one of its descendants is served), `left` (served here before, not
now: a rollback or a rewritten history applied here), `ahead` (not here yet, or a descendant
of what is served), `diverged` (neither: another history), `unknown` (no git)."""


class Tags:
    """The tags this replica gave, and what it knows of commits named by clients' tags."""

    def __init__(self, repo: Callable[[], GitRepo | None], served: Callable[[], str | None]) -> None:
        self._repo = repo
        """The repository the configuration is read from (it follows git-sync's worktrees)."""
        self._served = served
        """The commit this replica serves now (its last applied commit)."""
        self._given: OrderedDict[str, float] = OrderedDict()
        self._verdicts: OrderedDict[tuple[str, str], Relation] = OrderedDict()
        self._asking: dict[tuple[str, str], asyncio.Future[Relation]] = {}
        self._lookups: list[float] = []
        self._applied: dict[str, None] = {}
        self._ancestors: tuple[str, frozenset[str]] | None = None
        self._listing: tuple[str, asyncio.Future[frozenset[str]]] | None = None

    def applied(self, commit: str | None) -> None:
        """This replica applied `commit` (the registry's `on_apply`, in its thread)."""
        if commit is None or commit in self._applied:
            return
        self._applied[commit] = None
        while len(self._applied) > MAX_APPLIED:
            del self._applied[next(iter(self._applied))]

    # -- the tags given --------------------------------------------------------------------------

    def gave(self, tag: str) -> None:
        """Remember that this replica answered with `tag` (now)."""
        now = time.monotonic()
        bare = _bare(tag)
        self._given[bare] = now
        self._given.move_to_end(bare)
        while self._given and (
            len(self._given) > MAX_REMEMBERED or now - next(iter(self._given.values())) > REMEMBERED_S
        ):
            self._given.popitem(last=False)

    def given(self, tag: str) -> bool:
        return _bare(tag) in self._given

    # -- judging a client's tag ------------------------------------------------------------------

    async def judge(self, theirs: list[str], ours: str) -> Verdict:
        """What the client's tags (`If-None-Match`) are to this replica's answer tagged `ours`."""
        mine = _bare(ours)
        if any(t == "*" or _bare(t) == mine for t in theirs):
            return Verdict.MATCH
        own = parse(ours)
        verdict = Verdict.DIFFERS
        if own is None:
            return verdict
        for tag in theirs:
            parts = parse(tag)
            if parts is None:
                continue
            if parts.commit != own.commit and parts.commit != "-":
                relation = await self.relation(parts.commit)
                if relation == "ahead":
                    return Verdict.AHEAD
            elif (parts.blob, parts.commit) == (own.blob, own.commit) and not self.given(tag):
                verdict = Verdict.UNSEEN
        return verdict

    async def ahead(self, theirs: list[str]) -> bool:
        """One of the client's tags names a commit this replica has not applied: an answer with
        no tag of its own (a 404: the id is not here yet) would be older content too."""
        for tag in theirs:
            parts = parse(tag)
            if parts is not None and parts.commit != "-" and await self.relation(parts.commit) == "ahead":
                return True
        return False

    async def relation(self, commit: str) -> Relation:
        """What `commit` is to the one this replica serves (see `Relation`)."""
        served = self._served()
        if served is None or not _HEX_COMMIT.match(commit):
            return "unknown"
        if commit == served:
            return "applied"
        if commit in self._applied:
            return "left"
        if commit in await self._ancestors_of(served):
            return "applied"
        key = (commit, served)
        known = self._verdicts.get(key)
        if known is not None:
            return known
        asking = self._asking.get(key)
        if asking is not None:
            return await asyncio.shield(asking)
        now = time.monotonic()
        self._lookups = [t for t in self._lookups if now - t < 1.0]
        if len(self._lookups) >= LOOKUPS_PER_S:
            return "ahead"  # holding is safe: a real commit is asked again at the next request
        self._lookups.append(now)
        future: asyncio.Future[Relation] = asyncio.get_running_loop().create_future()
        self._asking[key] = future
        relation: Relation = "unknown"
        try:
            relation = await asyncio.to_thread(self._ask, commit, served)
        except Exception:
            relation = "unknown"
        finally:  # also when the asking request is cancelled: the others waiting on it go on
            del self._asking[key]
            future.set_result(relation)
        if relation != "unknown":
            self._verdicts[key] = relation
            while len(self._verdicts) > MAX_VERDICTS:
                self._verdicts.popitem(last=False)
        return relation

    async def _ancestors_of(self, served: str) -> frozenset[str]:
        """The last `MAX_ANCESTORS` ancestors of `served` (asked of git once per served commit)."""
        known = self._ancestors
        if known is not None and known[0] == served:
            return known[1]
        listing = self._listing
        if listing is not None and listing[0] == served and not listing[1].done():
            return await asyncio.shield(listing[1])
        future: asyncio.Future[frozenset[str]] = asyncio.get_running_loop().create_future()
        self._listing = (served, future)
        ancestors: frozenset[str] = frozenset()
        try:
            ancestors = await asyncio.to_thread(self._list, served)
            self._ancestors = (served, ancestors)
        except Exception:
            self._ancestors = (served, ancestors)  # not asked again for this commit: once is a warning
            log.warning("the ancestors of %s could not be listed", served[:12], exc_info=True)
        finally:  # also when the asking request is cancelled: the others waiting on it go on
            future.set_result(ancestors)
        return ancestors

    def _list(self, served: str) -> frozenset[str]:
        repo = self._repo()
        if repo is None:
            return frozenset()
        try:
            out = repo.run("rev-list", f"--max-count={MAX_ANCESTORS}", served)
        except GitError:
            return frozenset()
        return frozenset(out.decode().split())

    def _ask(self, commit: str, served: str) -> Relation:
        repo = self._repo()
        if repo is None:
            return "unknown"
        try:
            repo.run("cat-file", "-e", f"{commit}^{{commit}}")
        except GitError:
            return "ahead"  # not fetched yet: a pull (or git-sync) brings it
        try:
            base = repo.merge_base(commit, served)
        except GitError:
            return "unknown"
        if base == commit:
            return "applied"
        if base == served:
            return "ahead"
        return "diverged"


TAGS: web.AppKey[Tags] = web.AppKey("tags")
