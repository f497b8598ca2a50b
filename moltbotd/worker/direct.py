"""The worker's channels: the sockets its requests come on, read and answered here.

Two kinds, served alike. moltbotd's relay carries its socket's clients' requests (see
wire/relay.py). A direct channel carries one client's: the supervisor decides who gets
one (`channel` operation), hands the client one end of a socketpair and this worker the
other over its handoff socket (SCM_RIGHTS), and a request then crosses one socket
instead of two. Either way the intake thread that reads a request checks it as moltbotd
checks its own (the operation table, the signature, priority and timeout) and pushes it into
the worker's one queue (hub.py), which decides what runs when.

The supervisor keeps control of direct channels: it asks the worker to close them (a
switch, a canary, a reload that turns them off) and reads the worker's counts from its
`stats` messages. Closing loses nothing: the worker sends `{"closing": why}` on each
channel and answers everything it reads until the client half-closes (or `within`
seconds pass); the client sends its next requests elsewhere.
"""

import contextlib
import fcntl
import mmap
import os
import selectors
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from moltbotd.scheduler import Pending, request_options
from moltbotd.wire import region
from moltbotd.wire.handoff import Throttled
from moltbotd.wire.operations import OPERATIONS
from moltbotd.wire.protocol import (
    ErrorCode,
    FrameDecoder,
    FrameTooLarge,
    MoltError,
    Packed,
    RequestId,
    encode_frame,
    error_response,
    ok_frame,
    pack_with,
    parse_request,
    request_id,
    trace_of,
    traced,
)
from moltbotd.wire.region import HEADER_BYTES, SLOTS, nameable
from moltbotd.wire.relay import relay_frame, started_frame
from moltbotd.wire.signature import Signature, check_inputs, check_output_names
from moltbotd.worker.cache import ResultCache
from moltbotd.worker.hub import Hub
from moltbotd.worker.sessions import check_id

INFER = OPERATIONS["infer"]
Place = Callable[[dict[str, Any]], dict[str, Any]]  # a request's outputs, as they are sent
SOCKET_BUFFER = 4 << 20  # a 600 KB tensor goes in one write, not in 200 KB slices
RECV_BYTES = 1 << 20


