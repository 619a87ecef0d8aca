"""The lean upstream client's pool against real servers on port 0: kept-alive connections,
waits and deadlines, addresses, TLS, and what is sent."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator

import pytest
import trustme
from aiohttp import web

from service import __version__
from service.config.upstreams import SETTING, AllowedUpstreams
from service.gateway.transports.errors import Disconnected
from service.gateway.transports.guard import GuardedResolver
from service.gateway.transports.wire import ConnectTimeout, Endpoint, Pool, Unreachable, Unsendable
from tests.support.upstreams import closed_port_url, serving, unanswered_url
from tests.support.wire import answer_of, pool, post, raw, read_request


async def test_a_kept_alive_connection_is_reused() -> None:
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                await read_request(reader)
                writer.write(answer_of(200, b'{"ok":1}'))

    async with raw(serve) as url, pool() as p:
        answers = [await post(p, url) for _ in range(3)]
    assert answers == [(200, b'{"ok":1}')] * 3 and connections == 1


async def test_a_request_the_upstream_may_have_read_is_never_sent_again() -> None:
    requests = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        await read_request(reader)
        requests += 1
        writer.write(answer_of(200, b"one"))  # kept alive as far as the client knows...
        await writer.drain()
        await read_request(reader)  # ...then the next request is read, maybe acted on, and unanswered
        requests += 1
        writer.close()

    async with raw(serve) as url, pool() as p:
        assert await post(p, url) == (200, b"one")
        with pytest.raises(Disconnected):
            await post(p, url)
    assert requests == 2


async def test_a_connection_the_upstream_closed_while_idle_is_not_used() -> None:
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(answer_of(200, b"one"))  # kept alive, then closed by an idle timeout
        await writer.drain()

    async with raw(serve) as url, pool() as p:
        assert await post(p, url) == (200, b"one")
        for _ in range(1000):  # until the pool saw the close
            if not any(p._idle.values()):
                break
            await asyncio.sleep(0.001)
        assert await post(p, url) == (200, b"one")
    assert connections == 2


async def test_a_redirect_is_an_answer() -> None:
    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer_of(307, b"", b"Location: http://elsewhere.invalid/"))

    async with raw(redirect) as url, pool() as p:
        response = await p.post(Endpoint.of(url), {}, b"{}", connect_s=5)
    assert response.status == 307 and await response.read(100) == b""


async def test_a_header_with_a_line_break_is_never_sent() -> None:
    async with pool() as p:
        with pytest.raises(Unsendable):
            await p.post(
                Endpoint.of("http://127.0.0.1:9/v1"), {"X-A": "a\r\nX-Injected: 1"}, b"", connect_s=5
            )
    line = Endpoint.of("http://127.0.0.1:9/v1/x\r\nX-Injected: 1").line  # yarl quotes a raw one
    assert line.count(b"\r\n") == 2 and b"\r\nX-Injected" not in line


async def test_a_deadline_bounds_the_head_the_body_and_the_wait_for_a_connection() -> None:
    """One deadline on the loop's clock per exchange: `post` is bounded by it while it waits for
    a free connection, connects and waits for the head, `read` and `readany` while the body
    comes; each stage stalled is a plain `TimeoutError` (a `ConnectTimeout` only when
    connecting's own limit ends first), its connection closed, never pooled. A deadline that
    passes after its answer came whole breaks nothing: the connection, reused, answers on."""
    connections = 0
    late = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                body = (await read_request(reader)).split(b"\r\n\r\n", 1)[1]
                if body == b"half":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
                elif body == b"stream":
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                elif body != b"no head":
                    if body == b"late":
                        await late.wait()
                    writer.write(answer_of(200, body))
                    continue
                await reader.read(1)  # stalled until the client gives up and closes

    loop = asyncio.get_running_loop()

    def soon() -> float:
        return loop.time() + 0.05

    async with raw(serve) as url, pool(per_host=1) as p:
        endpoint = Endpoint.of(url)
        assert await post(p, url, b"ok") == (200, b"ok")  # a kept-alive connection to stall
        with pytest.raises(TimeoutError) as head:
            await p.post(endpoint, {}, b"no head", connect_s=5, deadline=soon())
        response = await p.post(endpoint, {}, b"half", connect_s=5, deadline=loop.time() + 5)
        with pytest.raises(TimeoutError) as body:
            await response.read(100, soon())
        response.close()
        response = await p.post(endpoint, {}, b"stream", connect_s=5, deadline=loop.time() + 5)
        with pytest.raises(TimeoutError) as first:
            await response.readany(deadline=soon())
        with pytest.raises(TimeoutError) as waiting:  # the only connection is the stream's
            await p.post(endpoint, {}, b"queued", connect_s=5, deadline=soon())
        response.close()
        assert [type(e.value) for e in (head, body, first, waiting)] == [TimeoutError] * 4

        deadline = loop.time() + 0.5
        response = await p.post(endpoint, {}, b"one", connect_s=5, deadline=deadline)
        assert await response.read(100, deadline) == b"one"
        answering = asyncio.ensure_future(p.post(endpoint, {}, b"late", connect_s=5))
        await asyncio.sleep(deadline - loop.time() + 0.05)  # the first deadline passes meanwhile
        late.set()
        response = await asyncio.wait_for(answering, 5)
        assert await response.read(100) == b"late"
        assert connections == 4 and p._open[endpoint.key] == 1  # the stalled three closed

        with unanswered_url() as stalled:
            nowhere = Endpoint.of(stalled)
            with pytest.raises(ConnectTimeout, match=r"^no connection within 0\.05 s$"):
                await p.post(nowhere, {}, b"{}", connect_s=0.05, deadline=loop.time() + 5)
            with pytest.raises(TimeoutError) as connecting:
                await p.post(nowhere, {}, b"{}", connect_s=5, deadline=soon())
            assert type(connecting.value) is TimeoutError
            assert p._open[nowhere.key] == 0


async def test_what_cannot_be_reached_is_described() -> None:
    async with pool() as p:
        with pytest.raises(Unreachable, match=r"^cannot connect"):
            await post(p, closed_port_url())


async def test_a_name_resolving_outside_the_allowed_upstreams_is_refused() -> None:
    async with pool("10.0.0.0/8", lambda host: ["127.0.0.1"]) as p:
        with pytest.raises(Unreachable, match=f"refused by {SETTING}"):
            await post(p, "http://gpu.test:9/v1")


async def test_an_aiohttp_upstream_answers() -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"got": (await request.read()).decode()})

    app = web.Application()
    app.router.add_post("/v1/x", ok)
    async with serving(app) as url, pool() as p:
        assert await post(p, f"{url}/v1/x", b"hi") == (200, b'{"got": "hi"}')


def test_connect_timeout_is_a_timeout() -> None:
    assert issubclass(ConnectTimeout, TimeoutError)


async def test_a_waiter_cancelled_once_woken_passes_its_turn_on() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                body = (await read_request(reader)).split(b"\r\n\r\n", 1)[1]
                held = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf"
                writer.write(held if body == b"hold" else answer_of(200, b"ok"))

    async with raw(serve) as url, pool(per_host=1) as p:
        held = await p.post(Endpoint.of(url), {}, b"hold", connect_s=5)  # the only connection, busy
        first = asyncio.ensure_future(post(p, url))
        second = asyncio.ensure_future(post(p, url))
        await asyncio.sleep(0.01)  # both wait for it
        held.close()  # its slot frees: `first` is woken...
        await asyncio.sleep(0)
        first.cancel()  # ...and cancelled before it ran (a timeout at that very moment)
        assert await asyncio.wait_for(second, 5) == (200, b"ok")
        with contextlib.suppress(asyncio.CancelledError):
            await first


async def test_a_request_waiting_for_a_connection_fails_when_the_pool_closes() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")  # held open
        with contextlib.suppress(asyncio.IncompleteReadError):
            await reader.readexactly(1)

    async with raw(serve) as url, pool(per_host=1) as p:
        held = await p.post(Endpoint.of(url), {}, b"{}", connect_s=5)  # the only connection, busy
        waiting = asyncio.ensure_future(post(p, url))
        await asyncio.sleep(0.01)
        p.close()  # the gateway shuts down: the waiting request ends, it does not hang
        with pytest.raises(Unreachable, match="shutting down"):
            await asyncio.wait_for(waiting, 5)
        held.close()


async def test_a_name_that_does_not_resolve_is_described() -> None:
    def lookup(host: str) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async with pool(lookup=lookup) as p:
        with pytest.raises(Unreachable, match=r"^cannot connect: Name or service not known$"):
            await post(p, "http://gpu.test:9/v1")


async def test_a_user_agent_is_sent() -> None:
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_request(reader))
        writer.write(answer_of(200, b"ok"))

    async with raw(serve) as url, pool() as p:
        await post(p, url)
    assert f"\r\nUser-Agent: switchboard/{__version__}\r\n".encode() in heads[0]
    assert heads[0].count(b"User-Agent") == 1


async def test_a_request_is_sent_byte_for_byte_with_its_head_made_once_or_each_time() -> None:
    """The head an endpoint made once for a provider's headers is sent for that very mapping;
    any other mapping (equal or not) has its head made for it: the bytes are the same."""
    sent: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                sent.append(await read_request(reader))
                writer.write(answer_of(200, b"ok"))

    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-1"}
    async with raw(serve) as url, pool() as p:
        endpoint = Endpoint.of(url).with_headers(headers)
        for given in (headers, dict(headers), headers, {"X-Other": "é"}):
            response = await p.post(endpoint, given, b'{"a": 1}', connect_s=5)
            assert await response.read(100) == b"ok"
    fixed = f"User-Agent: switchboard/{__version__}\r\nAccept: */*\r\nAccept-Encoding: identity\r\n"
    own = f"POST /v1/x HTTP/1.1\r\nHost: {url.split('/')[2]}\r\n"
    expected = f"{own}Content-Type: application/json\r\nAuthorization: Bearer sk-1\r\n{fixed}"
    other = f"{own}X-Other: é\r\n{fixed}"
    body = 'Content-Length: 8\r\n\r\n{"a": 1}'
    assert sent == [(expected + body).encode()] * 3 + [(other + body).encode()]
    with pytest.raises(Unsendable):
        Endpoint.of(url).with_headers({"X-A": "a\r\nX-Injected: 1"})


@contextlib.asynccontextmanager
async def https(ca: trustme.CA, *names: str) -> AsyncIterator[tuple[int, list[str | None]]]:
    """An https server on port 0 with a certificate `ca` issued for `names`; yields its port and
    the server names (SNI) its clients sent."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    sni: list[str | None] = []

    def named(_: ssl.SSLObject, name: str | None, __: ssl.SSLContext) -> None:
        sni.append(name)

    context.sni_callback = named

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            await read_request(reader)
            writer.write(answer_of(200, b"secure"))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1], sni
    finally:
        server.close()
        await server.wait_closed()


