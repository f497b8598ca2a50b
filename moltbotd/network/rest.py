"""The Open Inference Protocol over HTTP/1.1 (h11 parses; wire/oip.py translates),
with TLS when configured and JWT bearer tokens when keys are.

Everything a client controls is bounded: the connections (then 503), the request head
(then 431), the body (max_frame_bytes, then 413, refused from Content-Length before it
is read), and the time a request may take to arrive. Health endpoints need no token, so
that a load balancer's checks need none either.
"""

import asyncio
import contextlib
import json
import socket
import ssl
import urllib.parse
from http import HTTPStatus
from typing import Any

import h11

from moltbotd import __version__
from moltbotd.config import NetworkSettings
from moltbotd.logs import get_logger
from moltbotd.network.gateway import Gateway, NetPeer, call, health, ready_or_not
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

    def __init__(self, request: h11.Request, body: bytes, connection: "Connection",
                 parts: dict[str, str]) -> None:  # fmt: skip
        self.headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
        self.body = body
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
        refusal = _raw_refusal(503, "too many connections; retry later")
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
        with contextlib.suppress(h11.ProtocolError):
            await Connection(self, reader, writer, peer).run()


class Connection:
    """One HTTP connection: requests one after another (keep-alive), each answered."""

    def __init__(self, listener: HttpListener, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, peer: NetPeer) -> None:  # fmt: skip
        self.listener = listener
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.refused: set[str] = set()  # operations refused here (audited once each)

    async def run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.listener.settings.idle_timeout):
                    event = await self._event()
            except h11.RemoteProtocolError as exc:
                await self._refuse_broken(exc)
                return
            if not isinstance(event, h11.Request):
                return  # the client closed, or idled past the timeout
            if _head_bytes(event) > MAX_HEAD_BYTES:  # h11 bounds only a head still arriving
                message = f"the request head is over {MAX_HEAD_BYTES} bytes"
                await self._reply(431, oip.error_body(message), [], close=True)
                return
            if not await self._exchange(event):
                return
            if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                return
            self.h11.start_next_cycle()

    async def _event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.h11.they_are_waiting_for_100_continue:
                await self._send(h11.InformationalResponse(status_code=100, headers=[]))
            self.h11.receive_data(await self.reader.read(READ_BYTES))

    async def _exchange(self, request: h11.Request) -> bool:
        """Read the body, answer; False when the connection must end."""
        length = _content_length(request)
        limit = self.listener.max_body
        if length is not None and length > limit:
            await self._reply(413, oip.error_body(_too_large(length, limit)), [], close=True)
            return False
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                body = await self._body(limit)
        except h11.RemoteProtocolError as exc:
            await self._refuse_broken(exc)
            return False
        if body is None:
            await self._reply(413, oip.error_body(_too_large(None, limit)), [], close=True)
            return False
        listener = self.listener
        listener.busy += 1
        listener.idle.clear()
        try:
            status, payload, headers = await self._answer(request, body)
        finally:
            listener.busy -= 1
            if not listener.busy:
                listener.idle.set()
        head = request.method == b"HEAD"
        await self._reply(status, payload, headers, close=listener.closing, head=head)
        return not listener.closing

    async def _body(self, limit: int) -> bytes | None:
        parts, size = [], 0
        while True:
            event = await self._event()
            if isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    return None
                parts.append(event.data)
            elif event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("the body ended early")

    async def _answer(self, request: h11.Request, body: bytes) -> Reply:
        method = request.method.decode()
        path = urllib.parse.unquote(request.target.decode("latin-1").split("?", 1)[0])
        found = route(method, path)
        if isinstance(found, tuple) and isinstance(found[0], int):
            return found  # type: ignore[return-value]
        handler, parts = found  # type: ignore[misc]
        exchange = Exchange(request, body, self, parts)
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
                     close: bool = False, head: bool = False) -> None:  # fmt: skip
        fields = [("Content-Type", JSON), ("Content-Length", str(len(body))), *headers]
        if close:
            fields.append(("Connection", "close"))
        reason = HTTPStatus(status).phrase.encode()
        events = [h11.Response(status_code=status, headers=fields, reason=reason)]
        if body and not head:
            events.append(h11.Data(data=body))
        await self._send(*events, h11.EndOfMessage())

    async def _send(self, *events: Any) -> None:
        """One write for a whole answer: a head sent alone would cost a syscall and wake
        the client for half an answer."""
        data = b"".join(self.h11.send(event) or b"" for event in events)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _refuse_broken(self, exc: h11.RemoteProtocolError) -> None:
        """Answer a request h11 could not parse, if the connection still allows it."""
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status = exc.error_status_hint
            with contextlib.suppress(h11.LocalProtocolError):
                await self._reply(status, oip.error_body(f"bad HTTP request: {exc}"), [], True)


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


def _head_bytes(request: h11.Request) -> int:
    return len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)


def _content_length(request: h11.Request) -> int | None:
    for key, value in request.headers:
        if key == b"content-length":
            return int(value)  # h11 checked it is a number
    return None


def _too_large(size: int | None, limit: int) -> str:
    told = f"of {size} bytes" if size is not None else "longer than that"
    return f"a request body {told} is over the limit of {limit} bytes (max_frame_bytes)"


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', "'")


def _address(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername or "?")


def _raw_refusal(status: int, message: str) -> bytes:
    """A response written before h11 has a request to answer."""
    body = oip.error_body(message)
    reason = {503: "Service Unavailable"}[status]
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {JSON}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
    return head.encode() + body