class Stream:
    """One direct channel: a client's socket, its shared region, its partial frame and its
    unsent answers. Any lane may answer into `out`, under the hub's lock."""

    counted = True  # its requests count in the worker's reports (moltbotd counts relayed ones)

    def __init__(self, sock: socket.socket, max_frame_bytes: int, uid: int = -1) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        self.sock = sock
        self.uid = uid  # the client's, counted against max_channels_per_uid
        self.region, self.mapped = self._offer(max_frame_bytes)
        self.table = RunningTable(self.mapped) if len(self.mapped) >= HEADER_BYTES else None
        sock.setblocking(False)
        self.decoder = FrameDecoder(max_frame_bytes)
        self.out = bytearray()
        self.events = 0  # what the selector watches for: read, or write while answers wait
        self.pending = 0  # requests read and not answered yet
        self.read_at = 0.0  # when its last bytes were read: its requests' transfer begins
        self.ended = False  # the client half-closed (or went away)
        self.closing_at: float | None = None  # when it is closed even if the client is not done
        # asks the intake to look at it again: room to write, or done (Channels.attach)
        self.stalled: Callable[[], None] = lambda: None

    def _offer(self, size: int) -> tuple[int | None, memoryview]:
        return offer_region(self.sock, size)

    def answer(self, req_id: RequestId, outcome: bytes | MoltError, head: bytes) -> None:
        """A queued request's answer: its packed outputs after `head`, or its error."""
        if isinstance(outcome, MoltError):
            self.out += encode_frame(error_response(req_id, outcome))
        else:
            self.out += ok_frame(req_id, Packed(head + outcome))

    def refuse(self, req_id: RequestId | None, error: MoltError) -> None:
        """A request never queued (a bad frame, a bad input, a full queue)."""
        self.out += encode_frame(error_response(req_id, error))

    def shared(self, inputs: Any) -> Any:
        """The request's inputs with each {"shm": [offset, size]} made the tensor map
        whose data is a copy of that part of the region, taken now: the client can still
        write to it, and onnxruntime must not see bytes change after they were checked."""
        if not isinstance(inputs, dict):
            return inputs  # check_inputs says what is wrong
        return {name: self._part(name, tensor) if isinstance(tensor, dict) and "shm" in tensor
                else tensor for name, tensor in inputs.items()}  # fmt: skip

    def _part(self, name: Any, tensor: dict[str, Any]) -> dict[str, Any]:
        where = self._area(f"input {name!r}: 'shm'", tensor["shm"], ErrorCode.INVALID_INPUT)
        if "data" in tensor:
            raise MoltError(ErrorCode.INVALID_INPUT, f"input {name!r}: 'shm' comes instead of"
                            " 'data', not with it")  # fmt: skip
        offset, end = where
        count = end - offset
        # reading a page never written would allocate it, in the worker's cgroup
        if count and (self.region is None or os.lseek(self.region, offset, os.SEEK_HOLE) < end):
            raise MoltError(ErrorCode.INVALID_INPUT, f"input {name!r}: bytes {offset} to {end}"
                            " of this channel's shared region were never written")  # fmt: skip
        rest = {key: value for key, value in tensor.items() if key != "shm"}
        return {**rest, "data": bytes(self.mapped[offset:end])}  # the copy: see shared()

    def _area(self, what: str, where: Any, code: ErrorCode) -> tuple[int, int]:
        size = len(self.mapped)
        found = region.area(where, size)
        if found is None:
            raise MoltError(code, f"{what} must be [offset, size] within bytes {HEADER_BYTES}"
                            f" to {size} of this channel's shared region (the first page is"
                            f" the worker's), got {where!r}"[:300])  # fmt: skip
        return found

    def placer(self, where: Any) -> Place:
        """Where a request's large outputs go: the part of the region its `reply_shm`
        names (its client reads them before it sends its next request here)."""
        start, end = self._area("'reply_shm'", where, ErrorCode.BAD_REQUEST)
        return lambda outputs: region.put(self.mapped, outputs, start, end)

    def close(self) -> None:
        self.sock.close()
        self.mapped.release()
        if self.region is not None:
            os.close(self.region)

    def write(self, message: dict[str, Any]) -> None:
        self.out += encode_frame(message)

    def flush(self) -> None:
        """Send what the socket takes now; the rest waits (a client that does not read
        must not stall the others)."""
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError:  # the client is gone: its answers have nowhere to go
            sent, self.ended = len(self.out), True
        del self.out[:sent]

    def finished(self, now: float) -> bool:
        done = self.ended and not self.pending and not self.out
        return done or (self.closing_at is not None and now >= self.closing_at)


class RunningTable:
    """The worker's side of a channel's table of running requests (wire/region.py):
    a request's id goes into a free slot when its batch starts, and leaves at its answer.
    Used under the hub's lock."""

    def __init__(self, mapped: memoryview) -> None:
        self.mapped = mapped
        self.free = list(range(SLOTS))

    def start(self, req_id: RequestId) -> int:
        """Name a request that starts to run: its slot, or -1 (counted unnamed)."""
        if nameable(req_id) and self.free:
            slot = self.free.pop()
            region.name(self.mapped, slot, req_id)  # type: ignore[arg-type]
            return slot
        region.count_unnamed(self.mapped, 1)
        return -1

    def end(self, slot: int) -> None:
        if slot < 0:
            region.count_unnamed(self.mapped, -1)
            return
        region.name(self.mapped, slot, 0)
        self.free.append(slot)


class RelayStream(Stream):
    """moltbotd's relay: its socket's clients' requests, answered in relay frames."""

    counted = False

    def __init__(self, sock: socket.socket, max_frame_bytes: int) -> None:
        super().__init__(sock, max_frame_bytes)
        self.starting: list[int] = []  # relay ids whose batch was taken, not yet told

    def flush(self) -> None:
        if self.starting:
            self.out += started_frame(self.starting)
            self.starting = []
        super().flush()

    def _offer(self, size: int) -> tuple[int | None, memoryview]:
        return None, memoryview(b"")  # moltbotd copies its clients' inputs: no region

    def answer(self, req_id: RequestId, outcome: bytes | MoltError, head: bytes) -> None:
        self.out += relay_frame(req_id, outcome, queued=True)  # type: ignore[arg-type]

    def refuse(self, req_id: RequestId | None, error: MoltError) -> None:
        if type(req_id) is not int:  # moltbotd wrote a frame it cannot have meant: a bug
            raise RuntimeError(f"moltbotd relayed a request without an id: {error.message}")
        self.out += relay_frame(req_id, error, queued=False)

    def _part(self, name: Any, tensor: dict[str, Any]) -> dict[str, Any]:
        why = f"input {name!r}: 'shm' names a direct channel's shared region; on moltbotd's"
        raise MoltError(ErrorCode.INVALID_INPUT, f"{why} socket send 'data'"[:300])

    def placer(self, where: Any) -> Place:
        raise MoltError(ErrorCode.BAD_REQUEST, "'reply_shm' names a direct channel's shared"
                        " region; moltbotd's socket answers in its frames")  # fmt: skip


