"""The Python client for moltbotd, for local scripts and for moltctl.

    from moltctl.client import Client
    with Client() as c:                       # --socket, $MOLTBOT_SOCKET, /run/moltbot/...
        out = c.infer("demo", {"x": np.ones((1, 4), np.float32)})
        out["y"], out.version

Client sends a model's requests on a direct channel to its worker whenever moltbotd
grants one (one socket hop instead of two), and through moltbotd's socket otherwise,
without the caller noticing: moltbotd decides who gets a channel, and sends its clients
back when a switch or a canary needs their requests to pass through it. Both paths
schedule alike (one queue per worker) and answer alike; direct=False keeps to the socket.
AsyncClient has the same methods as coroutines and pipelines: many tasks may await
calls on one connection at once, and responses are matched to them by id; its tasks'
requests are pipelined on a direct channel the same way.
"""

import asyncio
import contextlib
import itertools
import mmap
import os
import select
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from moltbotd.wire.operations import lookup
from moltbotd.wire.protocol import (
    PROTOCOL_VERSION,
    RECV_BYTES,
    ErrorCode,
    FrameDecoder,
    MoltError,
    decode_value,
    encode_frame,
    encode_tensor,
    error_response,
    request,
    response_result,
    traced,
)
from moltbotd.wire.region import HEADER_BYTES, area, put, running

DEFAULT_SOCKET = Path("/run/moltbot/moltbotd.sock")
# Responses may be large (outputs); the daemon's own limit applies to requests.
MAX_RESPONSE_BYTES = 1 << 30
CHANNEL_RETRY = 5.0  # seconds before asking again for a channel moltbotd refused
CHANNEL_SETUP = 5.0  # seconds a worker may take to open a channel (it may be running)
# The worker answers every request at its deadline, queued or running; a client on a
# direct channel stops waiting on its own only this long after it (a stopped worker).
DEADLINE_GRACE = 1.0
SOCKET_BUFFER = 4 << 20  # a large tensor goes to the worker in one write


class ConnectError(Exception):
    """moltbotd cannot be reached; the message says what to do about it."""


class ProtocolError(Exception):
    """The daemon's answer could not be read (the connection dropped, a bad frame)."""


