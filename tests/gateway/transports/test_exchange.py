"""One exchange on one connection against raw servers on port 0: answers parsed, bounded, broken
off, and connections that must not be pooled again."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import struct
import zlib

import pytest

from service.gateway.transports import exchange
from service.gateway.transports.errors import BrokenOff, Disconnected, TooLarge
from service.gateway.transports.wire import Endpoint
from tests.support.wire import answer_of, pool, post, raw, read_request


async def test_chunked_and_read_to_eof_and_interim_answers() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")

    async def to_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        writer.close()

    async with raw(chunked) as one, raw(to_eof) as two, pool() as p:
        assert await post(p, one) == (200, b"abcde")
        assert await post(p, two) == (200, b"all of it")


async def test_a_large_body_in_the_heads_packet_is_no_large_head() -> None:
    async def large(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer_of(200, b"x" * (1 << 20)))

    async with raw(large) as url, pool() as p:
        assert await post(p, url) == (200, b"x" * (1 << 20))


async def test_an_answer_over_the_limit_and_a_gzip_bomb_fail_within_it() -> None:
    bomb = gzip.compress(b"0" * (64 << 20))

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer_of(200, b"x" * 5000))

    async def gzipped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                body = (await read_request(reader)).split(b"\r\n\r\n", 1)[1]
                writer.write(
                    answer_of(
                        200, bomb if body == b"bomb" else gzip.compress(b"fine"), b"Content-Encoding: gzip"
                    )
                )

    async with raw(big) as large, raw(gzipped) as zipped, pool() as p:
        response = await p.post(Endpoint.of(large), {}, b"{}", connect_s=5, limit=1000)
        with pytest.raises(TooLarge):
            await response.read(1000)
        assert await post(p, zipped) == (200, b"fine")
        response = await p.post(Endpoint.of(zipped), {}, b"bomb", connect_s=5)
        with pytest.raises(TooLarge):
            await response.read(1 << 20)


async def test_a_huge_head_garbage_and_no_status_are_broken_answers() -> None:
    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")

    async def no_status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 099 Nothing\r\nContent-Length: 2\r\n\r\n{}")  # llhttp takes it

    async with raw(huge) as one, raw(garbage) as two, raw(no_status) as three, pool() as p:
        for url in (one, two, three):
            with pytest.raises(BrokenOff):
                await post(p, url)


async def test_a_server_that_closes_without_answering_is_disconnected() -> None:
    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    async with raw(close) as url, pool() as p:
        with pytest.raises(Disconnected, match="closed the connection"):
            await post(p, url)


async def test_a_stream_is_read_as_it_comes_and_times_out_when_idle() -> None:
    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await asyncio.sleep(5)

    async with raw(stream) as url, pool() as p:
        response = await p.post(Endpoint.of(url), {}, b"{}", connect_s=5)
        assert await response.readany(1) == b"first"
        with pytest.raises(TimeoutError):
            await response.readany(0.05)
        response.close()


async def test_a_stream_longer_than_its_silence_is_read_whole_and_each_silence_timed_from_its_chunk() -> None:
    """A stream's waits share one timer (`Response._silenced`): a stream whose chunks each come
    within `within`, lasting many times `within` in all, is read whole; the silence that
    follows fails at `within` after the last chunk, not sooner (a timer armed for an earlier
    wait) and not much later."""
    chunks = 12
    gone = asyncio.Event()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(chunks):
            await asyncio.sleep(0.04)
            writer.write(b"1\r\n%d\r\n" % (i % 10))
        await gone.wait()  # then silence

    loop = asyncio.get_running_loop()
    async with raw(stream) as url, pool() as p:
        response = await p.post(Endpoint.of(url), {}, b"{}", connect_s=5)
        started = loop.time()
        read = b""
        while len(read) < chunks:
            read += await response.readany(0.1)
            last = loop.time()
        assert last - started > 0.3  # three times `within`: each silence is timed, not the whole
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(response.readany(0.1), 5)
        silent = loop.time() - last
        response.close()
        gone.set()
    assert read == b"".join(b"%d" % (i % 10) for i in range(chunks))
    assert 0.09 <= silent < 2


async def test_a_shorter_silence_after_a_longer_one_times_out_at_its_own_deadline() -> None:
    more = asyncio.Event()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await more.wait()
        writer.write(b"5\r\nfirst\r\n")
        await asyncio.sleep(5)

    async with raw(stream) as url, pool() as p:
        response = await p.post(Endpoint.of(url), {}, b"{}", connect_s=5)
        waiting = asyncio.ensure_future(response.readany(30))  # a wait that arms its timer for 30 s
        await asyncio.sleep(0.01)
        more.set()
        assert await waiting == b"first"
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):  # not 30 s: the timer is moved earlier
            await asyncio.wait_for(response.readany(0.05), 5)
        response.close()
    assert loop.time() - started < 2  # its own deadline's, not `wait_for`'s


async def test_a_cancelled_answer_never_goes_back_to_the_pool() -> None:
    connections = 0

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
                await writer.drain()

    async with raw(slow) as url, pool() as p:
        response = await p.post(Endpoint.of(url), {}, b"{}", connect_s=5)
        reading = asyncio.ensure_future(response.read(100))
        await asyncio.sleep(0.01)
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        response.close()
        response = await p.post(Endpoint.of(url), {}, b"{}", connect_s=5)
        response.close()
    assert connections == 2


async def test_bytes_past_an_answer_spoil_its_connection() -> None:
    """A body longer than its length, or a second answer nobody asked for: the connection is
    closed, never pooled (twice, or with its parser broken), so answers cannot cross."""
    first = True

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal first
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                body = (await read_request(reader)).split(b"\r\n\r\n", 1)[1]
                if first:
                    first = False
                    writer.write(answer_of(200, b"one") + answer_of(200, b"nobody's"))
                else:
                    await asyncio.sleep(0.01)
                    writer.write(answer_of(200, body))

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                body = (await read_request(reader)).split(b"\r\n\r\n", 1)[1]
                writer.write(answer_of(200, body) + b"\x00garbage")
                await writer.drain()

    async with raw(serve) as url, raw(garbage) as spoilt, pool() as p:
        assert await post(p, url) == (200, b"one")
        answers = await asyncio.wait_for(asyncio.gather(post(p, url, b"a"), post(p, url, b"b")), 5)
        assert answers == [(200, b"a"), (200, b"b")]
        assert await post(p, spoilt, b"c") == (200, b"c")
        assert await post(p, spoilt, b"d") == (200, b"d")


async def test_an_upgrade_is_a_broken_answer_not_a_crash() -> None:
    async def upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\nxx")
        await asyncio.sleep(5)

    loop = asyncio.get_running_loop()
    crashes: list[str] = []
    loop.set_exception_handler(lambda _, context: crashes.append(context["message"]))
    try:
        async with raw(upgrade) as url, pool() as p:
            with pytest.raises(BrokenOff, match=r"not HTTP/1\.1"):
                await post(p, url)
    finally:
        loop.set_exception_handler(None)
    assert not [crash for crash in crashes if "data_received" in crash]


async def test_a_reset_breaks_off_an_answer_read_to_the_end() -> None:
    """Without a length, the body ends with the connection: a clean close, not a reset."""
    resume = asyncio.Event()

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart")
        await writer.drain()
        await resume.wait()
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()

    async with raw(reset) as url, pool() as p:
        response = await p.post(Endpoint.of(url), {}, b"{}", connect_s=5)
        assert await response.readany(5) == b"part"
        resume.set()
        with pytest.raises(BrokenOff, match="broke off"):
            await response.readany(5)


async def test_a_flood_of_trailers_is_bounded() -> None:
    async def trailers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n")
        for _ in range(4096):
            writer.write(b"X-T: " + b"t" * 1000 + b"\r\n")
            await writer.drain()
        writer.write(b"\r\n")

    async with raw(trailers) as url, pool() as p:
        with pytest.raises(BrokenOff, match="head is over"):
            await post(p, url)


async def test_an_answer_over_the_limit_is_too_large_even_once_whole() -> None:
    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer_of(200, b"x" * 5000))

    async with raw(big) as url, pool() as p:
        response = await p.post(Endpoint.of(url), {}, b"{}", connect_s=5)  # a stream: no limit yet
        for _ in range(1000):
            if response.received >= len(answer_of(200, b"x" * 5000)):
                break
            await asyncio.sleep(0.001)
        with pytest.raises(TooLarge):
            await response.read(1000)


async def test_a_compressed_answer_cut_short_is_broken() -> None:
    cut = gzip.compress(b"a whole answer" * 100)[:-20]
    deflated = zlib.compress(b"fine")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                body = (await read_request(reader)).split(b"\r\n\r\n", 1)[1]
                if body == b"cut":
                    writer.write(answer_of(200, cut, b"Content-Encoding: gzip"))
                else:
                    writer.write(answer_of(200, deflated, b"Content-Encoding: deflate"))

    async with raw(serve) as url, pool() as p:
        with pytest.raises(BrokenOff, match="does not inflate"):
            await post(p, url, b"cut")
        assert await post(p, url, b"whole") == (200, b"fine")


async def test_an_answer_keeps_the_headers_read_and_passed_back_in_any_case() -> None:
    """Kept: the framing headers (honoured in any case), Content-Type and what is passed back
    (`x-request-id`, `retry-after`, `retry-after-ms`, every `x-ratelimit-*`), named in lower
    case, values decoded as before (non-UTF-8 bytes kept as surrogates), duplicates in order.
    Any other header is not kept, nor is a trailer; the names are looked at once however many
    an upstream sends (past the ones remembered, each is looked at every time)."""
    many = b"".join(b"X-Junk-%d: j\r\n" % n for n in range(600))  # more names than remembered

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                await read_request(reader)
                writer.write(
                    b"HTTP/1.1 201 Created\r\nTRANSFER-ENCODING: chunked\r\nContent-Type: text/x; q=\xe9\r\n"
                    b"Set-Cookie: s=1\r\nX-Request-ID: r1\r\nRetry-After: 3\r\nretry-after-ms: 3000\r\n"
                    + many
                    + b"X-RateLimit-Remaining-Tokens: 9\r\nx-ratelimit-remaining-tokens: 8\r\n"
                    b"content-ENCODING: gzip\r\n\r\n"
                )
                body = gzip.compress(b"fine")
                writer.write(b"%x\r\n%b\r\n0\r\nX-Request-Id: trailer\r\n\r\n" % (len(body), body))

    async with raw(serve) as url, pool() as p:
        for _ in range(2):  # names seen before, and remembered
            response = await p.post(Endpoint.of(url), {}, b"{}", connect_s=5)
            assert (response.status, await response.read(100)) == (201, b"fine")
            assert list(response.headers.items()) == [
                ("transfer-encoding", "chunked"),
                ("content-type", "text/x; q=\udce9"),
                ("x-request-id", "r1"),
                ("retry-after", "3"),
                ("retry-after-ms", "3000"),
                ("x-ratelimit-remaining-tokens", "9"),
                ("x-ratelimit-remaining-tokens", "8"),
                ("content-encoding", "gzip"),
            ]
            assert response.headers["Content-Type"] == "text/x; q=\udce9"  # looked up in any case


async def test_bytes_without_body_do_not_restart_a_streams_silence() -> None:
    """The reader is woken once per read that brought it something (the head, body bytes, the
    end), never by bytes that framed nothing yet: a chunk's size line alone keeps the silence
    timed from the wait's start, however often it trickles in."""
    loop = asyncio.get_running_loop()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await asyncio.sleep(0.6)
        writer.write(b"0000")  # a chunk's size, its digits coming one read at a time: no body
        await writer.drain()
        await asyncio.sleep(5)

    async with raw(stream) as url, pool() as p:
        response = await p.post(Endpoint.of(url), {}, b"{}", connect_s=5)
        assert await response.readany(1) == b"first"
        started = loop.time()
        with pytest.raises(TimeoutError):
            await response.readany(1)
        assert loop.time() - started < 1.45  # restarted at 0.6 s, it would end at 1.6 s
        response.close()