def refuse_channel(sock: socket.socket, why: str, refusals: Throttled) -> None:
    """Close a channel the worker will not serve, saying why in its first frame (where
    the region offer would be): the client library then uses moltbotd's socket."""
    error = MoltError(ErrorCode.RESOURCE_EXHAUSTED, f"direct channel refused: {why}")
    with contextlib.suppress(OSError), sock:  # a client already gone: nothing to tell
        sock.sendall(encode_frame(error_response(None, error)))
    refusals.add(why)


def print_refusals(why: str, count: int) -> None:
    """The worker's refusals, on its stderr: the daemon's log, through the relay."""
    print(f"refused {count} direct channel(s) since the last report: {why}", file=sys.stderr,
          flush=True)  # fmt: skip


def offer_region(sock: socket.socket, size: int) -> tuple[int | None, memoryview]:
    """Send the client a shared memory region for its large inputs: the channel's first
    frame, {"region": size} with the memfd attached (SCM_RIGHTS); the memfd and its
    read-only mapping here. Where there is none (no memfd, no memory, a size of 0), the
    frame says size 0."""
    try:
        fd, mapping = _sealed_region(size) if size else (None, b"")
    except (OSError, ValueError):
        fd, mapping = None, b""
    with contextlib.suppress(OSError):  # a client already gone: the channel reads EOF
        if fd is None:
            sock.sendall(encode_frame({"region": 0}))
        else:
            socket.send_fds(sock, [encode_frame({"region": size})], [fd])
    return fd, memoryview(mapping)


