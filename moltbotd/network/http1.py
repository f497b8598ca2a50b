"""HTTP/1.1 for the OIP listener without I/O: bytes in, requests out, answers as bytes.

llhttp (Node's parser, through httptools) parses: it rejects what request smuggling
needs (two Content-Lengths, a bad chunk size, data after `Connection: close`) and costs a
few microseconds a request, where h11's pure Python cost 60 here, a fifth of a request's
CPU in moltbotd. What a client controls is bounded here: a head over `max_head` bytes is
refused (431), a body over `max_body` (413) from its Content-Length before it arrives,
else as it grows; the connection then ends, as after any malformed request (400).
"""

from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools


@dataclass
class Request:
    """One request: its head as it came, its body once it is all in."""

    method: str
    target: str
    headers: dict[str, str]  # names lower-cased; a repeated field's values joined by ", "
    keep_alive: bool  # HTTP/1.1 without `Connection: close`, or 1.0 with keep-alive
    expects_continue: bool  # `Expect: 100-continue`: the client waits to send the body
    parts: list[bytes] = field(default_factory=list)
    complete: bool = False

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)


@dataclass(frozen=True)
class Refused:
    """A request answered with this status and message, then the connection ends."""

    status: int
    message: str


class ServerConnection:
    """The requests one connection sends (pipelined ones in order), and its answers."""

    def __init__(self, max_head: int, max_body: int) -> None:
        self.max_head = max_head
        self.max_body = max_body
        self.requests: deque[Request] = deque()  # heads in, oldest first
        self._parser = httptools.HttpRequestParser(self)
        self._url: list[bytes] = []
        self._fields: list[tuple[bytes, bytes]] = []
        self._in_head = False
        self._head_fed = 0  # bytes fed while a head was incomplete
        self._size = 0  # of the body arriving
        self.refusal: Refused | None = None  # then the connection ends
        self._continued: Request | None = None  # the request told 100 Continue
        self._upgraded = False  # an Upgrade or CONNECT: nothing after it is parsed

    def feed(self, data: bytes) -> None:
        """Parse what arrived. A request that must not be served becomes `refusal`, to be
        answered once the requests before it are; nothing after it is parsed."""
        if self.refusal is not None or self._upgraded:
            return
        if self._in_head:
            self._head_fed += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # A server may ignore Upgrade: the request is answered as plain HTTP, and the
            # connection ends after it, since what the client sends next is not HTTP. (A
            # refused upgrade was never queued: the refusal ends the connection.)
            self._upgraded = True
            if self.refusal is None and self.requests:
                self.requests[-1].keep_alive = False
        except httptools.HttpParserError as exc:
            self._refuse(400, f"bad HTTP request: {exc}")
        if self._in_head and self._head_fed > self.max_head:
            self._refuse_head()

    def next_request(self) -> Request | None:
        """The oldest request whose head is in, if any."""
        return self.requests[0] if self.requests else None

    def done(self) -> None:
        """The oldest request is answered."""
        self.requests.popleft()

    @property
    def partial(self) -> bool:
        """A request has begun to arrive and is not all in."""
        return self._in_head or bool(self.requests and not self.requests[-1].complete)

    def ended(self) -> Refused | None:
        """The client closed its side: the refusal owed to a request it left half sent."""
        if not self.partial:
            return None
        return Refused(400, "bad HTTP request: the client closed it before it was all in")

    def interim(self) -> bytes:
        """100 Continue, once, when the oldest request's client waits for it to send the
        body; else nothing."""
        request = self.next_request()
        if request is None or request.complete or not request.expects_continue:
            return b""
        if request is self._continued:
            return b""
        self._continued = request
        return CONTINUE

    # --- httptools' callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head, self._head_fed, self._size = True, 0, 0
        self._url, self._fields = [], []

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        target = b"".join(self._url)
        size = len(target) + sum(len(k) + len(v) + 4 for k, v in self._fields)
        if size > self.max_head:
            self._refuse_head()
            return
        headers: dict[str, str] = {}
        for name, value in self._fields:
            key, text = name.decode("latin-1").lower(), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        length = headers.get("content-length")
        if length is not None and int(length) > self.max_body:  # llhttp checked the digits
            self._refuse(413, too_large(int(length), self.max_body))
            return
        self.requests.append(Request(
            self._parser.get_method().decode("latin-1"), target.decode("latin-1"), headers,
            self._parser.should_keep_alive(),
            headers.get("expect", "").lower() == "100-continue"))  # fmt: skip

    def on_body(self, chunk: bytes) -> None:
        if self.refusal is not None:
            return
        self._size += len(chunk)
        if self._size > self.max_body:
            self._refuse(413, too_large(None, self.max_body))
            return
        self.requests[-1].parts.append(chunk)

    def on_message_complete(self) -> None:
        if self.refusal is None:
            self.requests[-1].complete = True

    def _refuse(self, status: int, message: str) -> None:
        if self.refusal is None:
            self.refusal = Refused(status, message)

    def _refuse_head(self) -> None:
        self._refuse(431, f"the request head is over {self.max_head} bytes")


def too_large(size: int | None, limit: int) -> str:
    told = f"of {size} bytes" if size is not None else "longer than that"
    return f"a request body {told} is over the limit of {limit} bytes (max_frame_bytes)"


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def response(status: int, headers: list[tuple[str, str]], body: bytes, close: bool,
             head: bool = False) -> bytes:  # fmt: skip
    """A whole answer: status line, fields, Content-Length (the body's, also for a HEAD
    request, which gets no body), `Connection: close` when the connection ends after it."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines += [f"{name}: {_field(value)}" for name, value in headers]
    lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    wire = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    return wire if head else wire + body


def _field(value: str) -> str:
    """A field value that cannot end the field early (a message may quote the client)."""
    return value.replace("\r", " ").replace("\n", " ")