async def test_a_stream_read_slower_than_it_comes_stops_the_reading_and_loses_nothing() -> None:
    """Past 256 KiB buffered unread, a stream's connection stops reading (back-pressure on the
    upstream), and reads on once the reader took what was buffered; a read whole under a
    limit is never paused (it is bounded by its limit instead)."""
    piece = b"x" * (64 << 10)

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                await read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for _ in range(16):  # 1 MiB
                    writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")

    async with raw(stream) as url, pool() as p:
        response = await p.post(Endpoint.of(url), {}, b"{}", connect_s=5)
        (connection,) = p._all
        for _ in range(1000):
            if connection.paused:
                break
            await asyncio.sleep(0.001)
        assert connection.paused and response._buffered > 256 << 10
        got = b""
        while chunk := await response.readany(5):
            got += chunk
        assert got == piece * 16 and not connection.paused
        assert await post(p, url) == (200, piece * 16)  # read whole: not paused, nor cut


async def test_releasing_an_answer_read_whole_keeps_its_connection_and_one_half_read_drops_it() -> None:
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                body = (await read_request(reader)).split(b"\r\n\r\n", 1)[1]
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
                if body == b"half":
                    await asyncio.sleep(5)
                writer.write(b"0\r\n\r\n")

    async with raw(serve) as url, pool() as p:
        for _ in range(3):  # read to its end, then released: pooled, reused
            response = await p.post(Endpoint.of(url), {}, b"{}", connect_s=5)
            while await response.readany(5):
                pass
            response.release()
            response.release()  # twice: nothing more happens
        assert connections == 1
        response = await p.post(Endpoint.of(url), {}, b"half", connect_s=5)
        response.release()  # its body not whole: the connection is dropped
        with pytest.raises(BrokenOff, match=r"^closed$"):  # once what had come is read
            while await response.readany(5):
                pass
        assert await post(p, url) == (200, b"ok") and connections == 2