async def test_an_https_upstream_is_verified_and_named() -> None:
    """A certificate from a CA trusted (here: given to the pool) for the URL's host works, with
    the host sent as SNI; one from a CA not trusted, or for another host, is refused, and the
    reason says so."""
    ca = trustme.CA()
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    resolver = GuardedResolver(AllowedUpstreams(), lambda host: ["127.0.0.1"])
    verified, default = Pool(resolver, tls=trusted), Pool(resolver)
    try:
        async with https(ca, "gpu.test") as (port, sni):
            assert await post(verified, f"https://gpu.test:{port}/v1") == (200, b"secure")
            assert sni == ["gpu.test"]
            with pytest.raises(
                Unreachable,
                match=r"^cannot connect: the upstream's TLS certificate is refused \(Hostname mismatch\)$",
            ):
                await post(verified, f"https://other.test:{port}/v1")
            with pytest.raises(
                Unreachable, match=r"^cannot connect: the upstream's TLS certificate is refused \(.+\)$"
            ):
                await post(default, f"https://gpu.test:{port}/v1")
        async with raw(_plain) as plain:
            with pytest.raises(Unreachable, match=r"^cannot connect: no TLS handshake"):
                await post(verified, plain.replace("http://", "https://"))
    finally:
        verified.close()
        default.close()


