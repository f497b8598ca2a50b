"""Direct channels, the worker's side: clients whose infer frames come straight here.

The supervisor decides who gets a channel (`channel` operation): it hands the client one
end of a socketpair and this worker the other, over the worker's handoff socket
(SCM_RIGHTS). A request then crosses one socket instead of two, and no process wakes in
between. What the supervisor's pool does for its queue is done here for the channels,
with the same code: the request checks against the signature, priorities, the bounded
queue (OVERLOADED), deadlines and batching (scheduler.Queue). The supervisor keeps
control: it asks the worker to close its channels (a switch, a canary, a reload that
turns them off) and reads the worker's counts from the `stats` messages sent here.

Closing loses nothing: the worker sends `{"closing": why}` on each channel and answers
everything it reads until the client half-closes (or `within` seconds pass); the
client sends its next requests elsewhere.
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
from collections import Counter
from collections.abc import Callable
from typing import Any

from moltbotd.config import Batching
from moltbotd.scheduler import Pending, Queue, deadline_exceeded, request_options
from moltbotd.wire.handoff import Throttled
from moltbotd.wire.operations import OPERATIONS
from moltbotd.wire.protocol import (
    ErrorCode,
    FrameDecoder,
    FrameTooLarge,
    MoltError,
    Packed,
    encode_frame,
    error_response,
    ok_frame,
    pack_with,
    parse_request,
    request_id,
)
from moltbotd.wire.signature import Signature, check_inputs, check_output_names

INFER = OPERATIONS["infer"]
SOCKET_BUFFER = 4 << 20  # a 600 KB tensor goes in one write, not in 200 KB slices
RECV_BYTES = 1 << 20
REPORT_EVERY = 0.25  # seconds between stats messages while requests come
MAX_WAITS = 256  # queue times per stats message (a sample, for the percentiles)


Result = bytes | dict[str, Any]  # a request's outputs, packed for the client; or its error
Batch = list[tuple[dict[str, Any], list[str] | None]]  # each request's inputs and outputs
Runner = Callable[[Batch, bool], list[Result]]


class Stream:
    """One direct channel: a client's socket, its shared region, its partial frame and its
    unsent answers."""

    def __init__(self, sock: socket.socket, max_frame_bytes: int, uid: int = -1) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        self.sock = sock
        self.uid = uid  # the client's, counted against max_channels_per_uid
        self.region, self.mapped = offer_region(sock, max_frame_bytes)
        sock.setblocking(False)
        self.decoder = FrameDecoder(max_frame_bytes)
        self.out = bytearray()
        self.events = 0  # what the selector watches for: read, or write while answers wait
        self.pending = 0  # requests read and not answered yet
        self.ended = False  # the client half-closed (or went away)
        self.closing_at: float | None = None  # when it is closed even if the client is not done

    def shared(self, inputs: Any) -> Any:
        """The request's inputs with each {"shm": [offset, size]} made the tensor map
        whose data is a copy of that part of the region, taken now: the client can still
        write to it, and onnxruntime must not see bytes change after they were checked."""
        if not isinstance(inputs, dict):
            return inputs  # check_inputs says what is wrong
        return {name: self._part(name, tensor) if isinstance(tensor, dict) and "shm" in tensor
                else tensor for name, tensor in inputs.items()}  # fmt: skip

    def _part(self, name: Any, tensor: dict[str, Any]) -> dict[str, Any]:
        where, size = tensor["shm"], len(self.mapped)
        valid = isinstance(where, list) and len(where) == 2 and "data" not in tensor
        if not (valid and all(type(n) is int and n >= 0 for n in where)) or sum(where) > size:
            raise MoltError(ErrorCode.INVALID_INPUT, f"input {name!r}: 'shm' must be [offset,"
                            f" size] within this channel's shared region of {size} bytes,"
                            f" instead of 'data', got {where!r}"[:300])  # fmt: skip
        offset, count = where
        end = offset + count
        # reading a page never written would allocate it, in the worker's cgroup
        if count and (self.region is None or os.lseek(self.region, offset, os.SEEK_HOLE) < end):
            raise MoltError(ErrorCode.INVALID_INPUT, f"input {name!r}: bytes {offset} to {end}"
                            " of this channel's shared region were never written")  # fmt: skip
        rest = {key: value for key, value in tensor.items() if key != "shm"}
        return {**rest, "data": bytes(self.mapped[offset:end])}  # the copy: see shared()

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


def refuse(sock: socket.socket, why: str, refusals: Throttled) -> None:
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
    kill the worker with SIGBUS), mapped read-only: copying from a mapping costs half of
    pread."""
    fd = os.memfd_create("moltbot-direct", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        return fd, mmap.mmap(fd, size, prot=mmap.PROT_READ)
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


class Direct:
    """Direct channels served by one thread: their queue and the counts reported to the
    daemon."""

    def __init__(self, session: dict[str, Any], signature: Signature, runner: Runner) -> None:
        self.model, self.version = session["model"], session["version"]
        self.label = f"model {self.model} {self.version}"
        # every answer's result map up to its outputs, packed once
        self.result_head = pack_with({"model": self.model, "version": self.version}, "outputs", b"")
        self.signature = signature
        self.runner = runner
        self.poller = Poller()
        self.streams: dict[int, Stream] = {}
        self.queue = Queue(session["scheduling"]["max_queue"])
        self.configure(session["scheduling"])
        self._counts = Counts()
        self._reported = time.monotonic()

    def configure(self, scheduling: dict[str, Any]) -> None:
        """The model's scheduling settings, at start and after a reload."""
        self.priority: str = scheduling["priority"]
        self.batching = Batching(**scheduling["batching"])
        self.poller.configure(scheduling)
        self.queue.limit = scheduling["max_queue"]

    # --- channels -----------------------------------------------------------------------

    def attach(self, stream: Stream) -> None:
        """Serve a channel (opened by the main thread: its region is already offered)."""
        self.streams[stream.sock.fileno()] = stream
        self._watch(stream)
        self._counts.changed = True

    def close_all(self, why: str, within: float) -> None:
        """Tell every client to go elsewhere; answer what they still send until they
        half-close, for `within` seconds at most."""
        due = time.monotonic() + within
        for stream in self.streams.values():
            if stream.closing_at is None:
                stream.write({"closing": why})
                stream.closing_at = due

    def timeout(self) -> float | None:
        """How long the worker may sleep: until the next report or a closing is due."""
        now = time.monotonic()
        due = [s.closing_at for s in self.streams.values() if s.closing_at is not None]
        if self._counts.changed:
            due.append(self._reported + REPORT_EVERY)
        return max(0.0, min(due) - now) if due else None

    # --- requests -----------------------------------------------------------------------

    def ready(self, stream: Stream) -> None:
        """The channel can be read (queue every whole request that arrived) or, while
        answers wait to go out, written."""
        if stream.out:
            stream.flush()
        else:
            self._read(stream)
        self._watch(stream)

    def _watch(self, stream: Stream) -> None:
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
        try:
            messages = stream.decoder.feed(data)
        except FrameTooLarge as exc:  # the stream cannot be resynchronised
            stream.write(error_response(None, exc))
            stream.ended = True
            return
        for message in messages:
            self.accept(stream, message)

    def accept(self, stream: Stream, message: dict[str, Any] | MoltError) -> None:
        if isinstance(message, MoltError):  # a frame that is not a request: no id to answer
            stream.write(error_response(None, message))
            return
        try:
            self.queue.push(self._checked(stream, message), self.label)
            stream.pending += 1
        except MoltError as exc:  # not counted, as the daemon counts only what it queued
            stream.write(error_response(request_id(message), exc))
        except Exception as exc:  # a bug in a check must not take the worker down
            traceback.print_exc()
            why = f"the worker could not check this request: {type(exc).__name__}: {exc}"
            stream.write(error_response(request_id(message), MoltError(ErrorCode.INTERNAL, why)))

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
        tensors = check_inputs(self.label, self.signature, stream.shared(params["inputs"]))
        outputs = params.get("outputs")
        if outputs:
            check_output_names(self.label, self.signature, outputs)
        now = time.monotonic()
        deadline = now + timeout / 1000 if timeout else None

        def reply(outcome: bytes | MoltError) -> None:
            stream.pending -= 1
            self._counts.answered(outcome)
            if isinstance(outcome, MoltError):
                stream.write(error_response(request.id, outcome))
            else:
                stream.out += ok_frame(request.id, Packed(self.result_head + outcome))

        return Pending(tensors, outputs, priority or self.priority, deadline, now, reply)

    def run(self) -> None:
        """Run everything queued: the highest priority first, batched where configured."""
        concat = self.batching.max_batch_size > 1
        while self.queue:
            now = time.monotonic()
            for item in self.queue.expired(now):
                item.answer(deadline_exceeded(self.label, item, now, queued=True))
            # one by one unless batched: a deadline is checked before each run
            batch, _ = self.queue.take(self.batching, now, idle=True)
            if batch:
                self._counts.ran(batch, concat, now)
                results = self.runner([(i.inputs, i.outputs) for i in batch], concat)
                self._answer(batch, results)

    def _answer(self, batch: list[Pending], results: list[Result]) -> None:
        now = time.monotonic()
        for item, result in zip(batch, results, strict=True):
            if not item.live(now):  # the client stopped waiting: a late result is dropped
                item.answer(deadline_exceeded(self.label, item, now, queued=False))
            elif isinstance(result, bytes):
                item.answer(result)
            else:
                message = f"{self.label}: {result['message']}"
                item.answer(MoltError(ErrorCode(result["code"]), message))

    def flush(self) -> list[Stream]:
        """Send the answers, and close the channels that are done; those closed."""
        now, closed = time.monotonic(), []
        for fd, stream in list(self.streams.items()):
            if stream.out:
                stream.flush()
            if not stream.finished(now):
                self._watch(stream)
                continue
            stream.ended = True
            self._watch(stream)
            stream.close()
            del self.streams[fd]
            closed.append(stream)
            self._counts.changed = True
        return closed

    def report(self) -> dict[str, Any] | None:
        """The counts since the last report, when one is due: the daemon's status and
        idle checks see direct requests through these."""
        now = time.monotonic()
        if not self._counts.changed or now - self._reported < REPORT_EVERY:
            return None
        self._reported = now
        counts, self._counts = self._counts, Counts()
        return {"stats": {**counts.to_wire(), "channels": len(self.streams)}}


class Counts:
    """What happened on the channels since the last report."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.sizes: Counter[int] = Counter()
        self.waits: list[float] = []
        self.changed = False

    def answered(self, outcome: Any) -> None:
        self.requests += 1
        self.errors += isinstance(outcome, MoltError)
        self.changed = True

    def ran(self, batch: list[Pending], concat: bool, now: float) -> None:
        if concat:
            self.sizes[len(batch)] += 1
        if len(self.waits) < MAX_WAITS:
            self.waits.extend(now - item.arrived for item in batch[: MAX_WAITS - len(self.waits)])

    def to_wire(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors,
                "sizes": dict(self.sizes), "waits": self.waits}  # fmt: skip
