"""The Unix socket server: a thin asyncio adapter over the sans-IO protocol.

Each connection decodes frames and starts every request at once; a handler is either a
coroutine (run as its own task) or returns a future (an inference: queued in its model's
pool, no task at all, which is most of the per-request cost saved). Responses go out in
completion order, each tagged with its id, and reading pauses when a client has too
many requests open. Operations are dispatched from operations.OPERATIONS only.
"""

import asyncio
import contextlib
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moltbotd import __version__
from moltbotd.catalog import Catalog
from moltbotd.config import Config
from moltbotd.logs import LEVELS, Ring, get_logger, parse_level
from moltbotd.operations import OPERATIONS, lookup
from moltbotd.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    FrameDecoder,
    FrameTooLarge,
    MoltError,
    RequestError,
    encode_frame,
    error_response,
    ok_response,
    parse_request,
    request_id,
)
from moltbotd.rollout import Progress, Rollout, no_progress
from moltbotd.scheduler import request_options

log = get_logger("server")


@dataclass(frozen=True)
class Caller:
    """Who sent a request, and how to tell them how it is going."""

    peer: str
    progress: Progress
    uid: int = -1  # SO_PEERCRED's, for bounds per user; -1: not a socket client


Handler = Callable[[dict[str, Any], Caller], Awaitable[Any]]
Emit = Callable[[dict[str, Any]], None]
Answer = tuple[Any, "asyncio.Future[Any]"]  # a request's id, and its outcome to come


class Handover(dict[str, Any]):
    """A result that travels with a socket: the client's end of a direct channel, sent
    with the response frame (SCM_RIGHTS) and closed here once sent."""

    def __init__(self, result: dict[str, Any], sock: socket.socket) -> None:
        super().__init__(result)
        self.sock = sock


class StartError(Exception):
    """The daemon cannot start serving (the socket is taken, ...); the message says why."""


Reloader = Callable[[], Awaitable[dict[str, Any]]]


def make_handlers(
    rollout: Rollout, ring: Ring, config: Config, reload_config: Reloader
) -> dict[str, Handler]:
    """The daemon's half of every operation in OPERATIONS (the server checks it is complete)."""
    supervisor = rollout.sup
    catalog = Catalog(supervisor)

    async def hello(p: dict[str, Any], _: Caller) -> dict[str, Any]:
        wanted = p.get("protocol", PROTOCOL_VERSION)
        log.debug("hello", client=p.get("client", "unnamed"), protocol=wanted)
        if wanted != PROTOCOL_VERSION:
            raise MoltError(
                ErrorCode.UNSUPPORTED_PROTOCOL,
                f"the client speaks protocol {wanted}; moltbotd {__version__} speaks"
                f" {PROTOCOL_VERSION}: use a matching moltctl or client library",
                {"supported": [PROTOCOL_VERSION]},
            )
        return {
            "protocol": PROTOCOL_VERSION,
            "server": f"moltbotd {__version__}",
            "pid": os.getpid(),
            "max_frame_bytes": config.max_frame_bytes,
            "operations": list(OPERATIONS),
        }

    async def health(_: dict[str, Any], __: Caller) -> dict[str, Any]:
        return supervisor.health()

    async def status(p: dict[str, Any], _: Caller) -> dict[str, Any]:
        return {
            "server": f"moltbotd {__version__}",
            "pid": os.getpid(),
            "socket": str(config.socket),
            **supervisor.status(p.get("model")),
        }

    async def models(_: dict[str, Any], __: Caller) -> dict[str, Any]:
        return supervisor.repository()

    def infer(p: dict[str, Any], _: Caller) -> Awaitable[Any]:
        priority, timeout = request_options(p)
        return supervisor.infer(p["model"], p["inputs"], p.get("version"), p.get("outputs"),
                                priority, timeout)  # fmt: skip

    async def channel(p: dict[str, Any], c: Caller) -> "Handover":
        pool, worker = supervisor.channel(p["model"])
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            try:
                worker.attach(theirs, c.uid)
            except BaseException:
                ours.close()
                raise
        log.debug("direct channel", model=pool.spec.model, version=pool.spec.version,
                  pid=worker.pid)  # fmt: skip
        return Handover({"model": pool.spec.model, "version": pool.spec.version,
                         "pid": worker.pid}, ours)  # fmt: skip

    async def scale(p: dict[str, Any], _: Caller) -> dict[str, Any]:
        instances = p["instances"]
        if not 0 <= instances <= 64:
            raise MoltError(ErrorCode.BAD_REQUEST, f"instances must be from 1 to 64, or 0 for"
                            f" autoscaling; got {instances}")  # fmt: skip
        return supervisor.scale(p["model"], instances or None)

    async def switch(p: dict[str, Any], c: Caller) -> dict[str, Any]:
        share = p.get("canary")
        if share is not None and not 0 < share < 1:
            raise MoltError(ErrorCode.BAD_REQUEST, f"canary share must be above 0 and below 1"
                            f" (10% is 0.1), got {share!r}")  # fmt: skip
        return await rollout.switch(p.get("model"), p["version"], p.get("force", False), share,
                                    c.progress)  # fmt: skip

    async def rollback(p: dict[str, Any], c: Caller) -> dict[str, Any]:
        return await rollout.rollback(p.get("model"), c.progress)

    async def promote(p: dict[str, Any], c: Caller) -> dict[str, Any]:
        return await rollout.promote(p.get("model"), c.progress)

    async def versions(p: dict[str, Any], _: Caller) -> dict[str, Any]:
        return await catalog.versions(p.get("model"))

    async def upload(p: dict[str, Any], _: Caller) -> dict[str, Any]:
        return supervisor.uploads.write(p.get("upload"), p["path"], p["offset"], p["data"])

    async def deploy(p: dict[str, Any], c: Caller) -> dict[str, Any]:
        return await rollout.deploy(p["upload"], p["model"], p["version"], p["files"],
                                    p.get("activate", False), p.get("force", False),
                                    p.get("source", ""), c.peer, c.progress)  # fmt: skip

    async def reload(_: dict[str, Any], __: Caller) -> dict[str, Any]:
        return await reload_config()

    async def logs(p: dict[str, Any], _: Caller) -> dict[str, Any]:
        try:
            low = parse_level(p.get("min_level", LEVELS[0]))
            high = parse_level(p.get("max_level", LEVELS[-1]))
        except ValueError as exc:
            raise MoltError(ErrorCode.BAD_REQUEST, str(exc)) from None
        entries = ring.query(
            low,
            high,
            p.get("since"),
            p.get("until"),
            p.get("model"),
            p.get("contains"),
            p.get("after", 0),
            p.get("limit"),
        )
        return {"entries": [e.to_wire() for e in entries], "last_seq": ring.seq}

    return {
        "hello": hello,
        "health": health,
        "status": status,
        "models": models,
        "infer": infer,
        "channel": channel,
        "scale": scale,
        "switch": switch,
        "rollback": rollback,
        "promote": promote,
        "versions": versions,
        "upload": upload,
        "deploy": deploy,
        "reload": reload,
        "logs": logs,
    }