class Outputs(dict[str, Any]):
    """A model's outputs by name (numpy arrays, or lists/dicts for non-tensor outputs)."""

    def __init__(self, model: str, version: str, outputs: dict[str, Any],
                 fallback_for: str | None = None, request_id: str | None = None,
                 fallback_reason: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(outputs)
        self.model = model  # the model that answered: the fallback, when fallback_for is set
        self.version = version
        self.fallback_for = fallback_for  # the model asked for, when its fallback answered
        # why that model did not: {"code": "BUDGET_EXCEEDED", "message": ...}
        self.fallback_reason = fallback_reason
        self.request_id = request_id  # the caller's, as the answer carried it back


def resolve_socket(explicit: str | os.PathLike[str] | None = None) -> Path:
    return Path(explicit or os.environ.get("MOLTBOT_SOCKET") or DEFAULT_SOCKET)


def connect_error(path: Path, exc: OSError) -> ConnectError:
    if isinstance(exc, PermissionError):
        return ConnectError(
            f"permission denied on {path}: its socket_mode lets only root and moltbotd's group"
            " connect (add yourself with: sudo adduser $USER moltbot, then log in again)"
        )
    hint = "start it with: systemctl start moltbotd"
    if path != DEFAULT_SOCKET:
        hint += ", or point --socket / MOLTBOT_SOCKET at the daemon's socket"
    return ConnectError(f"moltbotd is not running at {path} ({hint})")


def _deadline_passed(label: str, params: dict[str, Any]) -> MoltError:
    """The error for a direct request whose worker did not answer by its deadline (and a
    grace): as the worker would have said it, naming the request if the caller did."""
    timeout = params["timeout_ms"]
    why = f"deadline exceeded: {label} did not answer within {timeout:g}ms"
    return traced(MoltError(ErrorCode.DEADLINE_EXCEEDED, why, {"waited_ms": timeout}),
                  params.get("request_id"))  # fmt: skip


def encode_inputs(inputs: Mapping[str, Any], view: bool = False) -> dict[str, Any]:
    """view: large arrays as views of their memory, for a caller that packs them before
    anyone can change them (the blocking Client)."""
    return {n: encode_tensor(v, view) if isinstance(v, np.ndarray) else v
            for n, v in inputs.items()}  # fmt: skip


def decode_outputs(result: dict[str, Any]) -> Outputs:
    outputs = {name: decode_value(v) for name, v in result["outputs"].items()}
    return Outputs(result["model"], result["version"], outputs, result.get("fallback_for"),
                   result.get("request_id"), result.get("fallback_reason"))  # fmt: skip


def _same(result: Any) -> Any:
    return result


def _text(result: Any) -> Any:
    return result["text"]


def _ended_error(result: Any) -> MoltError:
    return MoltError.from_wire(result.get("error") if isinstance(result, dict) else None)


OnProgress = Callable[[dict[str, Any]], None]  # {"phase": ..., "detail": ...}


class _Calls:
    """Each operation once; _call returns a value (Client) or a coroutine (AsyncClient).

    Calls taking on_progress ask the daemon for progress frames and hand each to it.
    """

    views = False  # whether a call packs its inputs before it returns (encode_inputs)

    def _call(self, op: str, params: dict[str, Any], decode: Callable[[Any], Any] = _same,
              on_progress: OnProgress | None = None) -> Any:  # fmt: skip
        raise NotImplementedError

    def hello(self, client: str = "moltbot-client") -> Any:
        return self._call("hello", {"protocol": PROTOCOL_VERSION, "client": client})

    def health(self) -> Any:
        return self._call("health", {})

    def status(self, model: str | None = None) -> Any:
        return self._call("status", {"model": model})

    def models(self) -> Any:
        return self._call("models", {})

    def metadata(self, model: str, version: str | None = None) -> Any:
        return self._call("metadata", {"model": model, "version": version})

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        version: str | None = None,
        outputs: list[str] | None = None,
        priority: str | None = None,
        timeout_ms: float | None = None,
        request_id: str | None = None,
        session: str | None = None,
        cache: bool | None = None,
    ) -> Any:
        """priority: high, normal or low; timeout_ms: a deadline, after which the daemon
        answers DEADLINE_EXCEEDED (a request still queued then is never run); request_id:
        the caller's id, back in the answer (Outputs.request_id) and in moltbotd's log of
        a slow request; session: a stateful model's conversation, whose state moltbotd
        keeps from one request to the next (docs/sessions.md); cache: False runs the
        model even where its result cache has the answer."""
        params = {
            "model": model,
            "inputs": encode_inputs(inputs, self.views),
            "version": version,
            "outputs": outputs,
            "priority": priority,
            "timeout_ms": timeout_ms,
            "request_id": request_id,
            "session": session,
            "cache": cache,
        }
        return self._call("infer", params, decode_outputs)

    def budgets(self, model: str | None = None) -> Any:
        """What each caller spent of each model's cost_limit this period, and what remains."""
        return self._call("budgets", {"model": model})

    def sessions(self, model: str, limit: int | None = None) -> Any:
        """A stateful model's sessions: counts, bytes, and the least idle ones."""
        return self._call("sessions", {"model": model, "limit": limit})

    def end_session(self, model: str, session: str) -> Any:
        return self._call("end_session", {"model": model, "session": session})

    def reset_session(self, model: str, session: str) -> Any:
        return self._call("reset_session", {"model": model, "session": session})

    def channel_ended(self, model: str, pid: int) -> Any:
        """The MoltError moltbotd's socket gave for the death of worker `pid`."""
        return self._call("channel_ended", {"model": model, "pid": pid}, _ended_error)

    def scale(self, model: str, instances: int | None) -> Any:
        """Worker processes for MODEL's active version; None gives it back to autoscaling."""
        return self._call("scale", {"model": model, "instances": instances or 0})

    def switch(self, version: str, model: str | None = None, force: bool = False,
               canary: float | None = None,
               on_progress: OnProgress | None = None) -> Any:  # fmt: skip
        params = {"model": model, "version": version, "force": force or None, "canary": canary}
        return self._call("switch", params, on_progress=on_progress)

    def rollback(self, model: str | None = None, on_progress: OnProgress | None = None) -> Any:
        return self._call("rollback", {"model": model}, on_progress=on_progress)

    def promote(self, model: str | None = None, on_progress: OnProgress | None = None) -> Any:
        return self._call("promote", {"model": model}, on_progress=on_progress)

    def versions(self, model: str | None = None) -> Any:
        return self._call("versions", {"model": model})

    def upload(self, path: str, offset: int, data: bytes, upload: str | None = None,
               total: int | None = None) -> Any:  # fmt: skip
        """One chunk; the first (no upload token) opens the upload, announcing `total`."""
        return self._call("upload", {"upload": upload, "path": path, "offset": offset,
                                     "data": data, "total": total})  # fmt: skip

    def deploy(self, upload: str, model: str, version: str, files: dict[str, str],
               activate: bool = False, force: bool = False, source: str | None = None,
               on_progress: OnProgress | None = None) -> Any:  # fmt: skip
        params = {"upload": upload, "model": model, "version": version, "files": files,
                  "activate": activate or None, "force": force or None,
                  "source": source}  # fmt: skip
        return self._call("deploy", params, on_progress=on_progress)

    def convert(self, model: str, method: str, on_progress: OnProgress | None = None,
                **options: Any) -> Any:  # fmt: skip
        """A new version of MODEL made by `method` (int8-dynamic, int8-static, fp16,
        optimize), published if it passes the accuracy gate. Options as the operation
        names them: version, to, data (an upload of calibration/ and eval/ files),
        per_channel, exclude, level, min_top1, max_error, force, activate, canary."""
        params = {"model": model, "method": method, **options}
        return self._call("convert", params, on_progress=on_progress)

    def reload(self) -> Any:
        return self._call("reload", {})

    def logs(self, **filters: Any) -> Any:
        return self._call("logs", filters)

    def audit(self, **filters: Any) -> Any:
        """Audit records: since, until (UNIX times), op, limit."""
        return self._call("audit", filters)

    def metrics(self) -> Any:
        """The Prometheus exposition text."""
        return self._call("metrics", {}, _text)