async def test_an_upstreams_long_header_names_are_not_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The names remembered are bounded in size as in number: an upstream sending ever new
    names of 60 KB each (under the head's limit) pins no megabytes in the gateway for good;
    those names are looked at each time, and the answer is read as any other."""
    monkeypatch.setattr(exchange, "_NAMES", {})  # none remembered yet (other tests fill it)
    sent = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                await read_request(reader)
                sent += 1
                name = b"X-%d-" % sent + b"n" * 60_000
                writer.write(b"HTTP/1.1 200 OK\r\n%b: v\r\nContent-Length: 2\r\n\r\nok" % name)

    async with raw(serve) as url, pool() as p:
        for _ in range(20):
            assert await post(p, url) == (200, b"ok")
    assert max(map(len, exchange._NAMES), default=0) <= exchange._LONGEST_NAME


def test_an_upstreams_ever_new_header_names_never_keep_the_usual_ones_out_of_the_memo(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The memo of names holds `_MAX_NAMES` at most, and starts again once full: an upstream
    that sent 512 names of junk first does not keep `content-type` from being remembered for
    good (it is then looked at each time, for every answer of every upstream)."""
    monkeypatch.setattr(exchange, "_NAMES", {})
    for n in range(exchange._MAX_NAMES):
        assert exchange._kept(b"X-Junk-%d" % n) is None
    assert len(exchange._NAMES) == exchange._MAX_NAMES
    assert exchange._kept(b"Content-Type") == "content-type"
    assert exchange._NAMES == {b"Content-Type": "content-type"}
    assert exchange._kept(b"X-RateLimit-Remaining-Requests") == "x-ratelimit-remaining-requests"
    assert len(exchange._NAMES) == 2


@pytest.mark.parametrize(
    "said",
    [
        b"Connection: close\r\n",
        b"CONNECTION: CLOSE\r\n",
        b"connection: keep-alive, close\r\n",
        b"Connection: keep-alive\r\nConnection: close\r\n",
    ],
)
async def test_an_answer_that_says_close_never_pools_its_connection(said: bytes) -> None:
    """`Connection` is not kept among the answer's headers, yet honoured in any case or form:
    an upstream that says close and keeps the connection open gets no second request on it
    (its next answer would go to another client)."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                await read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\n%bContent-Length: %d\r\n\r\n%d" % (said, 1, connections))

    async with raw(serve) as url, pool() as p:
        assert [await post(p, url) for _ in range(3)] == [(200, b"1"), (200, b"2"), (200, b"3")]
        assert "connection" not in (await p.post(Endpoint.of(url), {}, b"{}", connect_s=5)).headers
    assert connections == 4
