"""The Redis side of the limits: one `EVALSHA` of the script per operation, within a timeout.

Unlike the fan-out (which only speeds convergence up, on a thread of its own), a limit check
needs Redis' answer before the request can go: the call is on the request path, on the
service's loop, one round trip. So each call is bounded: `timeout_s` for the whole call
(connecting included), and anything but a well-formed answer of the script — a refused
connection, a timeout, an error, a reply that is not the script's JSON, or one larger than
any the script gives — raises `Unavailable`, and the limiter falls back (`local` or
`refuse`) at once. A reply's announced length is checked before it is read, so a server that
announces gigabytes cannot make this process hold them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis.asyncio as redis
from redis._parsers import _AsyncRESP2Parser
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from service.redis_replies import bounded
from service.usage.limits.script import SCRIPT

PREFIX = "switchboard:limits:"
TIMEOUT_S = 0.5
"""The longest one call may take: losing Redis adds at most this to a request (docs/reference.md §13: 1 s)."""
MAX_REPLY = 8 << 20
"""The largest string any reply may hold (a `read` of thousands of clients is far less)."""
MAX_ITEMS = 16
"""The most items any array of a reply may hold (the script answers one string)."""
MAX_BATCH = 256
"""Calls sent in one round trip, at most."""


class Unavailable(Exception):
    """Redis cannot be used now: down, slow, or answering what the script never answers."""


class Remote:
    """The script on one Redis: `call(op, now_ms, epoch, args)` -> the script's answer.

    One batch is on its way at a time: a call goes at once when none is, else with the calls
    that came meanwhile, in the next batch (`MAX_BATCH` at most), as soon as the one on its way
    is answered. Alone, a call waits for nothing; under load, many requests share each round
    trip, which costs a few microseconds a call instead of a whole exchange with Redis each."""

    def __init__(self, url: str, *, timeout_s: float = TIMEOUT_S, prefix: str = PREFIX) -> None:
        self.timeout_s = timeout_s
        self.prefix = prefix
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            parser_class=bounded(_AsyncRESP2Parser, MAX_REPLY, MAX_ITEMS),
            protocol=2,
        )
        self._sha: str | None = None
        self._queue: list[tuple[list[Any], asyncio.Future[Any]]] = []
        self._sending: asyncio.Future[None] | None = None

    async def call(self, op: str, now_ms: int, epoch: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run `op`; raises `Unavailable` on anything but the script's answer, within `timeout_s`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        future.add_done_callback(_retrieved)
        self._queue.append(([op, epoch, str(now_ms), args], future))
        if self._sending is None:
            self._flush()
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await asyncio.shield(future)
        except TimeoutError:
            raise Unavailable("no answer in time") from None
        if not isinstance(answer, dict) or "error" in answer:
            raise Unavailable("Redis answered something the script does not answer")
        return answer

    def _flush(self, _: object = None) -> None:
        """Send what waits, when nothing is on its way (called again when a batch is answered)."""
        self._sending = None
        batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        if batch:
            self._sending = asyncio.ensure_future(self._send(batch))
            self._sending.add_done_callback(self._flush)

    async def _send(self, batch: list[tuple[list[Any], asyncio.Future[Any]]]) -> None:
        futures = [future for _, future in batch]
        try:
            encoded = json.dumps([item for item, _ in batch], separators=(",", ":"))
            async with asyncio.timeout(self.timeout_s):
                reply = await self._run("batch", "0", "-", encoded)
            if not isinstance(reply, bytes) or len(reply) > MAX_REPLY:
                raise ValueError("not the script's answer")
            answers = json.loads(reply)
            if not isinstance(answers, list) or len(answers) != len(batch):
                raise ValueError("not the script's answer")
        except Exception as exc:  # down, slow, garbage, or a parser's surprise: every call fails alike
            failure = Unavailable(_describe(exc))
            for future in futures:
                if not future.done():
                    future.set_exception(failure)
            return
        for future, answer in zip(futures, answers, strict=True):
            if not future.done():
                future.set_result(answer)

    async def _run(self, *argv: str) -> Any:
        if self._sha is None:
            self._sha = await self._client.script_load(SCRIPT)
        try:
            return await self._client.evalsha(self._sha, 0, *argv, self.prefix)
        except NoScriptError:  # Redis restarted, or its scripts were flushed
            self._sha = await self._client.script_load(SCRIPT)
            return await self._client.evalsha(self._sha, 0, *argv, self.prefix)

    async def aclose(self) -> None:
        if self._sending is not None:
            self._sending.remove_done_callback(self._flush)
            self._sending.cancel()
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._client.aclose()
        except Exception:  # noqa: S110 - closing what is down: nothing more to do
            pass


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a batch's failure as seen: a caller that gave up waiting never reads it."""
    if not future.cancelled():
        future.exception()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = str(exc).split("\n", 1)[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