def _message(op: str, req_id: int, params: dict[str, Any], progress: bool = False) -> bytes:
    """Check the call against the operation table before it leaves, then frame it."""
    given = {k: v for k, v in params.items() if v is not None}
    if progress:
        given["progress"] = True
    lookup(op).check_params(given)
    return encode_frame(request(req_id, op, given))


class Receiver:
    """Frames from a blocking socket, one at a time; optionally polled before sleeping."""

    def __init__(self, sock: socket.socket, busy_poll: float = 0.0) -> None:
        self.sock = sock
        self.busy_poll = busy_poll
        self.decoder = FrameDecoder(MAX_RESPONSE_BYTES)
        self.received: list[dict[str, Any] | MoltError] = []
        self.fds: list[int] = []  # descriptors that came with the frames (SCM_RIGHTS)
        self.deadline: float | None = None  # for a socket in blocking mode: TimeoutError after

    def receive(self, peer: str, fds: bool = False) -> dict[str, Any]:
        while not self.received:
            data = self._read(fds)
            if not data:
                raise ProtocolError(f"{peer} closed the connection before answering")
            self.received.extend(self.decoder.feed(data))
        message = self.received.pop(0)
        if isinstance(message, MoltError):
            raise ProtocolError(f"unreadable answer from {peer}: {message.message}")
        return message

    def _read(self, fds: bool) -> bytes:
        until = time.monotonic() + (0.0 if fds else self.busy_poll)
        while time.monotonic() < until:  # a sleeping CPU wakes slowly: spin a little first
            with contextlib.suppress(BlockingIOError):
                return self.sock.recv(RECV_BYTES, socket.MSG_DONTWAIT)
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError
        if not fds:
            return self.sock.recv(RECV_BYTES)
        data, got, _, _ = socket.recv_fds(self.sock, RECV_BYTES, 1)
        self.fds += got
        return data

    def ready(self) -> bool:
        """Whether a frame (or EOF) waits, without waiting for one."""
        if self.received:
            return True
        try:
            data = self.sock.recv(RECV_BYTES, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        self.received.extend(self.decoder.feed(data) if data else [])
        return True


class DirectChannel:
    """A direct channel to the worker serving one model's active version."""

    def __init__(self, sock: socket.socket, info: dict[str, Any], busy_poll: float,
                 wait: float) -> None:  # fmt: skip
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        self.sock = sock
        self.label = f"the worker serving model {info['model']} {info['version']}"
        self.model, self.pid = info["model"], info.get("pid")
        self.receiver = Receiver(sock, busy_poll)
        self.closing = False  # the worker asked us to go elsewhere
        self.region = self._map_region(wait)

    def _map_region(self, wait: float) -> mmap.mmap | None:
        """The worker's first frame offers a shared region for large inputs (a memfd);
        a worker busy running for longer than `wait` seconds raises TimeoutError."""
        self.receiver.deadline = time.monotonic() + wait
        offer = self.receiver.receive(self.label, fds=True)
        if "region" not in offer:  # refused: past the worker's bounds on channels
            why = MoltError.from_wire(offer.get("error")).message
            raise ProtocolError(f"{self.label} refused the channel: {why}")
        size = offer.get("region")
        if not self.receiver.fds:
            return None
        fd = self.receiver.fds.pop()
        try:
            return mmap.mmap(fd, size) if isinstance(size, int) and size > 0 else None
        finally:
            os.close(fd)

    def share(self, params: dict[str, Any]) -> dict[str, Any]:
        """The infer parameters with each large input copied into the region and sent as
        {"shm": [offset, size]}, and the large outputs asked back the same way
        (wire/region.py). Safe to reuse at every call: the worker copies the inputs out
        when the request arrives, and the Client reads each answer before its next call."""
        if self.region is None:
            return params
        end = len(self.region)
        inputs = put(self.region, params["inputs"], HEADER_BYTES, end)
        return {**params, "inputs": inputs, "reply_shm": [HEADER_BYTES, end - HEADER_BYTES]}

    def take(self, reply: dict[str, Any]) -> dict[str, Any]:
        """The answer with each output the worker put into the region copied out of it."""
        result = reply.get("result")
        outputs = result.get("outputs") if isinstance(result, dict) else None
        if self.region is None or not isinstance(outputs, dict):
            return reply
        taken = {name: self._copy(name, tensor) if isinstance(tensor, dict) and "shm" in tensor
                 else tensor for name, tensor in outputs.items()}  # fmt: skip
        return {**reply, "result": {**result, "outputs": taken}}

    def _copy(self, name: str, tensor: dict[str, Any]) -> dict[str, Any]:
        assert self.region is not None
        where = area(tensor["shm"], len(self.region))
        if where is None:
            raise ProtocolError(f"{self.label} answered output {name!r} at {tensor['shm']!r},"
                                " outside its shared region")  # fmt: skip
        rest = {key: value for key, value in tensor.items() if key != "shm"}
        return {**rest, "data": self.region[where[0] : where[1]]}

    def call(self, frame: bytes, req_id: int, timeout: float | None) -> dict[str, Any]:
        self.receiver.deadline = None if timeout is None else time.monotonic() + timeout
        self.sock.sendall(frame)
        while True:
            reply = self.receiver.receive(self.label)
            if "closing" in reply:
                self.closing = True
            elif reply.get("id") in (req_id, None):
                return reply

    def never_ran(self, req_id: int) -> bool:
        """After the channel ended unanswered: whether the worker's table says request
        `req_id` was not running (it may go to moltbotd's socket instead)."""
        names = running(self.region) if self.region is not None else None
        return names is not None and req_id not in names

    def usable(self) -> bool:
        """Not asked to close (a notice read now, before a request is sent, counts)."""
        while not self.closing and self.receiver.ready():
            if not self.receiver.received:  # EOF: the worker is gone
                return False
            notice = self.receiver.received.pop(0)  # a late answer, or a notice
            self.closing = isinstance(notice, dict) and "closing" in notice
        return not self.closing

    def close(self) -> None:
        self.sock.close()
        if self.region is not None:
            self.region.close()

    release = close  # the blocking Client has nothing in flight when it lets one go


def _known_channel(channels: dict[str, Any], params: dict[str, Any],
                   direct: bool) -> tuple[Any, bool]:  # fmt: skip
    """(the model's usable direct channel or None, whether to ask for one now). A pinned
    version, or a client without direct, uses the socket; a channel the worker asked to
    close is let go (`release`) and a new one may be asked for at once (a switch); a
    refused one is asked again once its time (a float) has come."""
    model = params["model"]
    if not direct or params.get("version"):
        return None, False
    known = channels.get(model)
    if known is not None and not isinstance(known, float):
        if known.usable():
            return known, False
        known.release()
        known = channels[model] = 0.0  # moved on: the new version may grant one at once
    return None, known is None or time.monotonic() >= known


def _grant(path: Path, model: str) -> DirectChannel:
    """A channel opened by a blocking client of its own, for AsyncClient; of the region,
    only the worker's table of running requests is read (inputs travel in the frames)."""
    with Client(path) as client:
        channel = client.grant(model)
    channel.sock.setblocking(False)
    return channel


class Client(_Calls):
    """Blocking client: one request at a time on one connection; per model, on a direct
    channel when moltbotd grants one (direct=False: always through moltbotd's socket).

    busy_poll_us: after sending on a direct channel, poll for the answer this long
    before sleeping: lower latency for a CPU busy meanwhile. strict_direct (moltctl
    infer --direct): a refused channel is an error, not a reason to use the socket."""

    views = True

    def __init__(self, socket_path: str | os.PathLike[str] | None = None,
                 timeout: float | None = None, direct: bool = True,
                 busy_poll_us: int = 0) -> None:  # fmt: skip
        self.path = resolve_socket(socket_path)
        self.timeout = timeout
        self.direct = direct
        self.busy_poll = busy_poll_us / 1e6
        self.strict_direct = False
        self._sock: socket.socket | None = None
        self._receiver: Receiver | None = None
        self._ids = itertools.count(1)
        self._channels: dict[str, DirectChannel | float] = {}  # model -> channel, or when to ask

    def connect(self) -> "Client":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise connect_error(self.path, exc) from None
        self._sock = sock
        self._receiver = Receiver(sock)
        return self

    def close(self) -> None:
        if self._sock:
            self._sock.close()
            self._sock = None
        for channel in self._channels.values():
            if isinstance(channel, DirectChannel):
                channel.close()
        self._channels.clear()

    def __enter__(self) -> "Client":
        return self.connect()

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, op: str, params: dict[str, Any], decode: Callable[[Any], Any] = _same,
              on_progress: OnProgress | None = None) -> Any:  # fmt: skip
        req_id = next(self._ids)
        channel = self._channel(params) if op == "infer" else None
        if channel:
            message = _message(op, req_id, channel.share(params))
            reply = self._call_direct(channel, message, req_id, params)
            if reply is not None:
                return decode(response_result(reply))
            req_id = next(self._ids)  # it never ran there: moltbotd's socket serves it
        message = _message(op, req_id, params, on_progress is not None)
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        assert self._receiver is not None
        try:
            self._sock.sendall(message)
            reply = self._receiver.receive("moltbotd", fds=op == "channel")
            while "progress" in reply and on_progress:
                on_progress(reply["progress"])
                reply = self._receiver.receive("moltbotd")
        except TimeoutError:
            self.close()  # a late answer would be taken for the next call's
            raise ProtocolError(f"no answer from moltbotd within {self.timeout:g}s") from None
        except OSError as exc:
            self.close()
            raise ProtocolError(f"lost the connection to moltbotd: {exc}") from None
        except ProtocolError:
            self.close()
            raise
        if reply.get("id") not in (req_id, None):
            raise ProtocolError(f"answer for request {reply.get('id')!r}, expected {req_id}")
        return decode(response_result(reply))

    def _channel(self, params: dict[str, Any]) -> DirectChannel | None:
        """The model's direct channel: asked for on its first request, and again a while
        after moltbotd refused one or sent us back; None: go through moltbotd."""
        model = params["model"]
        known, ask = _known_channel(self._channels, params, self.direct)
        if known or not ask:
            return known  # type: ignore[return-value]
        timeout = params.get("timeout_ms")
        wait = min(CHANNEL_SETUP, self.timeout or CHANNEL_SETUP, (timeout or 1e9) / 1000)
        try:
            channel = self.grant(model, wait)
        except (MoltError, ProtocolError):  # not granted (a canary, a fallback...), or gone
            if self.strict_direct:
                raise
            self._channels[model] = time.monotonic() + CHANNEL_RETRY
            return None
        self._channels[model] = channel
        return channel

    def grant(self, model: str, wait: float = CHANNEL_SETUP) -> DirectChannel:
        """A direct channel to the worker serving `model`, opened: MoltError when moltbotd
        refuses one, ProtocolError when the worker did not open it within `wait` s."""
        info = self._call("channel", {"model": model})
        assert self._receiver is not None
        sock = socket.socket(fileno=self._receiver.fds.pop())
        try:
            return DirectChannel(sock, info, self.busy_poll, wait)
        except (OSError, ProtocolError, TimeoutError) as exc:  # the worker is gone or busy
            sock.close()
            why = str(exc) or f"no answer within {wait:g}s"
            raise ProtocolError(f"the worker serving model {model} did not open its direct"
                                f" channel: {why}") from None  # fmt: skip

    def _call_direct(self, channel: DirectChannel, message: bytes, req_id: int,
                     params: dict[str, Any]) -> dict[str, Any] | None:  # fmt: skip
        """The answer on the channel, its outputs out of the region; None when the channel
        ended before the request ran (the worker died or closed it): it is sent through
        moltbotd's socket. After a deadline the channel is let go: a run that outlived its
        deadline could still write its outputs into the region."""
        timeout = params.get("timeout_ms")
        local = timeout is not None and timeout > 0  # else the worker says BAD_REQUEST
        wait = timeout / 1000 + DEADLINE_GRACE if local else self.timeout
        try:
            reply = channel.take(channel.call(message, req_id, wait))
        except TimeoutError:
            if not local:
                raise ProtocolError(f"no answer from {channel.label} within {wait:g}s") from None
            self._drop(params["model"])
            return error_response(req_id, _deadline_passed(channel.label, params))
        except (OSError, ProtocolError) as exc:
            if channel.sock.fileno() == -1:  # close() from another thread: not the worker's doing
                raise ProtocolError(f"this client was closed while its request to"
                                    f" {channel.label} waited") from None  # fmt: skip
            never_ran = channel.never_ran(req_id)
            self._drop(params["model"])
            return None if never_ran else error_response(req_id, self._why_ended(channel, exc))
        error = reply.get("error")
        late = isinstance(error, dict) and error.get("code") == ErrorCode.DEADLINE_EXCEEDED.value
        if channel.closing or late:
            self._drop(params["model"])
        return reply

    def _why_ended(self, channel: DirectChannel, exc: Exception) -> MoltError:
        """The error moltbotd's socket gave for the worker's death (RESOURCE_EXHAUSTED
        when its memory limit killed it), or WORKER_FAILED when moltbotd cannot say."""
        try:
            return self.channel_ended(channel.model, channel.pid)  # type: ignore[no-any-return]
        except (MoltError, ProtocolError, ConnectError):
            return MoltError(ErrorCode.WORKER_FAILED, f"{channel.label} closed its direct"
                             f" channel before answering (it exited?): {exc}")  # fmt: skip

    def _drop(self, model: str) -> None:
        channel = self._channels.pop(model, None)
        if isinstance(channel, DirectChannel):
            channel.close()


