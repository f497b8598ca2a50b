"""GET /metrics over HTTP/1.1 for Prometheus, on the daemon's event loop.

The exposition is rendered on the loop, where the pools it reads are changed, so a
scrape never sees a half-made change. Everything a scraper controls is bounded: the
connections, the bytes of a request head, and how long one may take to arrive.
"""

import asyncio
import contextlib
import socket
from collections.abc import Callable

# the text format every Prometheus 2.x reads (Debian 12 ships 2.42)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from moltbotd.logs import get_logger

log = get_logger("metrics")

MAX_CONNECTIONS = 16
MAX_HEAD_BYTES = 8192
HEAD_TIMEOUT = 10.0  # seconds for a request head to arrive, the first or the next

Render = Callable[[], bytes]


class MetricsListener:
    def __init__(self, render: Render) -> None:
        self.render = render
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, where: tuple[str, int] | socket.socket) -> None:
        """Listen at (host, port), or on a listening socket systemd passed; OSError (the
        port is taken, the address is not ours) is the caller's."""
        if isinstance(where, socket.socket):
            self._server = await asyncio.start_server(self._serve, sock=where,
                                                      limit=MAX_HEAD_BYTES)  # fmt: skip
        else:
            self._server = await asyncio.start_server(self._serve, *where,
                                                      limit=MAX_HEAD_BYTES)  # fmt: skip
        log.info("metrics at http://{address}/metrics", address=self.address)

    @property
    def address(self) -> str:
        """Where it listens (the port the kernel chose when 0 was asked)."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= MAX_CONNECTIONS:
            writer.write(_response(503, b"too many connections\n", close=True))
            await _close(writer)
            return
        self._connections.add(task)
        try:
            while await self._one(reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # the scraper went away, or sent something we answered and closed
        finally:
            self._connections.discard(task)
            await _close(writer)

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection ends."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.LimitOverrunError:
            writer.write(_response(431, b"request head over 8192 bytes\n", close=True))
            await writer.drain()
            return False
        except (TimeoutError, asyncio.IncompleteReadError):
            return False
        status, body, close = self._answer(head)
        writer.write(_response(status, body, close, head.startswith(b"HEAD ")))
        await writer.drain()
        return not close

    def _answer(self, head: bytes) -> tuple[int, bytes, bool]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, b"expected an HTTP/1.x request line\n", True
        method, target, version = parts
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:] if line)}  # fmt: skip
        close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
        if "content-length" in headers or "transfer-encoding" in headers:
            return 400, b"GET /metrics takes no body\n", True
        if method not in ("GET", "HEAD"):
            return 405, f"method {method} not allowed: GET /metrics\n".encode(), close
        if target.split("?", 1)[0] != "/metrics":
            return 404, f"no {target[:100]} here: GET /metrics\n".encode(), close
        return 200, self.render(), close


def _response(status: int, body: bytes, close: bool, head_only: bool = False) -> bytes:
    reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
               431: "Request Header Fields Too Large", 503: "Service Unavailable"}  # fmt: skip
    kind = CONTENT_TYPE_PLAIN_0_0_4 if status == 200 else "text/plain; charset=utf-8"
    allow = "Allow: GET, HEAD\r\n" if status == 405 else ""
    head = (f"HTTP/1.1 {status} {reasons[status]}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\n{allow}"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n")  # fmt: skip
    return head.encode() + (b"" if head_only else body)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
