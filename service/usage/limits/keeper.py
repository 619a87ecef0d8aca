"""What keeps the limiter's counters true over time, off the request path: `Keeper`.

- **At start** (`load`, before `/readyz` is 200) each budget's spent in its current period is
  read (`spent.py`: the ledger, else the local snapshot plus the spool) into `Limiter.seed`;
  with Redis it is then given to Redis, which keeps the larger of its own and this.
- **On a change of the files**, a budget new in them (or given another period) has what it spent
  in its period before then read the same way at once (the records before the change: those
  after are counted here), so that what was already spent stays spent; a request counted
  toward it waits for that (`Limiter.unknown`), else it could pass the budget. With Redis, that
  is added to Redis's counter once, by the first replica to ask (`seed`: every replica applies
  the same change, and asks); Redis then marks the budget's period seeded. With a ledger of
  each replica's own (SQLite, not `shared`), each adds what its own recorded (since the budget
  last went from this replica's files, if it did in the period: before, Redis counted it).
  Any other budget a replica begins counting (at its start, in a new period) or one whose
  period is marked already (a budget that came back) only raises the counter to what the
  ledger holds of the period, if that is more. "Before the change" is before this replica
  applied it: a request another replica counted in Redis a moment earlier is counted twice,
  over, never under. A
  request still in flight then (admitted under the former budget: no record of it yet, its
  cost settled under the former key) counts too, by its reservation: each replica adds what
  its own hold (`_held_elsewhere`), over by what they will not cost, never under. With the
  ledger off nothing says what was spent before: such a budget counts from the change.
- **Every second** (`tick`): with Redis up, the lease of this replica's epoch is renewed and
  every budget's and limited client's use read back (`known`, `replicas`): what this replica
  falls back on if Redis goes; with Redis away, it is asked again, and once it answers,
  `reconcile` gives it what was counted meanwhile: the spend of the outage, the requests still
  in flight and their reservations, the window entries. An epoch that lost its lease meanwhile
  had its reservations charged in full by whoever touched them: those are not counted again.
- **Every few seconds** the snapshot of spent is written beside the spool (and at a stop).

A reconcile holds the limiter's lock for one round trip: local changes wait for it, so what
is sent is exactly what was counted. Should its answer be lost after Redis applied it, the
next one counts the outage's spend a second time: over, never under.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from service.config.metering import Budget, Limits
from service.usage.limits.amounts import usd
from service.usage.limits.in_redis import _expiry
from service.usage.limits.remote import Unavailable
from service.usage.limits.seeding import Seeder, _listed
from service.usage.limits.spent import Snapshot
from service.usage.limits.tickets import Hold, Use, budget_key
from service.usage.periods import Window, window

log = logging.getLogger(__name__)


class Keeper(Seeder):
    """Loads, syncs, reconciles and snapshots a `Limiter`'s counters."""

    # -- start ---------------------------------------------------------------------------------

    async def load(self) -> None:
        """Read each budget's spent before this process counted, then try Redis once: ready."""
        self._loaded_ms = self.limiter.now_ms()
        if self.file is not None:
            self._snapshot = await asyncio.to_thread(self.file.read)
        limiter = self.limiter
        async with self._seeding:
            await self.seed_missing()
            if limiter.remote is not None and await self.reconcile():
                await self._seed_remote()
                await self.refresh()
        self.ready.set()

    # -- every second --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """`tick` every `interval_s` until `stop`; then the last snapshot."""
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:  # never let the keeper die: the limits would freeze
                log.exception("limits: the sync failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
        await self.write_snapshot(force=True)

    async def tick(self) -> None:
        limiter = self.limiter
        async with self._seeding:
            await self.seed_missing()
            if limiter.remote is not None and (limiter.up or await self.reconcile()):
                await self._seed_remote()
                await self.refresh()
        limiter.forget({key for key, _ in self._keys()})
        limiter.counters.forget_idle(limiter.now_ms())
        limiter.providers.forget_idle(limiter.now_ms())
        self.show_spent()
        await self.write_snapshot()

    def show_spent(self) -> None:
        """Give `gauge` each budget's spent in its current period, as this replica knows it: each
        second, and on each scrape of `/metrics` (so a scrape right after an answer shows what it
        spent, at no cost on the request's path)."""
        if self.gauge is None:
            return
        limiter = self.limiter
        now = limiter.now_ms()
        for kind, subject, budget in self.budgets:
            key = budget_key(kind, subject, limiter.window(budget.period, now))
            self.gauge(kind, subject, usd(limiter.spent_here(key)[0]))

    async def refresh(self) -> None:
        """Renew the lease and read back every budget's and limited client's use from Redis."""
        limiter = self.limiter
        keys = self._keys()
        try:
            answer = await limiter.call("read", limiter.now_ms(), {"renew": 1, "keys": [k for k, _ in keys]})
            states = _listed(answer.get("keys"))
            for (key, _), state in zip(keys, states, strict=False):
                limiter._known(key, state)
            replicas = answer.get("replicas")
            if isinstance(replicas, int) and not isinstance(replicas, bool) and replicas > 0:
                limiter.replicas = min(replicas, 10_000)
        except Unavailable as exc:
            limiter.lose(str(exc))

    async def reconcile(self) -> bool:
        """Give Redis what was counted while it was away; True once the limiter is back on it."""
        limiter = self.limiter
        async with limiter.lock:
            # What Redis is told is in flight: one settled meanwhile (waiting for the lock) is
            # still of them, handed to Redis with the rest, and settles there once this is done.
            tickets = list(limiter.tickets.values())
            keys, holds = self._reconcile_keys()
            clients = self._reconcile_clients()
            args = {"old": limiter.old, "keys": [entry for entry, _ in keys], "clients": clients}
            if limiter.old is None:
                del args["old"]
            try:
                answer = await limiter.call("reconcile", limiter.now_ms(), args)
            except Unavailable as exc:
                log.debug("limits: Redis is still unavailable (%s)", exc)
                return False
            kept = _listed(answer.get("keys"))
            if len(kept) != len(keys):
                limiter.lose("Redis answered something the script does not answer")
                return False
            for (_entry, key), flag in zip(keys, kept, strict=False):
                for hold in holds.get(key, ()):
                    if hold.epoch is None or flag is True:
                        hold.epoch = limiter.epoch
                    else:
                        hold.off = True  # its epoch's lease ran out: charged in full there
            for ticket in tickets:
                for hold in ticket.holds.values():  # a key without a flag (none sent): local ones
                    if hold.epoch is None:
                        hold.epoch = limiter.epoch
                if ticket.counted:
                    ticket.slot_epoch = limiter.epoch
            limiter.counters.spent.clear()
            limiter.counters.reserved.clear()
            limiter.pending_old.clear()
            limiter.unsynced_requests.clear()
            limiter.unsynced_tokens.clear()
            limiter.shares.clear()
            limiter.old = None
            limiter.up = True
            log.info("limits: Redis is back; the counts of the outage are in it")
            return True

    def _reconcile_keys(self) -> tuple[list[tuple[dict[str, Any], str]], dict[str, list[Hold]]]:
        limiter = self.limiter
        holds: dict[str, list[Hold]] = {}
        for ticket in limiter.tickets.values():
            for hold in ticket.holds.values():
                if not hold.off and (hold.epoch is None or hold.epoch == limiter.old):
                    holds.setdefault(hold.key, []).append(hold)
        windows = {key: w for key, w in self._keys()}
        for key, listed in holds.items():
            windows.setdefault(key, listed[0].window)
        counters = limiter.counters
        for key in (*counters.spent, *counters.reserved, *limiter.pending_old):
            windows.setdefault(key, _window_of(key))
        entries = []
        for key, current in windows.items():
            known = limiter.known.get(key, (0, 0))[0]
            unseeded = self.unseeded.get(key)
            if unseeded is None:
                known = max(limiter.seed.get(key, 0), known)
            elif unseeded[0] is None:  # what is held `seed` adds once this is done
                known = max(unseeded[1], known)
            # else `seed` adds it all once this is done
            old = sum(h.amount for h in holds.get(key, ()) if h.epoch is not None)
            new = sum(h.amount for h in holds.get(key, ()) if h.epoch is None)
            entry = {
                "k": key,
                "known": str(known),
                "settled_old": str(limiter.pending_old.get(key, 0)),
                "res_old": str(old),
                "settled_new": str(counters.spent.get(key, 0)),
                "res_new": str(new),
                "exp": _expiry(Hold(key, "", 0, 0, current)),
            }
            entries.append((entry, key))
        return entries, holds

    def _reconcile_clients(self) -> list[dict[str, Any]]:
        limiter = self.limiter
        flying: dict[str, int] = {}
        for ticket in limiter.tickets.values():
            if ticket.counted:
                flying[ticket.client] = flying.get(ticket.client, 0) + 1
        names = {*flying, *limiter.unsynced_requests, *limiter.unsynced_tokens}
        return [
            {
                "n": name,
                "par": flying.get(name, 0),
                "reqs": [[int(at), rid] for at, rid in limiter.unsynced_requests.get(name, ())],
                "toks": [[int(at), rid, tokens] for at, rid, tokens in limiter.unsynced_tokens.get(name, ())],
            }
            for name in sorted(names)
        ]

    # -- what is used --------------------------------------------------------------------------

    async def uses(
        self, clients: Sequence[tuple[str, Limits | None]], providers: Sequence[tuple[str, Budget | None]]
    ) -> tuple[dict[str, Use], dict[str, Use]]:
        """Each client's and provider's use now: from Redis for what it counts, else from here."""
        limiter = self.limiter
        budgets = [("client", name, limits.budget) for name, limits in clients if limits and limits.budget]
        await self._told(budgets + [("provider", pid, budget) for pid, budget in providers if budget])
        now = limiter.now_ms()
        client_uses = {}
        for name, limits in clients:
            hold = None
            if limits is not None and limits.budget is not None:
                hold = limiter.hold_units("client", name, limits.budget, 0, now)
            client_uses[name] = limiter.local_use(name, hold)
        provider_uses = {}
        for pid, budget in providers:
            counts = limiter.providers.counts(pid, now)
            use = Use(counts.requests, counts.tokens, counts.in_flight)
            if budget is not None:
                current = limiter.window(budget.period, now)
                use.spent, use.reserved = limiter.spent_here(budget_key("provider", pid, current))
                use.window = current
            provider_uses[pid] = use
        if limiter.up:
            await self._read_remote(clients, providers, client_uses, provider_uses)
        return client_uses, provider_uses

    async def _told(self, budgets: Sequence[tuple[str, str, Budget]]) -> None:
        """Wait until this keeper was told of `budgets` (a change of the files reaches it a moment
        after the configuration is served) and what each new one spent before the change is
        read: a budget is never shown with nothing spent that had spent (docs/reference.md §13.2),
        as a request counted toward it waits for it too."""
        if self._loaded_ms is None:
            return
        deadline = asyncio.get_running_loop().time() + 1
        while any((kind, subject, b.period) not in self.counted_since for kind, subject, b in budgets):
            if asyncio.get_running_loop().time() > deadline:  # a configuration it is not told of
                break
            await asyncio.sleep(0.005)
        limiter = self.limiter
        now = limiter.now_ms()
        for kind, subject, budget in budgets:
            event = limiter.unknown.get(budget_key(kind, subject, limiter.window(budget.period, now)))
            if event is not None:
                await event.wait()

    async def _read_remote(
        self,
        clients: Sequence[tuple[str, Limits | None]],
        providers: Sequence[tuple[str, Budget | None]],
        client_uses: dict[str, Use],
        provider_uses: dict[str, Use],
    ) -> None:
        limiter = self.limiter
        limited = [name for name, limits in clients if limits is not None]
        budgeted: list[tuple[Use, str]] = []
        for name in limited:
            use = client_uses[name]
            if use.window is not None:
                budgeted.append((use, budget_key("client", name, use.window)))
        for pid, _ in providers:
            use = provider_uses[pid]
            if use.window is not None:
                budgeted.append((use, budget_key("provider", pid, use.window)))
        try:
            answer = await limiter.call(
                "read", limiter.now_ms(), {"clients": limited, "keys": [k for _, k in budgeted]}
            )
            for name, state in zip(limited, _listed(answer.get("clients")), strict=False):
                if isinstance(state, dict):
                    use = client_uses[name]
                    use.requests = _count(state.get("requests"))
                    use.tokens = _count(state.get("tokens"))
                    use.in_flight = _count(state.get("par"))
            for (use, key), state in zip(budgeted, _listed(answer.get("keys")), strict=False):
                use.spent, use.reserved = limiter._known(key, state)
        except Unavailable as exc:
            limiter.lose(str(exc))

    # -- the snapshot --------------------------------------------------------------------------

    async def write_snapshot(self, *, force: bool = False) -> None:
        """Write the snapshot of spent when it changed (at most every `snapshot_s`, unless `force`)."""
        if self.file is None:
            return
        loop = asyncio.get_running_loop()
        if not force and loop.time() - self._last_write < self.snapshot_s:
            return
        limiter = self.limiter
        budgets = {key: limiter.spent_here(key) for key, _ in self._keys()}
        if budgets == self._written and not force:
            return
        self._last_write = loop.time()
        snapshot = Snapshot(datetime.now(UTC), limiter.replicas, budgets)
        try:
            await asyncio.to_thread(self.file.write, snapshot)
        except OSError as exc:
            log.warning("limits: the snapshot of spent cannot be written (%s)", exc)
            return
        self._written = budgets


def _count(value: Any) -> int:
    if isinstance(value, str) and value.isdigit() and len(value) <= 20:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise Unavailable("Redis answered something the script does not answer")


def _window_of(key: str) -> Window:
    """A window for a budget key held only in the counters (for its expiry in Redis): the
    period its key names, read back from the key (`client:NAME:day:2026-12-04`)."""
    _kind, _, rest = key.partition(":")
    _, _, period = rest.partition(":")
    name, _, start = period.partition(":")
    try:
        when = datetime.strptime(start + ("-01" if name == "month" else ""), "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        return window("total", datetime.now(UTC))
    return window(name, when) if name in ("day", "week", "month") else window("total", when)  # type: ignore[arg-type]