async def _plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    await writer.drain()
    await reader.read(1 << 16)


async def test_many_requests_share_the_few_connections_allowed() -> None:
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                body = (await read_request(reader)).split(b"\r\n\r\n", 1)[1]
                await asyncio.sleep(0.001)
                writer.write(answer_of(200, body))

    async with raw(serve) as url, pool(per_host=2) as p:
        bodies = [str(n).encode() for n in range(50)]
        answers = await asyncio.wait_for(asyncio.gather(*(post(p, url, body) for body in bodies)), 10)
    assert answers == [(200, body) for body in bodies] and connections == 2


async def test_connections_idle_past_the_keepalive_are_closed() -> None:
    """The newest idle connection is taken first; the older ones past the keepalive are
    closed then too, not kept open for as long as the upstream keeps them."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                await read_request(reader)
                await asyncio.sleep(0.01)
                writer.write(answer_of(200, b"ok"))

    async with raw(serve) as url, pool() as p:
        await asyncio.gather(post(p, url), post(p, url))  # two connections, both idle now
        idle = p._idle[Endpoint.of(url).key]
        assert len(idle) == 2
        idle[0].idle_since -= p.keepalive_s  # the older one's keepalive is over
        assert await post(p, url) == (200, b"ok")
        assert len(idle) == 1


async def test_an_exchange_on_a_kept_alive_connection_asks_for_no_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool, its connections and their answers keep the loop they were made on:
    `asyncio.get_running_loop` makes a system call (getpid) on every call, and an exchange
    made several (the deadline, each wait, the release)."""
    asked = 0
    running = asyncio.get_running_loop

    def counted() -> asyncio.AbstractEventLoop:
        nonlocal asked
        asked += 1
        return running()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                await read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.001)  # the body after the head: a wait for it
                writer.write(b"ok")

    async with raw(serve) as url, pool() as p:
        assert await post(p, url) == (200, b"ok")  # connected
        monkeypatch.setattr(asyncio, "get_running_loop", counted)
        endpoint = Endpoint.of(url)
        for _ in range(3):
            response = await p.post(endpoint, {}, b"{}", connect_s=5, deadline=p.loop.time() + 5)
            assert await response.readany(5, deadline=p.loop.time() + 5) == b"ok"
            assert await response.readany(5) == b""
        monkeypatch.undo()
    assert asked == 0


def test_an_endpoint_with_its_head_never_shows_the_key() -> None:
    """An endpoint keeps the head made for a provider's headers, key included: like `Upstream`,
    it never prints it (a log, an error, a debugger's view of it)."""
    endpoint = Endpoint.of("http://127.0.0.1:1/v1/x").with_headers({"Authorization": "Bearer sk-secret-1"})
    assert b"sk-secret-1" in endpoint.head  # what is sent
    assert "sk-secret-1" not in repr(endpoint) and "sk-secret-1" not in str(endpoint)