class AsyncChannel:
    """A direct channel that many tasks use at once: requests pipelined, answers matched
    to them by id. Inputs travel in the frames (the shared region is for one request at a
    time). Once the worker asks to close it, or the client drops it, it takes no new
    request and is half-closed when its last answer came: nothing in flight is lost."""

    def __init__(self, opened: DirectChannel, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter,
                 ended: Callable[[], Awaitable[MoltError | None]]) -> None:  # fmt: skip
        self.label = opened.label
        self.opened = opened  # for its region's table of running requests
        self.writer = writer
        self.ended = ended  # asks moltbotd why the worker closed the channel
        # an answer, or None: it never ran, and goes to moltbotd's socket
        self.waiting: dict[int, asyncio.Future[dict[str, Any] | None]] = {}
        self.closing = False  # the worker asked us to go elsewhere, or we dropped it
        self.reader = asyncio.get_running_loop().create_task(self._read(reader))

    def usable(self) -> bool:
        return not self.closing and not self.reader.done()

    async def call(self, frame: bytes, req_id: int) -> dict[str, Any] | None:
        future = asyncio.get_running_loop().create_future()
        self.waiting[req_id] = future
        try:
            self.writer.write(frame)
            return await future
        finally:
            self.waiting.pop(req_id, None)
            self._end_if_done()

    def release(self) -> None:
        """Take no new request; half-closed once its last answer came."""
        self.closing = True
        self._end_if_done()

    def _end_if_done(self) -> None:
        if self.closing and not self.waiting and self.writer.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):  # already closed
                self.writer.write_eof()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        decoder = FrameDecoder(MAX_RESPONSE_BYTES)
        error = None
        try:
            while data := await reader.read(RECV_BYTES):
                for message in decoder.feed(data):
                    self._deliver(message)
        except Exception as exc:  # whatever broke it, its requests fail
            error = MoltError(ErrorCode.WORKER_FAILED, f"{self.label}: the channel failed: {exc!r}")
        self.closing = True
        ran = {req_id: future for req_id, future in self.waiting.items() if not future.done()}
        if error is None:  # EOF: the worker died, or stopped waiting for us
            for req_id in [r for r in ran if self.opened.never_ran(r)]:
                ran.pop(req_id).set_result(None)
            error = await self.ended() if ran else None
        error = error or MoltError(ErrorCode.WORKER_FAILED, f"{self.label}: it closed the"
                                   " channel before answering (it exited?)")  # fmt: skip
        for req_id, future in ran.items():
            future.set_result(error_response(req_id, error))
        self.writer.close()
        self.opened.close()

    def _deliver(self, message: dict[str, Any] | MoltError) -> None:
        if isinstance(message, MoltError):
            raise message
        if "closing" in message:  # half-closed at once when nothing waits
            self.release()
            return
        future = self.waiting.get(message.get("id"))  # type: ignore[arg-type]
        if future and not future.done():
            future.set_result(message)

    def close(self) -> None:
        self.reader.cancel()
        self.writer.close()
        self.opened.close()