def _sealed_region(size: int) -> tuple[int, mmap.mmap]:
    """A memfd sealed against shrinking (a read past the end of a truncated mapping would
    kill the worker with SIGBUS), mapped: copying from a mapping costs half of pread, and
    the worker writes its table of running requests there (wire/region.py)."""
    fd = os.memfd_create("moltbot-direct", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        return fd, mmap.mmap(fd, size)
    except (OSError, ValueError):
        os.close(fd)
        raise


class Poller:
    """A selector's sockets, polled without sleeping for `busy_poll` seconds first (a
    sleeping CPU wakes slowly and runs cold), then waited for."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.busy_poll = 0.0

    def configure(self, scheduling: dict[str, Any]) -> None:
        """busy_poll_us from the model's scheduling settings."""
        self.busy_poll = scheduling["busy_poll_us"] / 1e6

    def wait(self, timeout: float | None) -> list[Any]:
        """The data of the sockets that became ready, blocking up to `timeout` at most
        once the poll found none."""
        until = time.monotonic() + self.busy_poll
        while time.monotonic() < until:
            if events := self.selector.select(0):
                return [key.data for key, _ in events]
        return [key.data for key, _ in self.selector.select(timeout)]


Checked = tuple[RequestId | None, Pending | MoltError]  # a request read: queued, or why not


class Channels:
    """The channels the intake reads. What arrives is checked here and pushed into the
    worker's one queue; whichever lane runs a request answers it into its channel's
    buffer and sends it."""

    def __init__(self, session: dict[str, Any], signature: Signature, hub: Hub) -> None:
        self.model, self.version = session["model"], session["version"]
        self.label = f"model {self.model} {self.version}"
        # every answer's result map up to its outputs, packed once
        self.result_head = pack_with({"model": self.model, "version": self.version}, "outputs", b"")
        self.signature = signature
        self.hub = hub
        self.poller = Poller()
        self.streams: dict[int, Stream] = {}
        self.configure(session["scheduling"])

    def configure(self, scheduling: dict[str, Any]) -> None:
        """The model's scheduling settings, at start and after a reload."""
        self.priority: str = scheduling["priority"]
        self.poller.configure(scheduling)

    # --- channels -----------------------------------------------------------------------

    def attach(self, stream: Stream, stalled: Callable[[], None]) -> None:
        """Serve a channel (a direct one's region is already offered); `stalled` has the
        intake look at it again (a lane's answers did not fit, or its client is done)."""
        self.streams[stream.sock.fileno()] = stream
        stream.stalled = stalled
        self.watch(stream)
        with self.hub.lock:
            self.hub.note()  # the daemon learns the channels held

    def close_all(self, why: str, within: float) -> None:
        """Tell every direct client to go elsewhere; answer what they still send until
        they half-close, for `within` seconds at most."""
        due = time.monotonic() + within
        with self.hub.lock:
            for stream in self.streams.values():
                if stream.counted and stream.closing_at is None:
                    stream.write({"closing": why})
                    stream.closing_at = due
                    self.watch(stream)

    def timeout(self) -> float | None:
        """How long the intake may sleep: until a closing is due."""
        due = [s.closing_at for s in self.streams.values() if s.closing_at is not None]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def watch(self, stream: Stream) -> None:
        """Read a channel only while its answers went out: a client that sends and never
        reads gets no more of the worker's memory than its socket buffer."""
        wanted = (
            0 if stream.ended else selectors.EVENT_WRITE if stream.out else selectors.EVENT_READ
        )
        if wanted == stream.events:
            return
        if not stream.events:
            self.poller.selector.register(stream.sock, wanted, stream)
        elif not wanted:
            self.poller.selector.unregister(stream.sock)
        else:
            self.poller.selector.modify(stream.sock, wanted, stream)
        stream.events = wanted

    def sweep(self) -> list[Stream]:
        """Send what waits, and close the channels that are done; those closed."""
        now, closed = time.monotonic(), []
        with self.hub.lock:
            for fd, stream in list(self.streams.items()):
                if stream.out:
                    stream.flush()
                if not stream.finished(now):
                    self.watch(stream)
                    continue
                stream.ended = True
                self.watch(stream)
                stream.close()
                del self.streams[fd]
                closed.append(stream)
                self.hub.note()
        return closed

    # --- requests -----------------------------------------------------------------------

    def ready(self, stream: Stream) -> None:
        """The channel can be read (queue every whole request that arrived) or, while
        answers wait to go out, written."""
        if stream.out:
            with self.hub.lock:
                stream.flush()
        else:
            self._read(stream)
        self.watch(stream)

    def _read(self, stream: Stream) -> None:
        try:
            data = stream.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            stream.ended = True
            return
        stream.read_at = time.monotonic()
        try:
            messages = stream.decoder.feed(data)
        except FrameTooLarge as exc:  # the stream cannot be resynchronised
            with self.hub.lock:
                stream.refuse(None, exc)
            stream.ended = True
            return
        self._queue(stream, [self._check(stream, message) for message in messages])

    def _queue(self, stream: Stream, checked: list[Checked]) -> None:
        """Push the requests that passed their checks (a full queue refuses them); answer
        the others now. Not counted: moltbotd counts only what was queued."""
        with self.hub.lock:
            for req_id, item in checked:
                error = item
                if isinstance(item, Pending):
                    try:
                        stream.pending += 1  # before a cached answer answers it
                        self._push(item)
                        continue
                    except MoltError as exc:  # OVERLOADED
                        stream.pending -= 1
                        error = traced(exc, item.trace)
                stream.refuse(req_id, error)
                self.hub.refused(error)

    def _push(self, item: Pending) -> None:
        """Queue a request (under the hub's lock), answer it from the cache, or have it
        wait for its session's turn."""
        hub, session = self.hub, item.conversation
        if item.cache_key is not None and (cached := hub.cache.get(item.cache_key)):
            item.answer(cached)
            return
        if session is None:
            hub.push(item)
            return
        if hub.sessions.admit(item, session):  # type: ignore[union-attr]
            try:
                hub.push(item)
            except MoltError:
                hub.sessions.release(item, hub.push)  # type: ignore[union-attr]
                raise

    def _check(self, stream: Stream, message: dict[str, Any] | MoltError) -> Checked:
        if isinstance(message, MoltError):  # a frame that is not a request: no id to answer
            return None, message
        req_id = request_id(message)
        try:
            return req_id, self._checked(stream, message)
        except MoltError as exc:
            return req_id, traced(exc, trace_of(message))
        except Exception as exc:  # a bug in a check must not take the worker down
            traceback.print_exc()
            why = f"the worker could not check this request: {type(exc).__name__}: {exc}"
            return req_id, MoltError(ErrorCode.INTERNAL, why)

    def _checked(self, stream: Stream, message: dict[str, Any]) -> Pending:
        """The request as the queue takes it, checked as the daemon checks it."""
        request = parse_request(message)
        if request.op != "infer":
            why = f"a direct channel answers only 'infer'; send {request.op!r} to moltbotd's socket"
            raise MoltError(ErrorCode.UNKNOWN_OPERATION, why[:200])
        params = INFER.check_params(request.params)
        if params["model"] != self.model or params.get("version", self.version) != self.version:
            asked = f"{params['model']} {params.get('version', '')}".strip()
            raise MoltError(ErrorCode.BAD_REQUEST, f"this direct channel serves {self.label},"
                            f" not {asked}: ask moltbotd's socket for it"[:300])  # fmt: skip
        priority, timeout = request_options(params)
        session = self._session(params)
        tensors = check_inputs(self.label, self.signature, stream.shared(params["inputs"]))
        outputs = params.get("outputs")
        if outputs:
            check_output_names(self.label, self.signature, outputs)
        now = time.monotonic()
        deadline = now + timeout / 1000 if timeout else None
        hub, head, trace = self.hub, self.result_head, params.get("request_id")
        if trace is not None:  # the answer carries it back
            fields = {"model": self.model, "version": self.version, "request_id": trace}
            head = pack_with(fields, "outputs", b"")

        slot: int | None = None  # in the channel's table of running requests, once started

        def reply(outcome: bytes | MoltError) -> None:  # under the hub's lock
            if isinstance(outcome, MoltError):
                outcome = traced(outcome, trace)
            if slot is not None:
                stream.table.end(slot)  # type: ignore[union-attr]
            stream.pending -= 1
            done = time.monotonic() if hub.timing else 0.0
            stream.answer(request.id, outcome, head)
            hub.answered(outcome, item, stream.counted, done)
            hub.touched.add(stream)
            if item.conversation is not None and item.started is None:  # it never ran
                hub.sessions.release(item, hub.push)  # type: ignore[union-attr]

        item = Pending(tensors, outputs, priority or self.priority, deadline, now, reply)
        item.conversation = session  # its id: _push admits it, with its Conversation
        item.received = stream.read_at
        item.trace = trace
        self._answer_from(item, stream, params)
        if isinstance(stream, RelayStream):

            def started() -> None:  # under the hub's lock
                stream.starting.append(request.id)  # type: ignore[arg-type]
                hub.touched.add(stream)

            item.on_start = started
        elif stream.table is not None:

            def mark_running() -> None:  # under the hub's lock
                nonlocal slot
                slot = stream.table.start(request.id)  # type: ignore[union-attr]

            item.on_start = mark_running
        return item

    def _answer_from(self, item: Pending, stream: Stream, params: dict[str, Any]) -> None:
        """Where a request's answer may go and come from besides a run: its large outputs
        laid out in its channel's region (`reply_shm`), and the cache, for a request
        without a session that does not say `cache: false` (an answer that points into a
        region is not kept)."""
        if item.conversation is None and self.hub.cache.on and params.get("cache", True):
            item.cache_key = ResultCache.key(item.inputs, item.outputs)
        if "reply_shm" not in params:
            return
        place = stream.placer(params["reply_shm"])
        if item.cache_key is None:
            item.place = place
            return

        def place_uncached(outputs: dict[str, Any]) -> dict[str, Any]:  # in the lane
            laid = place(outputs)
            if any(laid[name] is not tensor for name, tensor in outputs.items()):
                item.cache_key = None
            return laid

        item.place = place_uncached

    def _session(self, params: dict[str, Any]) -> str | None:
        """The request's session id, checked; None without one."""
        session = params.get("session")
        if session is None:
            return None
        if self.hub.sessions is None:
            raise MoltError(ErrorCode.BAD_REQUEST, f"{self.label} keeps no sessions: its"
                            " model.yaml declares no `state:`; send the request without"
                            " 'session'")  # fmt: skip
        return check_id(session)
