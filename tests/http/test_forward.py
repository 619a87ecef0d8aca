"""A follower's pipe to its leader (`service.http.forward`, `serve --workers N`), with a stand-in
leader on a real Unix socket and real TCP clients."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from service.http.forward import Forwarder


async def test_a_client_that_takes_nothing_is_let_go_of_once_the_leader_closed_its_side(
    tmp_path: Path,
) -> None:
    """The leader ends a connection whose client took nothing of its answer (its send timeout):
    the follower's end is closed too, within the send timeout, not kept for good waiting for
    the client to take what it holds."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"x" * (16 << 20))  # more than every buffer between it and the client
        await asyncio.sleep(0.3)
        writer.transport.abort()

    path = tmp_path / "leader.sock"
    leader = await asyncio.start_unix_server(answer, str(path))
    loop = asyncio.get_running_loop()
    forwarder = Forwarder(str(path), loop, send_timeout_s=0.5)
    follower = await loop.create_server(forwarder.protocol, "127.0.0.1", 0)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(follower.sockets[0].getsockname())
    try:
        client.sendall(b"GET /api HTTP/1.1\r\nHost: x\r\n\r\n")  # and reads nothing
        await asyncio.sleep(0.2)
        assert forwarder.open == 1
        started = time.monotonic()
        while forwarder.open and time.monotonic() - started < 3:
            await asyncio.sleep(0.05)
        assert forwarder.open == 0
    finally:
        client.close()
        follower.close()
        leader.close()
        await forwarder.aclose()
