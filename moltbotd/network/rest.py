"""The Open Inference Protocol over HTTP/1.1 (network/http1.py parses, wire/oip.py
translates), with TLS when configured and JWT bearer tokens when keys are.

Everything a client controls is bounded: the connections (then 503), the request head
(then 431), the body (max_frame_bytes, then 413, refused from Content-Length before it
is read), and the time a request may take to arrive. Health endpoints need no token, so
that a load balancer's checks need none either.
"""

import asyncio
import json
import socket
import ssl
import urllib.parse
from typing import Any

from moltbotd import __version__
from moltbotd.config import NetworkSettings
from moltbotd.logs import get_logger
from moltbotd.network.gateway import Gateway, NetPeer, call, health, ready_or_not
from moltbotd.network.http1 import Refused, Request, ServerConnection, response
from moltbotd.network.listening import StreamListener
from moltbotd.network.tokens import TokenRights, Tokens, Unauthenticated
from moltbotd.wire import oip
from moltbotd.wire.protocol import MoltError

log = get_logger("network")

MAX_HEAD_BYTES = 16384
BODY_TIMEOUT = 60.0  # seconds for a request's body to arrive once its head has
READ_BYTES = 256 * 1024
JSON = "application/json"
EXTENSIONS = ["binary_tensor_data"]

Reply = tuple[int, bytes, list[tuple[str, str]]]  # status, body, extra headers


class Exchange:
    """One request: what it asked, and who asked."""

    def __init__(self, request: Request, connection: "Connection",
                 parts: dict[str, str]) -> None:  # fmt: skip
        self.headers = request.headers
        self.body = request.body
        self.peer = connection.peer
        self._tokens, self._refused = connection.listener.tokens, connection.refused
        self.model = parts.get("model", "")
        self.version = parts.get("version") or None

    def rights(self) -> TokenRights:
        """What the request's token allows; raises Unauthenticated."""
        return self._tokens.rights(self.headers.get("authorization"), self._refused)


class HttpListener(StreamListener):
    def __init__(self, gateway: Gateway, settings: NetworkSettings, tokens: Tokens,
                 tls: ssl.SSLContext | None, max_body: int) -> None:  # fmt: skip
        body = oip.error_body("too many connections; retry later")
        refusal = response(503, [("Content-Type", JSON)], body, close=True)
        super().__init__(settings.max_connections, refusal, tls)
        self.gateway = gateway
        self.settings = settings
        self.tokens = tokens
        self.max_body = max_body
        self.transport = "https" if tls else "http"
        self.busy = 0  # requests being answered
        self.idle = asyncio.Event()  # set while busy is 0
        self.idle.set()
        self.closing = False  # no new connections; each ends after its current request

    async def start(self, where: tuple[str, int] | socket.socket) -> None:
        await super().start(where)
        log.info("Open Inference Protocol at {url}", url=f"{self.transport}://{self.address}/v2")

    def close(self) -> None:
        """Stop accepting; connections end after the request they are on."""
        self.closing = True
        super().close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = NetPeer(self.transport, _address(writer.get_extra_info("peername")))
        await Connection(self, reader, writer, peer).run()


