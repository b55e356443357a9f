"""The HTTP listening socket: connections on it must have Nagle off, or every reply waits ~40 ms."""

from __future__ import annotations

import asyncio
import socket

from carddeck.http.server import _listen


def test_connections_on_the_http_socket_have_nagle_off():
    sock = _listen("127.0.0.1", 0)

    async def nodelay_of_an_accepted_connection() -> int:
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[int] = loop.create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                seen.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        server = await loop.create_server(Probe, sock=sock)  # what uvicorn does with the socket
        _, writer = await asyncio.open_connection(*sock.getsockname())
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(nodelay_of_an_accepted_connection()) != 0
