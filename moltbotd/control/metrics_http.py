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
from moltbotd.network.listening import StreamListener

log = get_logger("metrics")

MAX_CONNECTIONS = 16
MAX_HEAD_BYTES = 8192
HEAD_TIMEOUT = 10.0  # seconds for a request head to arrive, the first or the next

Render = Callable[[], bytes]


class MetricsListener(StreamListener):
    def __init__(self, render: Render) -> None:
        super().__init__(MAX_CONNECTIONS, _response(503, b"too many connections\n", close=True),
                         limit=MAX_HEAD_BYTES)  # fmt: skip
        self.render = render

    async def start(self, where: tuple[str, int] | socket.socket) -> None:
        await super().start(where)
        log.info("metrics at http://{address}/metrics", address=self.address)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.LimitOverrunError):
            while await self._one(reader, writer):
                pass

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
