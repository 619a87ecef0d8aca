"""Redis fan-out (docs/reference.md §12): replicas tell each other of new commits, and who serves what.

Each replica publishes a heartbeat on one channel every 2 s, and at once when it applies a
new commit: `{"replica", "instance", "commit", "generation", "ready"}`. On the same channel
it publishes each health status it confirmed itself (`HealthNote`: provider, the blob of its
file, status, reason, when), which the others adopt when it is newer than theirs, so replicas
show one status per provider (docs/reference.md §12); when a replica is heard ready that was not
(a new one, one restarted, one back after an outage), or serving this replica's commit after
another (one that joined behind and caught up), `on_joined` is told, and the service publishes
again what it shows, so the newcomer shows it too. A note is checked field by field and,
when the replicas hold an age identity, signed with a key derived from it: anyone else who can
publish on Redis cannot forge one. Every replica listens;
one that hears of a commit it does not have asks its pull to run now, so a change that
reached one replica (a webhook, a write pushed to the remote) reaches the others within a
second or two. What it heard in the last 10 s is the answer of `GET …/replicas`.

Redis only speeds convergence up: the replicas converge by polling without it. So nothing
of it may ever hold a request up, or fail one. The whole client runs on an event loop in a
thread of its own: a Redis that is down, slow, hanging or answering garbage (or a host name
that takes minutes to resolve) only ever stalls that thread. Every call has a timeout;
every failure ends the session, which starts again after a backoff (0.1 s doubling to 5 s);
a session that stops hearing its own heartbeats is taken as dead. Nothing leaves the thread
but what it heard, through `peers` and `on_new` (called in the thread: hand
over with `call_soon_threadsafe`). What is heard is checked and bounded before it is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import redis.asyncio as redis
from redis._parsers import _AsyncRESP3Parser
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.redis_replies import bounded
from service.runtime.messages import Beat, HealthNote, parse_beat, parse_health
from service.runtime.peer import Peer
from service.vcs.git_output import redact

log = logging.getLogger(__name__)

CHANNEL = "switchboard:replicas"
"""The channel of database 0; database N's is `switchboard:replicas:N` (see `channel_of`)."""
HEARTBEAT_S = 2.0
LIVE_S = 10.0
"""A replica not heard from for this long is left out of `peers`."""
TIMEOUT_S = 1.0
"""The longest any one Redis call may take."""
BACKOFF_S = (0.1, 5.0)
MAX_REPLY = 64 << 10
"""The largest string any reply may hold: a heartbeat is at most `messages.MAX_MESSAGE`."""
MAX_ITEMS = 64
"""The most items any array, map or set of a reply may hold."""
MAX_PEERS = 1000
MESSAGES_PER_S = 1000
"""Messages read from Redis per second, at most (1,000 replicas beating every 2 s send 500).
Past it the thread stops reading for the rest of the second: a flood of messages (anyone who
may publish on the channel) would otherwise keep it busy, and every request waits its turn for
the interpreter lock (requests' p99 went from 0.5 ms to 30-50 ms). Redis holds what is not
read yet, or drops a subscriber that lags too far, which ends the session like any failure."""
REPULL_S = 10.0
"""A commit heard again that a pull did not bring is asked for at most this often."""
CHECKS_PER_S = 20
"""Commits looked up in git per second, at most: made-up commits cannot keep git busy (a real
one is heard again in the next heartbeat)."""
HEALTH_OUTBOX = 4096
"""Health notes waiting for a session, at most (the oldest go first; `on_joined` tells each provider's)."""


def channel_of(url: str) -> str:
    """The channel of the deployment whose Redis is `url`.

    Redis' pub/sub ignores the database number: two deployments sharing a Redis, each on a
    database of its own, would hear each other (list each other's replicas, pull for each
    other's commits) on one channel. So the database is in the channel's name.
    """
    try:
        db = int(parse_url(url).get("db") or 0)
    except (ValueError, TypeError):
        db = 0  # a URL redis-py refuses: the session fails on it anyway
    return CHANNEL if db == 0 else f"{CHANNEL}:{db}"


