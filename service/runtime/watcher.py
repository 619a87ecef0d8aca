"""The watcher: `providers.d/` on disk -> the registry, within a short debounce.

Watch events are only hints. Each batch rescans the folder and compares files by content
hash, so a missed, merged or mislabelled event cannot leave the registry wrong; a periodic
rescan covers events lost altogether. Only changed files are parsed and decrypted, and many
at once (sops takes ~70 ms a file). A file that fails keeps its last good version.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from watchfiles import awatch

from service.config.loader import Loaded, decrypt_async, is_config_file, parse
from service.crypto.sops import Sops
from service.errors import FileRejected
from service.runtime.registry import Outcome, Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Read:
    data: bytes | None
    sha256: str
    error: str | None = None


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
        self._cache: dict[str, tuple[str, Loaded | str]] = {}
        """file -> (content hash, loaded document or the reason it was refused)."""
        self._lock = asyncio.Lock()

    async def reload(self) -> Outcome:
        """Rescan the folder, load what changed, and apply the result. Never raises on bad files."""
        async with self._lock:
            return await self._reload()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[Callable[[], Awaitable[Outcome]]]:
        """Hold the watcher's reloads off while git writes files (so none sees half a change);
        yields the reload to run, once, before letting go."""
        async with self._lock:
            yield self._reload

    async def _reload(self) -> Outcome:
        started = time.perf_counter()
        present = await asyncio.to_thread(self._scan)
        todo = {f: r for f, r in present.items() if self._cache.get(f, ("",))[0] != r.sha256}
        loaded = await asyncio.gather(*(self._load(f, r) for f, r in todo.items()))
        for file in set(self._cache) - set(present):
            del self._cache[file]
        self._cache.update(zip(todo, loaded, strict=True))
        candidate: dict[str, Loaded] = {}
        rejected: dict[str, str] = {}
        current = self.registry.snapshot.files
        for file, (_, result) in self._cache.items():
            if isinstance(result, Loaded):
                candidate[file] = result
                continue
            rejected[file] = result
            if file in current:  # refused: the last good version stays
                candidate[file] = current[file]
        outcome = await asyncio.to_thread(self.registry.apply, candidate, rejected)
        if self.on_reload is not None:
            self.on_reload(outcome, time.perf_counter() - started)
        return outcome

    async def watch(self, stop: asyncio.Event) -> None:
        """Load, then reload on every batch of changes until `stop` is set.

        Each load runs once the watch is set, so nothing written before it goes unseen. A
        folder deleted and made again is watched afresh: the old watch would only ever see
        its changes through the periodic rescan. While there is no folder, it is rescanned
        every second (its files stay refused, their last good versions served).
        """
        timeout_ms = max(int(self.rescan_s * 1000), 1)
        while not stop.is_set():
            watched = _identity(self.folder)
            if watched is None:
                await self._reload_logged()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=min(self.rescan_s, 1.0))
                continue
            changes = awatch(
                self.folder,
                watch_filter=None,  # every event is a hint; the rescan decides what changed
                debounce=self.debounce_ms,
                step=min(self.debounce_ms, 10),
                stop_event=stop,
                rust_timeout=timeout_ms,
                yield_on_timeout=True,
                recursive=False,
            )
            # Starts when this task first waits inside awatch, that is once the watch is set.
            catch_up = asyncio.create_task(self._reload_logged())
            try:
                async with contextlib.aclosing(changes):
                    async for _ in changes:
                        await self._reload_logged()
                        if _identity(self.folder) != watched:
                            break
            except FileNotFoundError:  # gone between the check and the watch
                pass
            finally:
                if not catch_up.done():  # stopping, or the folder went before the watch was set
                    catch_up.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await catch_up

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except Exception:  # the watcher must outlive any bug in one batch
            log.exception("reload failed; the previous configuration stays")

    def _scan(self) -> dict[str, _Read]:
        found: dict[str, _Read] = {}
        try:
            entries = sorted(os.scandir(self.folder), key=lambda e: e.name)
        except OSError as exc:
            log.error("cannot list %s: %s", self.folder, exc.strerror)
            # A hash no content has: the files are refused (their last good versions stay)
            # and reloaded once the folder can be read again.
            return {f: _Read(None, "unreadable-folder", "unreadable folder") for f in self._cache}
        for entry in entries:
            if not is_config_file(entry.name):
                continue
            file = self._name(Path(entry.path))
            try:
                if not entry.is_file():  # follows symlinks; a folder or a dangling link is skipped
                    continue
                data = Path(entry.path).read_bytes()
            except FileNotFoundError:
                continue  # deleted while we looked: the next batch sees it gone
            except OSError as exc:
                found[file] = _Read(None, f"error:{exc.errno}", f"cannot read: {exc.strerror}")
                continue
            found[file] = _Read(data, hashlib.sha256(data).hexdigest())
        return found

    async def _load(self, file: str, read: _Read) -> tuple[str, Loaded | str]:
        if read.data is None:
            return read.sha256, read.error or "cannot read"
        try:
            parsed = await asyncio.to_thread(parse, file, read.data)  # keep the loop free for requests
            return read.sha256, await decrypt_async(parsed, self.sops)
        except FileRejected as exc:
            return read.sha256, exc.reason
        except Exception as exc:
            log.exception("loading %s failed", file)
            return read.sha256, f"internal error while loading ({type(exc).__name__})"

    def _name(self, path: Path) -> str:
        """The file as events name it: relative to the repository root when inside it."""
        try:
            return path.absolute().relative_to(self.root.absolute()).as_posix()
        except ValueError:
            return path.absolute().as_posix()


def _identity(folder: Path) -> tuple[int, int] | None:
    """Which folder is at `folder` now (device, inode); None when there is none."""
    try:
        stat = folder.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino
