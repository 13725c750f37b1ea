"""A TCP proxy in front of the test server, to break a connection the ways networks do: cut it
(both ends closed) when the client sends given bytes, or make it vanish (nothing forwarded,
nothing closed: a failover, a partition, a dropped NAT entry)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import URL


class Proxy:
    """Forwards 127.0.0.1:`port` to the server; `cut_on` cuts the first `cuts` connections that
    send those bytes; `vanish()` silences the connections open now, for good."""

    def __init__(self, target: URL, cut_on: bytes | None = None, cuts: int = 0) -> None:
        self.target = target
        self.cut_on, self.cuts = cut_on, cuts
        self.open: set[asyncio.Event] = set()  # per connection: set when it has vanished
        self.transports: set[asyncio.WriteTransport] = set()
        self.port = 0

    def url(self) -> URL:
        return self.target.set(host="127.0.0.1", port=self.port)

    def vanish(self) -> None:
        for silenced in self.open:
            silenced.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silenced = asyncio.Event()
        self.open.add(silenced)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)
        except OSError:
            writer.transport.abort()
            return
        self.transports |= {writer.transport, up_writer.transport}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                if silenced.is_set():
                    continue  # swallowed; neither end hears of it
                cut = source is reader and self.cut_on is not None and self.cut_on in data
                if cut and self.cuts > 0:
                    self.cuts -= 1
                    writer.transport.abort()
                    up_writer.transport.abort()
                    return
                sink.write(data)
            if not silenced.is_set():
                sink.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except OSError:
            pass
        finally:
            self.open.discard(silenced)
            self.transports -= {writer.transport, up_writer.transport}
            writer.transport.abort()
            up_writer.transport.abort()


@asynccontextmanager
async def proxy(target: URL, cut_on: bytes | None = None, cuts: int = 0) -> AsyncIterator[Proxy]:
    """A running `Proxy`, closed (with every connection through it) on the way out."""
    proxy = Proxy(target, cut_on, cuts)
    server = await asyncio.start_server(proxy._handle, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()
        for transport in list(proxy.transports):
            transport.abort()
        await server.wait_closed()
