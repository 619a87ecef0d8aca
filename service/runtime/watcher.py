"""The watcher: `providers.d/` on disk -> the registry, within a short debounce.

Watch events are only hints. Each batch rescans the folder (`service.runtime.scan`) and
compares files by content hash, so a missed, merged or mislabelled event cannot leave the
registry wrong; a periodic rescan covers events lost altogether. Only changed files are parsed
and decrypted, and many at once (sops takes ~70 ms a file). A file that fails keeps its last
good version, and its refusal carries the kind it declares (a refused clients file keeps
authentication on).

A folder reached through a symlink that is swapped whole (git-sync's `/git/current`, pointed
at a new worktree per commit) is followed: the watch covers the folders holding the links
as well, so a swap is seen at once, and a reload whose worktree was removed before it could
be applied is done again on the new one.

While the folder is missing, the folder holding it is watched, so its return is seen at once.

The registry's apply runs in a worker thread that cancellation cannot stop; `aclose` waits
for it, so the service closes its event log only once nothing can append to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from watchfiles import awatch

from service.config.loader import Loaded, declared_kind, decrypt_async, parse
from service.config.sops_mac import Seal, sharing_a_mac
from service.crypto.sops import Sops
from service.errors import EventLogError, FileRejected
from service.runtime.registry import Outcome, Registry
from service.runtime.scan import SCAN_ATTEMPTS, Read, Scan, Scanner, holding, link_folders, listable
from service.runtime.state import Refusal

log = logging.getLogger(__name__)

_MAX_SEALS = 10_000
"""How many MACs of versions loaded are remembered (about 1.5 KB each for a small provider file,
so some 15 MB at the cap), the oldest forgotten first but never one of a file loaded now."""


@dataclass(frozen=True, slots=True)
class _Place:
    """What the watch is set on: the folder, or while it is missing the nearest folder holding
    it (a git-sync swap changes it), and whether git says the absence is the configuration."""

    folder: tuple[int, int] | None
    """The folder's device and inode; None while it is missing."""
    holder: tuple[int, int] | None = None
    path: Path | None = None
    """Where the holder is: the folder's parent, or one above it that git left (scan.holding)."""
    absent: bool = False
    unlisted: bool = False
    """Before the first load, the folder is there but cannot be listed: rescanned every second."""