class AsyncClient(_Calls):
    """asyncio client: calls from many tasks share one connection, pipelined. A model's
    requests go, pipelined too, on a direct channel to its worker when moltbotd grants
    one, as Client's do (direct=False: always through moltbotd's socket)."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None,
                 direct: bool = True) -> None:  # fmt: skip
        self.path = resolve_socket(socket_path)
        self.direct = direct
        self._channels: dict[str, AsyncChannel | float] = {}  # model -> channel, or when to ask
        self._granting: dict[str, asyncio.Task[None]] = {}  # channels being asked for
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._progress: dict[int, OnProgress] = {}
        self._ids = itertools.count(1)
        self._connecting = asyncio.Lock()  # the first calls of many tasks share one connect

    async def connect(self) -> "AsyncClient":
        try:
            reader, self._writer = await asyncio.open_unix_connection(str(self.path))
        except OSError as exc:
            raise connect_error(self.path, exc) from None
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))
        return self

    async def close(self) -> None:
        for task in list(self._granting.values()):
            task.cancel()
        for channel in self._channels.values():
            if isinstance(channel, AsyncChannel):
                channel.close()
        self._channels.clear()
        if self._writer:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        if self._reader_task:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _call(self, op: str, params: dict[str, Any], decode: Callable[[Any], Any] = _same,
                    on_progress: OnProgress | None = None) -> Any:  # fmt: skip
        channel = self._channel(params) if op == "infer" else None
        if channel:
            req_id = next(self._ids)
            reply = await self._call_direct(channel, _message(op, req_id, params), req_id, params)
            if reply is not None:
                return decode(response_result(reply))
            # it never ran there (the worker died or closed the channel): the socket serves it
        if self._writer is None:
            async with self._connecting:
                if self._writer is None:
                    await self.connect()
        assert self._writer is not None
        if self._reader_task is not None and self._reader_task.done():
            raise ProtocolError("the connection to moltbotd is closed")
        req_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = future
        if on_progress:
            self._progress[req_id] = on_progress
        try:
            self._writer.write(_message(op, req_id, params, on_progress is not None))
            reply = await future
        finally:
            self._waiting.pop(req_id, None)
            self._progress.pop(req_id, None)
        return decode(response_result(reply))

    def _channel(self, params: dict[str, Any]) -> AsyncChannel | None:
        """The model's direct channel, or None (the socket): asked for in the background
        on the model's first request, again a while after a refusal or a closing; the
        requests that come meanwhile go through moltbotd."""
        model = params["model"]
        known, ask = _known_channel(self._channels, params, self.direct)
        if known:
            return known  # type: ignore[return-value]
        if ask and model not in self._granting:
            task = asyncio.get_running_loop().create_task(self._open(model))
            self._granting[model] = task
            task.add_done_callback(lambda _: self._granting.pop(model, None))
        return None

    async def _open(self, model: str) -> None:
        """Ask for a channel (in a thread: the socket comes with SCM_RIGHTS, which asyncio's
        streams do not read) and start using it; a refusal is asked again later."""
        try:
            opened = await asyncio.to_thread(_grant, self.path, model)
            reader, writer = await asyncio.open_unix_connection(sock=opened.sock)
        except Exception:  # refused, or gone: the socket serves meanwhile
            self._channels[model] = time.monotonic() + CHANNEL_RETRY
            return
        self._channels[model] = AsyncChannel(opened, reader, writer,
                                             lambda: self._why_ended(opened))  # fmt: skip

    async def _why_ended(self, channel: DirectChannel) -> MoltError | None:
        """The error moltbotd's socket gave for the worker's death, or None (it cannot
        say)."""
        try:
            return await self.channel_ended(channel.model, channel.pid)  # type: ignore[no-any-return]
        except (MoltError, ProtocolError, ConnectError):
            return None

    async def _call_direct(self, channel: AsyncChannel, message: bytes, req_id: int,
                           params: dict[str, Any]) -> dict[str, Any] | None:  # fmt: skip
        timeout = params.get("timeout_ms")
        if not (timeout is not None and timeout > 0):  # else the worker says BAD_REQUEST
            return await channel.call(message, req_id)
        try:  # asyncio.timeout, not wait_for: no task between the check and the write
            async with asyncio.timeout(timeout / 1000 + DEADLINE_GRACE):
                return await channel.call(message, req_id)
        except TimeoutError:  # its late answer is dropped by id
            return error_response(req_id, _deadline_passed(channel.label, params))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        decoder = FrameDecoder(MAX_RESPONSE_BYTES)
        error: Exception = ProtocolError("moltbotd closed the connection before answering")
        try:
            while data := await reader.read(RECV_BYTES):
                for message in decoder.feed(data):
                    self._deliver(message)
        except (OSError, MoltError) as exc:
            error = ProtocolError(f"lost the connection to moltbotd: {exc}")
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)

    def _deliver(self, message: dict[str, Any] | MoltError) -> None:
        if isinstance(message, MoltError):
            raise message
        if "progress" in message:
            callback = self._progress.get(message.get("id"))  # type: ignore[arg-type]
            if callback:
                callback(message["progress"])
            return
        future = self._waiting.get(message.get("id"))  # type: ignore[arg-type]
        if future is None and message.get("id") is None:
            # An error the daemon could not address (a bad frame): it concerns everyone.
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_result(message)
        elif future and not future.done():
            future.set_result(message)