class Server:
    def __init__(
        self, config: Config, rollout: Rollout, ring: Ring, reload_config: Reloader
    ) -> None:
        self.config = config
        self.handlers = make_handlers(rollout, ring, config, reload_config)
        if self.handlers.keys() != OPERATIONS.keys():
            raise RuntimeError(
                f"handlers {sorted(self.handlers)} != operations {sorted(OPERATIONS)}"
            )
        self.connections: set[Connection] = set()
        self.accepting = True
        self._server: asyncio.Server | None = None
        self._idle = asyncio.Event()

    async def listen(self) -> None:
        path = self.config.socket
        _claim_socket_path(path)
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: Connection(self), path=str(path)
        )
        os.chmod(path, self.config.socket_mode)
        log.info(f"listening on {path}", socket=str(path))

    def begin(self, message: dict[str, Any], peer: str = "", emit: Emit | None = None,
              uid: int = -1) -> Answer:  # fmt: skip
        """Start one request; the future gives its response (and progress frames go
        through emit, when the request asks for them). Never raises."""
        req_id = request_id(message)
        try:
            request = parse_request(message)
            op = lookup(request.op)
            if not self.accepting:
                raise MoltError(
                    ErrorCode.SHUTTING_DOWN, "moltbotd is shutting down; retry once it is back"
                )
            params = op.check_params(request.params)
            if op.mutating:  # an audit trail: who changed what, when
                log.info(f"{op.name} requested", op=op.name, peer=peer, **params)
            caller = self._caller(request.id, params, peer, emit, uid)
            outcome = asyncio.ensure_future(self.handlers[op.name](params, caller))
        except Exception as exc:
            outcome = asyncio.get_running_loop().create_future()
            outcome.set_exception(exc)
        return req_id, outcome

    @staticmethod
    def respond(answer: Answer) -> dict[str, Any]:
        """The response for a finished request; an unexpected exception is logged."""
        req_id, outcome = answer
        try:
            return ok_response(req_id, outcome.result())
        except RequestError as exc:
            return error_response(exc.req_id, exc)
        except MoltError as exc:
            return error_response(req_id, exc)
        except Exception:
            log.exception("internal error while handling a request")
            error = MoltError(
                ErrorCode.INTERNAL, "internal error in moltbotd; the daemon log has the details"
            )
            return error_response(req_id, error)

    @staticmethod
    def _caller(req_id: Any, params: dict[str, Any], peer: str, emit: Emit | None,
                uid: int) -> Caller:  # fmt: skip
        if not (params.get("progress") and emit):
            return Caller(peer, no_progress, uid)

        def progress(phase: str, detail: str) -> None:
            emit({"id": req_id, "progress": {"phase": phase, "detail": detail}})

        return Caller(peer, progress, uid)

    def request_done(self) -> None:
        if not any(c.pending for c in self.connections):
            self._idle.set()

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let requests in flight finish (up to timeout), close everything."""
        self.accepting = False
        if self._server:
            self._server.close()
        if any(c.pending for c in self.connections):
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        unfinished = sum(c.pending for c in self.connections)
        if unfinished:
            log.warning(f"{unfinished} requests still running after {timeout:g}s; closing anyway")
        for connection in list(self.connections):
            connection.close()
        with contextlib.suppress(FileNotFoundError):
            self.config.socket.unlink()


def _claim_socket_path(path: Path) -> None:
    """Remove a stale socket left by a dead daemon; refuse if a live one answers there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartError(f"{path} exists and is not a socket; remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()  # nobody listens: a stale socket
        return
    except OSError as exc:
        raise StartError(f"cannot check whether {path} is in use: {exc.strerror}") from None
    finally:
        probe.close()
    raise StartError(f"another moltbotd is already serving at {path}")


def _peer(sock: socket.socket | None) -> tuple[str, int]:
    """pid and uid of the client process, from the kernel (SO_PEERCRED); and the uid."""
    if sock is None:
        return "unknown", -1
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return f"pid {pid} uid {uid}", uid


class Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.decoder = FrameDecoder(server.config.max_frame_bytes)
        self.pending = 0
        self.paused = False
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer = "unknown"
        self.uid = -1
        self.half_closed = False
        self.unsent: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.peer, self.uid = _peer(transport.get_extra_info("socket"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)

    def eof_received(self) -> bool:
        """A client that half-closes after its requests still gets every answer."""
        self.half_closed = True
        return bool(self.pending)  # True keeps the transport open until they are written

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except FrameTooLarge as exc:
            log.warning(
                "closing a connection that sent a frame over the limit", size=exc.details["size"]
            )
            self._write(error_response(None, exc))
            self.close()
            return
        for message in messages:
            if isinstance(message, MoltError):
                self._write(error_response(None, message))
            else:
                self._start(message)

    def _start(self, message: dict[str, Any]) -> None:
        self.pending += 1
        answer = self.server.begin(message, self.peer, self._write, self.uid)
        answer[1].add_done_callback(lambda _: self._finished(answer))
        if self.pending >= self.server.config.max_inflight_per_connection and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _finished(self, answer: Answer) -> None:
        self.pending -= 1
        self._write(self.server.respond(answer))
        if self.paused and not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()
        if not self.pending:
            self.server.request_done()
            if self.half_closed:
                self.close()

    def _write(self, response: dict[str, Any]) -> None:
        if self.transport.is_closing():
            return
        try:
            frame = encode_frame(response)
        except (TypeError, ValueError, OverflowError):  # a result msgpack cannot carry: a bug
            log.exception("cannot encode a response", id=response.get("id"))
            error = MoltError(ErrorCode.INTERNAL, "moltbotd could not encode its answer")
            frame = encode_frame(error_response(response.get("id"), error))
        if isinstance(response.get("result"), Handover):
            self._hand_over(frame, response)
            return
        if not self.pending and not self.unsent:  # the only answer due: no reason to wait
            self.transport.write(frame)
            return
        if not self.unsent:  # responses finished in one turn of the loop go in one write
            asyncio.get_running_loop().call_soon(self._flush)
        self.unsent.append(frame)

    def _hand_over(self, frame: bytes, response: dict[str, Any]) -> None:
        """Send the frame with the socket attached, after every answer written before it
        (the descriptor rides on the frame's first byte, so the bytes must be in order)."""
        with response["result"].sock as channel:
            self._flush()
            if not self.transport.get_write_buffer_size():
                ours = os.dup(self.transport.get_extra_info("socket").fileno())
                with contextlib.suppress(BlockingIOError), socket.socket(fileno=ours) as sock:
                    sent = socket.send_fds(sock, [frame], [channel.fileno()])
                    if sent < len(frame):
                        self.transport.write(frame[sent:])
                    return
        error = MoltError(ErrorCode.CONFLICT, "this connection's earlier answers are not read"
                          " yet; ask for the channel again")  # fmt: skip
        self.transport.write(encode_frame(error_response(response.get("id"), error)))

    def close(self) -> None:
        """Close once what is written went out."""
        self._flush()
        self.transport.close()

    def _flush(self) -> None:
        frames, self.unsent = self.unsent, []
        if not self.transport.is_closing():
            self.transport.write(b"".join(frames))