class Fanout:
    """The Redis client of one replica, on its own thread: `start`, then `stop`."""

    def __init__(
        self,
        url: str,
        local: Callable[[], Beat],
        *,
        knows: Callable[[str], bool],
        on_new: Callable[[str], None],
        channel: str | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        timeout_s: float = TIMEOUT_S,
        on_state: Callable[[bool], None] | None = None,
        on_health: Callable[[HealthNote], None] | None = None,
        health_key: bytes | None = None,
    ) -> None:
        self._url = url
        self.on_health = on_health
        """Called, in the thread, with each health note another replica published (checked)."""
        self.on_joined: Callable[[], None] | None = None
        """Called, in the thread, when a replica is heard ready that was not a moment ago, or
        serving this replica's commit that served another (it joined on an older one)."""
        self.health_key = health_key
        """Signs the notes this replica publishes; with it, notes not signed with it are ignored."""
        self._outbox: list[str] = []
        self._told: asyncio.Event | None = None
        self.local = local
        """This replica's heartbeat now (read from the registry's state: any thread may call it)."""
        self.knows = knows
        """Whether this replica has a commit (blocking: it may ask git); called in the thread."""
        self.on_new = on_new
        """Called, in the thread, with a commit heard that this replica does not have."""
        self.channel = channel or channel_of(url)
        self.heartbeat_s = heartbeat_s
        self.timeout_s = timeout_s
        self.on_state = on_state
        self.instance = secrets.token_hex(8)
        self.connected = False
        """A session is up and hears its own heartbeats."""
        self._peers: dict[str, Peer] = {}
        self.peers: Mapping[str, Peer] = MappingProxyType(self._peers)
        """Other replicas heard from, by name (read from any thread: a new replica swaps it whole,
        one heard again has its entry replaced in place)."""
        self._known: dict[str, None] = {}
        self._asked: dict[str, float] = {}
        self._checks: list[float] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._last_error: str | None = None
        self._heard_self = 0.0
        self._pruned = 0.0

    # -- from the service's side ---------------------------------------------------------------------

    def start(self) -> None:
        """Run the client on a thread of its own (returns at once)."""
        self._thread = threading.Thread(target=self._main, name="switchboard-fanout", daemon=True)
        self._thread.start()
        self._started.wait(5)

    def announce(self) -> None:
        """Publish a heartbeat now (a new commit was applied); from any thread, never blocks."""
        self._call(lambda: self._wake.set() if self._wake is not None else None)

    def tell_health(self, note: HealthNote) -> None:
        """Publish a health status this replica confirmed; from any thread, never blocks. Without a
        session it waits (the newest `HEALTH_OUTBOX`) for the next one."""
        message = note.signed(self.local().replica, self.instance, self.health_key, time.time())

        def queue() -> None:
            self._outbox.append(message)
            del self._outbox[:-HEALTH_OUTBOX]
            if self._told is not None:
                self._told.set()

        self._call(queue)

    def stop(self, timeout_s: float = 3.0) -> None:
        """Stop the client and wait (at most `timeout_s`) for its thread. Blocking."""
        self._call(lambda: self._stop.set() if self._stop is not None else None)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def live(self, now: float | None = None) -> list[Peer]:
        """The peers heard from in the last 10 s, by name."""
        now = time.monotonic() if now is None else now
        return sorted(
            (p for p in self.peers.values() if now - p.heard <= LIVE_S), key=lambda p: p.beat.replica
        )

    def _call(self, action: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(action)

    # -- the thread ----------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception:  # pragma: no cover - nothing is expected to get here
            log.exception("the Redis fan-out stopped")
        finally:
            self._started.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop, self._wake, self._told = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._started.set()
        backoff = BACKOFF_S[0]
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                await self._session()
            except Exception as exc:  # down, refused, garbage, timeouts: all end the session alike
                self._report(exc)
            self._set_connected(False)
            if time.monotonic() - began > 4 * self.heartbeat_s:
                backoff = BACKOFF_S[0]  # it was up a good while: try again soon
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            backoff = min(backoff * 2, BACKOFF_S[1])

    async def _session(self) -> None:
        client = redis.Redis.from_url(
            self._url,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            max_connections=4,
            parser_class=bounded(_AsyncRESP3Parser, MAX_REPLY, MAX_ITEMS),
        )
        pubsub = client.pubsub()
        self._heard_self = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                await pubsub.subscribe(self.channel)
            tasks = {
                asyncio.ensure_future(self._listen(pubsub)),
                asyncio.ensure_future(self._beat(client)),
                asyncio.ensure_future(self._tell(client)),
            }
            assert self._stop is not None  # noqa: S101 - set in _run
            stopping = asyncio.ensure_future(self._stop.wait())
            try:
                done, _ = await asyncio.wait({*tasks, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (*tasks, stopping):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            for task in done & tasks:
                task.result()  # the failure that ended the session, if any
        finally:
            for close in (pubsub.aclose, client.aclose):
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.timeout_s):
                        await close()

    async def _beat(self, client: redis.Redis) -> None:
        """Publish a heartbeat every `heartbeat_s`, and at once when woken."""
        assert self._wake is not None  # noqa: S101
        while True:
            self._wake.clear()
            beat = self.local()
            message = {
                "replica": beat.replica,
                "instance": self.instance,
                "commit": beat.commit,
                "generation": beat.generation,
                "ready": beat.ready,
            }
            async with asyncio.timeout(self.timeout_s):
                await client.publish(self.channel, json.dumps(message))
            if time.monotonic() - self._heard_self > 3 * self.heartbeat_s + self.timeout_s:
                raise ConnectionError("this replica's own heartbeats do not come back")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.heartbeat_s)

    async def _tell(self, client: redis.Redis) -> None:
        """Publish the health notes queued by `tell_health`, as they come."""
        assert self._told is not None  # noqa: S101
        while True:
            while self._outbox:
                async with asyncio.timeout(self.timeout_s):
                    await client.publish(self.channel, self._outbox[0])
                self._outbox.pop(0)
            self._told.clear()
            await self._told.wait()

    async def _listen(self, pubsub: Any) -> None:
        window, read = 0.0, 0
        while True:
            async with asyncio.timeout(self.heartbeat_s + self.timeout_s):
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.heartbeat_s)
            if message is None:
                continue
            if read == 0:
                window = time.monotonic()  # a second of reading starts with its first message
            read += 1
            if isinstance(message, dict) and message.get("type") == "message":
                await self._hear(message.get("data"))
            if read >= MESSAGES_PER_S:
                rest = 1.0 - (time.monotonic() - window)
                if rest > 0:
                    await asyncio.sleep(rest)
                read = 0
            elif time.monotonic() - window >= 1.0:
                read = 0

    async def _hear(self, data: Any) -> None:
        parsed = parse_beat(data)
        if parsed is None:
            self._hear_health(data)
            return
        beat, instance = parsed
        now = time.monotonic()
        local = self.local()
        if beat.replica == local.replica:
            if instance == self.instance:
                self._heard_self = now
                self._set_connected(True)
            return
        peer = Peer(beat, datetime.now(UTC), now, instance)
        known = self._peers.get(beat.replica)
        joined = beat.ready and (
            known is None
            or known.instance != instance
            or now - known.heard > LIVE_S
            or not known.beat.ready
            # caught up with this replica's commit: the files that changed are `unknown` there now
            or (beat.commit != known.beat.commit and beat.commit == local.commit)
        )
        if now - self._pruned >= 1.0:  # the silent ones go once a second, not a copy per message
            self._pruned = now
            self._publish({n: p for n, p in self._peers.items() if now - p.heard <= LIVE_S})
        if beat.replica in self._peers:
            # In place: other threads iterate `peers`, which a replaced value cannot disturb
            # (a new key would, so a new replica makes a new mapping).
            self._peers[beat.replica] = peer
        elif len(self._peers) < MAX_PEERS:
            self._publish({**self._peers, beat.replica: peer})
        if joined and self.on_joined is not None:
            self.on_joined()
        if beat.commit is not None and beat.commit != local.commit:
            await self._consider(beat.commit, now)

    def _hear_health(self, data: Any) -> None:
        note = parse_health(data, self.health_key, time.time())
        if note is None:
            log.debug("fan-out: a message that is neither a heartbeat nor a valid health note was ignored")
            return
        if note[1] != self.instance and self.on_health is not None:
            self.on_health(note[0])

    async def _consider(self, commit: str, now: float) -> None:
        """Ask for a pull when `commit` is one this replica does not have (at most every 10 s)."""
        if commit in self._known or now - self._asked.get(commit, -REPULL_S) < REPULL_S:
            return
        self._checks = [t for t in self._checks if now - t < 1.0]
        if len(self._checks) >= CHECKS_PER_S:
            return
        self._checks.append(now)
        if await asyncio.to_thread(self.knows, commit):
            self._known[commit] = None
            while len(self._known) > 256:
                del self._known[next(iter(self._known))]
            return
        self._asked = {c: t for c, t in self._asked.items() if now - t < REPULL_S}
        if len(self._asked) < 256:
            self._asked[commit] = now
        log.info("fan-out: a replica serves %s, which this one does not have: pulling now", commit[:12])
        self.on_new(commit)

    def _publish(self, peers: dict[str, Peer]) -> None:
        self._peers = peers
        self.peers = MappingProxyType(peers)

    def _set_connected(self, connected: bool) -> None:
        if connected == self.connected:
            return
        self.connected = connected
        if connected:
            log.info("fan-out: connected to Redis")
            self._last_error = None
        if self.on_state is not None:
            self.on_state(connected)

    def _report(self, exc: BaseException) -> None:
        """Log a failure once per kind, not once per retry."""
        text = redact(f"{type(exc).__name__}: {exc}")[:300]
        if text != self._last_error:
            self._last_error = text
            log.warning("fan-out: Redis unavailable (%s); replicas converge by polling meanwhile", text)
