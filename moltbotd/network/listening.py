"""An asyncio stream server that knows its connections: it refuses those past a bound
with a ready-made answer, and can end the rest at stop. The metrics endpoint and the
Open Inference Protocol's HTTP listener are both one."""

import asyncio
import contextlib
import socket
import ssl

from moltbotd.logs import get_logger

log = get_logger("network")

# A client that went away or broke the protocol: it was answered if it could be.
GONE = (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError, ValueError)


class StreamListener:
    def __init__(self, max_connections: int, refusal: bytes, tls: ssl.SSLContext | None = None,
                 limit: int = 2**16) -> None:  # fmt: skip
        self.max_connections = max_connections
        self.refusal = refusal  # written to a connection past max_connections
        self.tls = tls
        self.limit = limit  # the stream reader's buffer
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, where: tuple[str, int] | socket.socket) -> None:
        """Listen at (host, port), or on a listening socket systemd passed; OSError (the
        port is taken, the address is not ours) is the caller's."""
        if isinstance(where, socket.socket):
            self._server = await asyncio.start_server(self._serve, sock=where, ssl=self.tls,
                                                      limit=self.limit)  # fmt: skip
        else:
            self._server = await asyncio.start_server(self._serve, *where, ssl=self.tls,
                                                      limit=self.limit)  # fmt: skip

    @property
    def address(self) -> str:
        """Where it listens (the port the kernel chose when 0 was asked)."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        """Accept no more connections."""
        if self._server is not None:
            self._server.close()

    async def stop(self) -> None:
        self.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.max_connections:
            writer.write(self.refusal)
            await close(writer)
            return
        self._connections.add(task)
        try:
            await self.serve(reader, writer)
        except GONE:
            pass
        except Exception:
            peer = writer.get_extra_info("peername")
            log.exception("internal error on a connection of {listener}",
                          listener=type(self).__name__, peer=str(peer))  # fmt: skip
        finally:
            self._connections.discard(task)
            await close(writer)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