class Reloader:
    """Brings the registry up to date with the folder, one batch at a time."""

    def __init__(
        self,
        folder: Path,
        root: Path,
        registry: Registry,
        sops: Sops,
        *,
        debounce_ms: int = 50,
        rescan_s: float = 10.0,
        on_reload: Callable[[Outcome, float], None] | None = None,
    ) -> None:
        self.folder = folder
        self.root = root
        self.registry = registry
        self.sops = sops
        self.debounce_ms = debounce_ms
        self.rescan_s = rescan_s
        self.on_reload = on_reload
        self._cache: dict[str, tuple[str, Loaded | Refusal]] = {}
        """file -> (content hash, loaded document or why it was refused)."""
        self._seals: dict[str, tuple[str, Seal]] = {}
        """The MAC of each key-holding version loaded since the start -> (its file, its seal):
        a file carrying one of them with other data was changed outside sops."""
        self._scanner = Scanner(folder, root)
        self._lock = asyncio.Lock()
        self._applying: asyncio.Future[Outcome] | None = None
        self._closed = False
        self._unwatched: tuple[Path, str] | None = None
        """The path a watch could not be set on and why, as last logged: logged once."""

    async def reload(self) -> Outcome:
        """Rescan the folder, load what changed, and apply the result. Never raises on bad files.

        Once `aclose` was called it changes nothing and answers with the current state.
        """
        async with self._lock:
            return await self._reload()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[Callable[[], Awaitable[Outcome]]]:
        """Hold the watcher's reloads off while git writes files (so none sees half a change);
        yields the reload to run, once, before letting go."""
        async with self._lock:
            yield self._reload

    async def _reload(self) -> Outcome:
        """`_reload_once`, again while what it read was swapped away before it could be applied
        (the registry applies no worktree git-sync has removed: its commit cannot be told)."""
        for _ in range(SCAN_ATTEMPTS):
            outcome, scan = await self._reload_once()
            if outcome.applied or scan is None or not scan.gone():
                break
        return outcome

    async def _reload_once(self) -> tuple[Outcome, Scan | None]:
        if self._closed:
            state = self.registry.state
            return Outcome(state.snapshot, False, 0, state.refused), None
        started = time.perf_counter()
        scan = await asyncio.to_thread(self._scanner.scan, self._known())
        if scan.unlisted is not None and not self.registry.ready:
            # Nothing was read: an empty configuration served as if it were the one would
            # take every provider and client away. Not ready until the folder can be listed.
            self.registry.wait(scan.unlisted)
            state = self.registry.state
            outcome = Outcome(state.snapshot, False, 0, state.refused)
            if self.on_reload is not None:
                self.on_reload(outcome, time.perf_counter() - started)
            return outcome, scan
        present = scan.files
        todo = {f: r for f, r in present.items() if self._cache.get(f, ("",))[0] != r.sha256}
        results = await asyncio.gather(*(self._load(f, r) for f, r in todo.items()))
        loaded = self._remember(list(zip(todo, results, strict=True)))
        for file in set(self._cache) - set(present):
            del self._cache[file]
        self._cache.update(zip(todo, loaded, strict=True))
        self._forget()
        candidate: dict[str, Loaded] = {}
        rejected: dict[str, Refusal] = {}
        current = self.registry.snapshot.files
        for file, (_, result) in self._cache.items():
            if isinstance(result, Loaded):
                candidate[file] = result
                continue
            rejected[file] = result
            if file in current:  # refused: the last good version stays
                candidate[file] = current[file]
        # The apply goes on in its thread even if this task is cancelled (shutdown):
        # shielded, and remembered so that `aclose` can wait for it.
        applying = asyncio.ensure_future(
            asyncio.to_thread(
                self.registry.apply, candidate, rejected, source=scan.source, holder=scan.holder
            )
        )
        self._applying = applying
        outcome = await asyncio.shield(applying)
        if self.on_reload is not None:
            self.on_reload(outcome, time.perf_counter() - started)
        return outcome, scan

    async def watch(self, stop: asyncio.Event) -> None:
        """Load, then reload on every batch of changes until `stop` is set.

        Each load runs once the watch is set, so nothing written before it goes unseen. A
        folder deleted and made again is watched afresh: the old watch would only ever see
        its changes through the periodic rescan. While there is no folder, the nearest folder
        that holds it is watched (git removes every folder a commit empties), so one made again
        (a commit bringing it back) is seen at once; and while git does not say the folder's
        absence is the configuration (it was deleted by hand: its files stay refused, their last
        good versions served), it is rescanned every second too, for the commit that may say so.
        So is a folder that is there but cannot be listed before the first load: what it holds is
        what readiness waits for.
        """
        while not stop.is_set():
            place = self._place()
            watched = False
            if place.folder is not None:
                rescan_s = min(self.rescan_s, 1.0) if place.unlisted else self.rescan_s
                watched = await self._watch(stop, place, self.folder, rescan_s)
            elif place.holder is not None and place.path is not None:
                rescan_s = self.rescan_s if place.absent else min(self.rescan_s, 1.0)
                watched = await self._watch(stop, place, place.path, rescan_s)
            if not watched:  # nothing to watch, or it cannot be watched: looked at every second
                await self._reload_logged()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=min(self.rescan_s, 1.0))

    def _place(self) -> _Place:
        """What the watch is set on now."""
        folder = _identity(self.folder)
        if folder is not None:
            # Only before the first load: once ready, the last good files are served meanwhile.
            return _Place(folder, unlisted=not self.registry.ready and not listable(self.folder))
        path = holding(self.folder, self.root)
        holder = _identity(path) if path is not None else None
        return _Place(None, holder, path, self._scanner.absent)

    async def _watch(self, stop: asyncio.Event, place: _Place, path: Path, rescan_s: float) -> bool:
        """Reload on every batch of changes in `path` (and at least every `rescan_s`) until
        `stop` is set, or until after a batch the watch is to be set on another `_Place`.

        False when the watch cannot be set (a folder the service's user may not read, the OS's
        limit of inotify watches or instances reached): logged once, not at every try, and the
        caller rescans every second instead. Raised, it ended the watcher: nothing reloaded again.
        """
        changes = awatch(
            path,
            *link_folders(self.folder),  # a swapped link is an event there, not in the folder
            watch_filter=None,  # every event is a hint; the rescan decides what changed
            debounce=self.debounce_ms,
            step=min(self.debounce_ms, 10),
            stop_event=stop,
            rust_timeout=max(int(rescan_s * 1000), 1),
            yield_on_timeout=True,
            recursive=False,
        )
        # Starts when this task first waits inside awatch, that is once the watch is set.
        catch_up = asyncio.create_task(self._reload_logged())
        try:
            async with contextlib.aclosing(changes):
                async for _ in changes:
                    if self._unwatched is not None:
                        self._unwatched = None
                        log.info("%s is watched again", path)
                    await self._reload_logged()
                    if self._place() != place:
                        break
        except FileNotFoundError:  # gone between the check and the watch
            pass
        except OSError as exc:
            if self._unwatched != (path, str(exc)):
                self._unwatched = (path, str(exc))
                log.warning("cannot watch %s: %s; it is rescanned every second", path, exc)
            return False
        finally:
            if not catch_up.done():  # stopping, or the path went before the watch was set
                catch_up.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await catch_up
        return True

    async def aclose(self) -> None:
        """Stop reloading, and wait for an apply still running in its thread (after a cancel).

        Afterwards nothing of the reloader appends to the event log, which may then close.
        """
        self._closed = True
        applying = self._applying
        if applying is not None:
            with contextlib.suppress(Exception):
                await applying

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except EventLogError as exc:  # stopping: the log closed under a direct apply
            log.warning("reload not applied: %s", exc)
        except Exception:  # the watcher must outlive any bug in one batch
            log.exception("reload failed; the previous configuration stays")

    def _known(self) -> dict[str, str | None]:
        """The files loaded before, each with the kind it had when it was last read: what the
        scan refuses one that cannot be read now as."""
        return {
            file: result.document.kind if isinstance(result, Loaded) else result.kind
            for file, (_, result) in self._cache.items()
        }

    async def _load(self, file: str, read: Read) -> tuple[str, Loaded | Refusal]:
        if read.data is None:
            return read.sha256, Refusal(read.error or "cannot read", read.kind)
        parsed = await asyncio.to_thread(_parse, file, read.data)  # keep the loop free for requests
        if isinstance(parsed, Refusal):
            return read.sha256, parsed
        try:
            loaded = await decrypt_async(parsed, self.sops)
        except FileRejected as exc:  # sops' own case (its exit 128, 51, 25) says it best
            return read.sha256, Refusal(exc.reason, parsed.document.kind)
        except Exception as exc:
            log.exception("loading %s failed", file)
            reason = f"internal error while loading ({type(exc).__name__})"
            return read.sha256, Refusal(reason, parsed.document.kind)
        outside = parsed.changed_outside_sops(self._seals)
        if outside is not None:  # sops' MAC passed, but it is a known version's with other data
            return read.sha256, Refusal(outside.reason, parsed.document.kind)
        return read.sha256, loaded

    def _remember(
        self, batch: list[tuple[str, tuple[str, Loaded | Refusal]]]
    ) -> list[tuple[str, Loaded | Refusal]]:
        """`batch` with the files that share a MAC with other data refused, and the seals of the
        others, their MACs checked by sops, remembered as versions known good."""
        fresh = [(f, r.line("sops", "mac"), r.seal) for f, (_, r) in batch if isinstance(r, Loaded)]
        shared = sharing_a_mac(fresh)
        out: list[tuple[str, Loaded | Refusal]] = []
        for file, (sha, result) in batch:
            if file in shared and isinstance(result, Loaded):
                result = Refusal(FileRejected([shared[file]]).reason, result.document.kind)
            elif isinstance(result, Loaded) and result.seal is not None:
                self._seals.setdefault(result.seal.mac, (file, result.seal))
            out.append((sha, result))
        return out

    def _forget(self) -> None:
        """Drop the oldest seals over `_MAX_SEALS`, never one of a version loaded now: an
        unchanged file's seal is the oldest, and the one a change outside sops would copy."""
        excess = len(self._seals) - _MAX_SEALS
        if excess <= 0:
            return
        loaded = [r for _, r in self._cache.values() if isinstance(r, Loaded)]
        current = {x.seal.mac for x in [*loaded, *self.registry.snapshot.files.values()] if x.seal}
        for mac in [m for m in self._seals if m not in current][:excess]:
            del self._seals[mac]


def _parse(file: str, data: bytes) -> Loaded | Refusal:
    """`parse`, or the refusal with the kind the file declares (told from its text if need be)."""
    try:
        return parse(file, data)
    except FileRejected as exc:
        return Refusal(exc.reason, declared_kind(data))
    except Exception as exc:
        log.exception("parsing %s failed", file)
        return Refusal(f"internal error while loading ({type(exc).__name__})", declared_kind(data))


def _identity(folder: Path) -> tuple[int, int] | None:
    """Which folder is at `folder` now (device, inode); None when there is none."""
    try:
        stat = folder.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino
