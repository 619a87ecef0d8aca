"""This replica's own counts: each client's requests and tokens in the last 60 s, its requests in
flight, and what each budget has spent and holds reserved here.

They are kept in every mode, exactly and in memory (a check is a few deque operations):
without Redis they are the limits; with Redis they are what this replica falls back on when
Redis goes away (docs/reference.md §13: each replica then enforces `rpm`, `tpm` and `max_parallel` from its
own counts). Times are milliseconds of the wall clock the limiter is given.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

WINDOW_MS = 60_000
PARALLEL_RETRY_MS = 1_000
"""A client at `max_parallel` is told to come back in a second: no window says when a slot frees."""


class Counts(NamedTuple):
    """A client's use now: requests and tokens in the last 60 s, requests in flight (a tuple:
    one is made at each admission and settlement)."""

    requests: int = 0
    tokens: int = 0
    in_flight: int = 0


@dataclass(frozen=True, slots=True)
class Refusal:
    """The limit that refuses a request, and in how many milliseconds it would not."""

    limit: str
    """`max_parallel`, `rpm`, `tpm` or `budget`."""
    retry_ms: int


class _Client:
    __slots__ = ("in_flight", "requests", "token_sum", "tokens")

    def __init__(self) -> None:
        self.requests: deque[float] = deque()
        self.tokens: deque[tuple[float, int]] = deque()
        self.token_sum = 0
        self.in_flight = 0

    def trim(self, now: float) -> None:
        cut = now - WINDOW_MS
        requests = self.requests
        while requests and requests[0] <= cut:
            requests.popleft()
        tokens = self.tokens
        while tokens and tokens[0][0] <= cut:
            self.token_sum -= tokens.popleft()[1]


class Counters:
    """Own counts of clients and budgets, by name and by budget key."""

    def __init__(self) -> None:
        self._clients: dict[str, _Client] = {}
        self.spent: dict[str, int] = {}
        """Budget key -> nano-dollars charged here (since the start, or since Redis went away)."""
        self.reserved: dict[str, int] = {}
        """Budget key -> nano-dollars held by requests in flight here."""

    # -- clients -------------------------------------------------------------------------------

    def counts(self, name: str, now: float) -> Counts:
        client = self._clients.get(name)
        if client is None:
            return Counts()
        client.trim(now)
        return Counts(len(client.requests), client.token_sum, client.in_flight)

    def refusal(
        self, name: str, now: float, rpm: int | None, tpm: int | None, max_parallel: int | None
    ) -> Refusal | None:
        """The first of `max_parallel`, `rpm`, `tpm` that refuses one more request now, or None."""
        client = self._clients.get(name)
        if client is None:
            return None
        client.trim(now)
        if max_parallel is not None and client.in_flight >= max_parallel:
            return Refusal("max_parallel", PARALLEL_RETRY_MS)
        requests = client.requests
        if rpm is not None and len(requests) >= rpm:
            # The window frees when enough of the oldest have left it for one more to fit.
            return Refusal("rpm", _wait(requests[len(requests) - rpm] + WINDOW_MS - now))
        if tpm is not None and client.token_sum >= tpm:
            left = client.token_sum
            for at, tokens in client.tokens:
                left -= tokens
                if left < tpm:
                    return Refusal("tpm", _wait(at + WINDOW_MS - now))
        return None

    def admit(self, name: str, now: float) -> _Client:
        """Count a request of `name`, now in flight; its counts (trimmed as `refusal` left them)."""
        client = self._clients.get(name)
        if client is None:
            client = self._clients[name] = _Client()
        client.requests.append(now)
        client.in_flight += 1
        return client

    def finish(self, name: str, now: float, tokens: int) -> None:
        """A request of `name` ended, having used `tokens`."""
        client = self._clients.get(name)
        if client is None:
            return
        if client.in_flight > 0:
            client.in_flight -= 1
        if tokens > 0:
            client.tokens.append((now, tokens))
            client.token_sum += tokens

    def uncount(self, name: str, at: float) -> None:
        """Take the request of `name` admitted `at` out of its window: it went nowhere (no
        provider could take it), so it counts toward no limit (docs/reference.md §13)."""
        client = self._clients.get(name)
        if client is None:
            return
        requests = client.requests
        for i in range(len(requests) - 1, -1, -1):  # from the newest: it came a moment ago
            if requests[i] == at:
                del requests[i]
                return

    def in_flight(self) -> dict[str, int]:
        """Clients with requests in flight here, and how many."""
        return {name: c.in_flight for name, c in self._clients.items() if c.in_flight}

    def forget_idle(self, now: float) -> None:
        """Drop clients with nothing in their windows and nothing in flight (a removed client)."""
        for name in [n for n, c in self._clients.items() if not c.in_flight]:
            client = self._clients[name]
            client.trim(now)
            if not client.requests and not client.tokens:
                del self._clients[name]

    # -- budgets -------------------------------------------------------------------------------

    def hold(self, key: str, cap: int, amount: int) -> bool:
        """Reserve `amount` when it fits under `cap` with what is spent and reserved here;
        whether it did."""
        reserved = self.reserved
        held = reserved.get(key, 0)
        if self.spent.get(key, 0) + held + amount > cap:
            return False
        reserved[key] = held + amount
        return True

    def release(self, key: str, amount: int) -> None:
        left = self.reserved.get(key, 0) - amount
        if left > 0:
            self.reserved[key] = left
        else:
            self.reserved.pop(key, None)

    def settle(self, key: str, held: int, actual: int) -> None:
        """`release` what was `held`, and count the `actual` cost spent."""
        self.release(key, held)
        if actual > 0:
            spent = self.spent
            spent[key] = spent.get(key, 0) + actual


def _wait(ms: float) -> int:
    return max(1, int(ms + 0.999))