class Connection:
    """One HTTP connection: requests one after another (keep-alive), each answered."""

    def __init__(self, listener: HttpListener, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, peer: NetPeer) -> None:  # fmt: skip
        self.listener = listener
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.http = ServerConnection(MAX_HEAD_BYTES, listener.max_body)
        self.refused: set[str] = set()  # operations refused here (audited once each)

    async def run(self) -> None:
        while (request := await self._next()) is not None:
            if isinstance(request, Refused):
                await self._reply(request.status, oip.error_body(request.message), [], True)
                return
            if not await self._exchange(request):
                return
            self.http.done()

    async def _next(self) -> Request | Refused | None:
        """The next request once it is all in, or why the connection must end; None when
        the client closed. TimeoutError past the idle timeout, or BODY_TIMEOUT once a
        request's head is in."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.listener.settings.idle_timeout
        head = None
        while True:
            request = self.http.next_request()
            if request is not None and request.complete:
                return request
            if self.http.refusal is not None:
                return self.http.refusal
            if request is not None and request is not head:
                head, deadline = request, loop.time() + BODY_TIMEOUT
            if interim := self.http.interim():
                self.writer.write(interim)
            async with asyncio.timeout_at(deadline):
                data = await self.reader.read(READ_BYTES)
            if not data:
                return self.http.ended()
            self.http.feed(data)

    async def _exchange(self, request: Request) -> bool:
        """Answer; False when the connection must end."""
        listener = self.listener
        listener.busy += 1
        listener.idle.clear()
        try:
            status, payload, headers = await self._answer(request)
        finally:
            listener.busy -= 1
            if not listener.busy:
                listener.idle.set()
        close = listener.closing or not request.keep_alive
        await self._reply(status, payload, headers, close, head=request.method == "HEAD")
        return not close

    async def _answer(self, request: Request) -> Reply:
        path = urllib.parse.unquote(request.target.split("?", 1)[0])
        found = route(request.method, path)
        if isinstance(found, tuple) and isinstance(found[0], int):
            return found  # type: ignore[return-value]
        handler, parts = found  # type: ignore[misc]
        exchange = Exchange(request, self, parts)
        try:
            return await handler(self.listener, exchange)
        except Unauthenticated as exc:
            challenge = f'Bearer error="invalid_token", error_description="{_quoted(str(exc))}"'
            return 401, oip.error_body(str(exc)), [("WWW-Authenticate", challenge)]
        except MoltError as exc:
            status = oip.STATUS.get(exc.code, (500, ""))[0]
            return status, oip.error_body(exc.message), [("Moltbot-Error-Code", exc.code.value)]
        except Exception:  # a bug: answered as the socket answers one, and logged
            log.exception("internal error answering {path}", path=path[:200])
            message = "internal error in moltbotd; the daemon log has the details"
            return 500, oip.error_body(message), [("Moltbot-Error-Code", "INTERNAL")]

    async def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]],
                     close: bool, head: bool = False) -> None:  # fmt: skip
        """The whole answer in one write: a head sent alone would cost a syscall and wake
        the client for half an answer."""
        self.writer.write(response(status, [("Content-Type", JSON), *headers], body, close, head))
        await self.writer.drain()


# --- routes ------------------------------------------------------------------------------


async def live(_: HttpListener, __: Exchange) -> Reply:
    return 200, b'{"live":true}', []


async def ready(listener: HttpListener, x: Exchange) -> Reply:
    """Every served model ready, and not shutting down (what a load balancer asks)."""
    found = await health(listener.gateway, x.peer)
    ok = found["status"] == "ok"
    return (200 if ok else 503), json.dumps({"ready": ok, **found}).encode(), []


async def server_metadata(_: HttpListener, __: Exchange) -> Reply:
    doc = {"name": "moltbotd", "version": __version__, "extensions": EXTENSIONS}
    return 200, json.dumps(doc).encode(), []


async def model_metadata(listener: HttpListener, x: Exchange) -> Reply:
    found = await _metadata(listener, x)
    return 200, json.dumps(oip.model_metadata(found)).encode(), []


async def model_ready(listener: HttpListener, x: Exchange) -> Reply:
    ready_now = await ready_or_not(_metadata(listener, x))
    doc = {"name": x.model, "version": x.version, "ready": ready_now}
    return (200 if ready_now else 503), json.dumps(doc).encode(), []


async def _metadata(listener: HttpListener, x: Exchange) -> dict[str, Any]:
    params = {"model": x.model, "version": x.version}
    return await call(listener.gateway, "metadata", params, x.rights(), x.peer)  # type: ignore[no-any-return]


async def infer(listener: HttpListener, x: Exchange) -> Reply:
    rights = x.rights()  # before the body is parsed: a stranger learns nothing from errors
    length = x.headers.get(oip.HEADER_LENGTH)
    if length is not None and not length.isdigit():
        raise oip.invalid(f"{oip.HEADER_LENGTH} must be a byte count, got {length[:40]!r}")
    params, wanted = oip.parse_infer(
        x.body, None if length is None else int(length), x.model, x.version
    )
    result = await call(listener.gateway, "infer", params, rights, x.peer)
    body, json_length = oip.infer_answer(result, wanted, params.get("request_id"))
    if json_length is None:
        return 200, body, []
    return 200, body, [(oip.HEADER_LENGTH.title(), str(json_length))]


# (method, path pattern) -> handler; {model} and {version} are one path segment each
ROUTES: list[tuple[str, tuple[str, ...], Any]] = [
    ("GET", ("v2", "health", "live"), live),
    ("GET", ("v2", "health", "ready"), ready),
    ("GET", ("v2",), server_metadata),
    ("GET", ("v2", "models", "{model}"), model_metadata),
    ("GET", ("v2", "models", "{model}", "versions", "{version}"), model_metadata),
    ("GET", ("v2", "models", "{model}", "ready"), model_ready),
    ("GET", ("v2", "models", "{model}", "versions", "{version}", "ready"), model_ready),
    ("POST", ("v2", "models", "{model}", "infer"), infer),
    ("POST", ("v2", "models", "{model}", "versions", "{version}", "infer"), infer),
]


def route(method: str, path: str) -> tuple[Any, dict[str, str]] | Reply:
    """The handler for a request and the path's parts; or the refusal (404, 405)."""
    segments = tuple(path.strip("/").split("/"))
    allowed = []
    for verb, pattern, handler in ROUTES:
        parts = _match(pattern, segments)
        if parts is None:
            continue
        if method == verb or (method == "HEAD" and verb == "GET"):
            return handler, parts
        allowed.append(verb)
    if allowed:
        message = f"{method} is not allowed on {path[:200]}; use {', '.join(allowed)}"
        return 405, oip.error_body(message), [("Allow", ", ".join(allowed))]
    return 404, oip.error_body(f"no such endpoint: {path[:200]} (see /v2)"), []


def _match(pattern: tuple[str, ...], segments: tuple[str, ...]) -> dict[str, str] | None:
    if len(pattern) != len(segments):
        return None
    parts = {}
    for want, got in zip(pattern, segments, strict=True):
        if want.startswith("{"):
            if not got:
                return None
            parts[want[1:-1]] = got
        elif want != got:
            return None
    return parts


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', "'")


def _address(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername or "?")
