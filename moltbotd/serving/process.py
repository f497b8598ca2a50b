"""One worker process, seen from the daemon: spawn, handshake, requests, death, restart, stop.

A WorkerProcess owns its process's whole life in one task (_supervise); that task, stop() and
drain() change its state, always through states.check_transition, and every change is
logged. It speaks to the process over three socketpairs: control (the load, the
handshake, orders, the worker's counts), handoff (direct channels out, heartbeats in)
and the relay, where socket requests go as `infer` frames and come back as relay frames
(wire/relay.py); the ones in flight when the process dies fail with WORKER_FAILED.
"""

import asyncio
import contextlib
import itertools
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from moltbotd.config import Limits, Scheduling, SessionSettings, WorkerSettings
from moltbotd.isolation.cgroups import Group
from moltbotd.isolation.limits import describe, memory_limit_text
from moltbotd.logs import get_logger
from moltbotd.serving.exits import Exits
from moltbotd.serving.states import WorkerState, check_transition
from moltbotd.wire.handoff import HANDOFF, Throttled, channel_refusal
from moltbotd.wire.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    ErrorCode,
    FrameDecoder,
    MoltError,
    encode_frame,
)
from moltbotd.wire.relay import Ending, Parsed, parse_relay
from moltbotd.wire.signature import Signature

log = get_logger("worker")
S = WorkerState
ASK_TIMEOUT = 10.0  # seconds a worker has to answer a question (its sessions)
Done = Callable[[bytes | MoltError], None]  # a relayed request's packed outputs, or error


@dataclass
class Counters:
    requests: int = 0
    errors: int = 0
    restarts: int = 0
    starts: int = 0  # processes spawned, the first one included
    cache_hits: int = 0  # requests its result cache answered (worker/cache.py)
    cache_misses: int = 0


@dataclass(frozen=True)
class WorkerSpec:
    model: str
    version: str
    path: Path  # model.onnx
    session: SessionSettings
    limits: Limits = field(default_factory=Limits)
    samples: tuple[Mapping[str, Any], ...] = ()  # model.yaml's warm-up inputs
    batched: bool = False  # requests may come concatenated: the model must allow it
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES  # for requests on direct channels
    memory_auto: str | None = None  # how an `auto` memory limit was derived
    histograms: bool = True  # the worker counts each request's phases (metrics.histograms)
    slow_request: float = 0.0  # seconds; slower requests are logged (metrics.slow_request)
    state: tuple[Mapping[str, Any], ...] = ()  # model.yaml's state pairs: a stateful model
    sessions_dir: Path | None = None  # where its sessions spill (state_dir/sessions/MODEL)

    @property
    def label(self) -> str:
        return f"model {self.model} {self.version}"


class _Link(asyncio.Protocol):
    """The daemon's end of the control socketpair: the worker's messages, to on_message."""

    def __init__(self, worker: "WorkerProcess") -> None:
        self.worker = worker
        self.decoder = FrameDecoder(1 << 30)
        self.transport: asyncio.Transport | None = None
        self.deliver = worker.on_message

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        # nothing may be written to a closed transport (uvloop raises): send() checks this
        self.transport = None

    def data_received(self, data: bytes) -> None:
        for message in self.decoder.feed(data):
            self.deliver(message)


class _RelayLink(_Link):
    """The daemon's end of the relay: answers to the socket requests it relayed."""

    def __init__(self, worker: "WorkerProcess") -> None:
        super().__init__(worker)
        self.decoder = FrameDecoder(2**32 - 1, parse_relay)
        self.deliver = worker.on_answer  # type: ignore[assignment]
        self._pending: list[bytes] = []

    def send(self, frame: bytes) -> None:
        """Frames relayed in one turn of the loop leave in one write, after it: with many
        clients the daemon makes one syscall and wakes the worker once, not once each."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(frame)

    def _flush(self) -> None:
        frames, self._pending = self._pending, []
        if self.transport is not None:  # else the process is dying: its death fails them
            self.transport.write(b"".join(frames))


@dataclass(eq=False)  # a process handle: identity, not field-by-field equality
class WorkerProcess:
    spec: WorkerSpec
    settings: WorkerSettings
    state: WorkerState = S.STOPPED
    pid: int | None = None
    signature: Signature | None = None
    providers: list[str] = field(default_factory=list)
    error: str | None = None  # why it is FATAL, or how it last died
    counters: Counters = field(default_factory=Counters)
    started_at: float | None = None  # monotonic time it became READY
    cgroup: Group | None = None  # where its process goes before it loads the model
    on_phase: Callable[[str], None] | None = None  # told when loading turns to warming
    on_state: Callable[["WorkerProcess"], None] | None = None  # told after every state change
    ready_info: dict[str, Any] = field(default_factory=dict)  # the last `ready` handshake
    last_used: float = field(default_factory=time.monotonic)
    scheduling: Scheduling = field(default_factory=Scheduling)  # for its direct channels
    channels: int = 0  # direct channels open (as the worker last reported)
    by_uid: Counter[int] = field(default_factory=Counter)  # the same, by the client's uid
    on_stats: Callable[[dict[str, Any]], None] | None = None  # its batches, as it reports
    # told of the error each request it was running when it died was answered with
    on_failed: Callable[[MoltError], Any] | None = None
    queued: int = 0  # requests waiting in its queue, as it last reported
    queued_by_priority: dict[str, int] = field(default_factory=dict)
    exits: Exits | None = None  # told how each READY process ended, for its channels' clients

    def __post_init__(self) -> None:
        self.log = log.bind(model=self.spec.model, version=self.spec.version)
        self._ids = itertools.count(1)
        self._oom_kills = 0  # the group's count when the current process started
        self._inflight: dict[int, Done] = {}
        self._orphans: dict[int, Callable[[], None]] = {}  # relayed, not started yet
        self._idle = asyncio.Event()  # set while nothing is in flight
        self._idle.set()
        self._handshake: asyncio.Future[dict[str, Any]] | None = None
        # a stateful model's sessions as its worker last reported them (worker/sessions.py)
        self.sessions: dict[str, int] | None = None
        self.cache_held = (0, 0)  # its result cache's bytes and entries, as last reported
        self._asked: dict[int, asyncio.Future[dict[str, Any]]] = {}  # questions, by number
        self._asks = itertools.count(1)
        self._channel: _Link | None = None
        self._handoff: socket.socket | None = None  # direct channels' ends go to it this way
        self._no_channels = asyncio.Event()
        self._no_channels.set()
        self._refusals = Throttled(self._log_refusals)
        self._proc: asyncio.subprocess.Process | None = None
        self._stop = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._requests: _RelayLink | None = None  # the relay: socket requests go this way
        self._output: asyncio.Task[None] | None = None
        # how the daemon killed the current process, and the code its requests get
        self._killed: tuple[str, ErrorCode] | None = None
        self._unseen: set[int] = set()  # relayed requests of the daemon's own (health checks)
        self._beat_at = 0.0  # monotonic time of its latest heartbeat
        self._oldest_run: float | None = None  # its oldest run's age at that beat

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def serving(self) -> bool:
        """READY with its channel open: a worker that just died is READY until it is reaped,
        but its channel closed first."""
        return self.state is S.READY and self.serving_channel()

    @property
    def shown_state(self) -> WorkerState:
        """What status says: a READY worker whose channel closed has died, not yet reaped."""
        if self.state is S.READY and not self.serving_channel():
            return S.BACKOFF
        return self.state

    def serving_channel(self) -> bool:
        return all(link and link.transport and not link.transport.is_closing()
                   for link in (self._channel, self._requests))  # fmt: skip

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._enter(S.STARTING)  # now, not when the task first runs: status shows it at once
        self._task = asyncio.get_running_loop().create_task(self._supervise())
        self._task.add_done_callback(self._supervision_ended)

    def _supervision_ended(self, task: "asyncio.Task[None]") -> None:
        """A bug in supervising must be seen, and must not leave a worker shown serving."""
        if task.cancelled() or task.exception() is None:
            return
        self.log.error("model {model} {version}: supervising the worker failed",
                       exc_info=task.exception())  # fmt: skip
        self.error = f"supervising the worker failed: {task.exception()!r}"
        if self._proc and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)
        self.state = S.FATAL  # the transition table has no arc for a bug; say it cannot serve
        if self.on_state:
            self.on_state(self)

    async def _supervise(self) -> None:
        failures = 0
        while not self._stop.is_set():
            if self.state is not S.STARTING:  # start() entered it for the first spawn
                await self._set(S.STARTING)
            try:
                ready = await self._spawn_and_load()
            except OSError as exc:  # fork/exec, socketpair or cgroup placement refused
                self.error = f"cannot start a worker: {exc}"
                self.log.error("model {model} {version}: {error}", error=self.error)
                await self._kill_and_reap()
                ready = False
            if ready:
                await self._proc_exit()
            if self.state is S.FATAL:
                return
            if self._stop.is_set():
                break
            failures = 1 if self._was_stable() else failures + 1
            if failures >= self.settings.restart.max_failures:
                await self._set(S.FATAL)
                self.log.error(
                    "model {model} {version} failed {failures} times in a row; not restarting",
                    failures=failures,
                    error=self.error,
                )
                return
            await self._backoff(failures)
        await self._set(S.STOPPED)

    async def _spawn_and_load(self) -> bool:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        relay, relayed = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._close_handoff()
        # one message per descriptor handed over: a datagram cannot merge two of them
        self._handoff, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        loop = asyncio.get_running_loop()
        self.signature, self.started_at = None, None
        ends = (child, theirs, relayed)
        self.counters.starts += 1
        try:
            with child, theirs, relayed:
                self._proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "moltbotd.worker",
                    *(str(end.fileno()) for end in ends),
                    pass_fds=[end.fileno() for end in ends],
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
            self.pid = self._proc.pid
            # kept so the relay task is not garbage-collected while it runs
            self._output = loop.create_task(self._relay_output(self._proc))
            if self.cgroup:  # before the model loads, so the load is limited and accounted
                self._oom_kills = self.cgroup.oom_kills()
                self.cgroup.add(self.pid)
        except OSError:
            parent.close()
            relay.close()
            raise
        _, self._channel = await loop.create_unix_connection(lambda: _Link(self), sock=parent)
        _, self._requests = await loop.create_unix_connection(lambda: _RelayLink(self), sock=relay)
        self._handshake = loop.create_future()
        spec = {"path": str(self.spec.path), **asdict(self.spec.session),
                "samples": list(self.spec.samples), "batched": self.spec.batched,
                "state": list(self.spec.state), "sessions_dir": str(self.spec.sessions_dir),
                "heartbeat": self.settings.heartbeat,
                "direct": {"model": self.spec.model, "version": self.spec.version,
                           "max_frame_bytes": self.spec.max_frame_bytes,
                           "histograms": self.spec.histograms,
                           "slow_request": self.spec.slow_request,
                           "scheduling": asdict(self.scheduling)}}  # fmt: skip
        self._channel.transport.write(encode_frame(spec))  # type: ignore[union-attr]
        self.log.info("model {model} {version} starting", pid=self.pid)
        return await self._await_handshake()

    async def _await_handshake(self) -> bool:
        assert self._handshake is not None
        assert self._proc is not None
        exited = asyncio.ensure_future(self._proc.wait())
        done, _ = await asyncio.wait(
            {self._handshake, exited},
            timeout=self.settings.start_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        exited.cancel()
        if self._stop.is_set():  # stop() may have come before there was a process to kill
            await self._kill_and_reap()
            return False
        if self._handshake.done() and "ready" in self._handshake.result():
            self._became_ready(self._handshake.result()["ready"])
            await self._set(S.READY)
            return True
        if self._handshake.done():  # the worker said its model cannot load
            self.error = f"cannot load {self.spec.path}: {self._handshake.result()['failed']}"
            self.log.error(
                "model {model} {version} failed to load",
                error=self.error,
            )
            await self._kill_and_reap()
            if self._stop.is_set():  # stopped meanwhile: STOPPING, not FATAL
                return False
            await self._set(S.FATAL)
            return False
        await self._kill_and_reap()
        if done:
            reason, _ = self._exit_reason(self._proc.returncode or 0)
            self.error = f"worker pid {self.pid} {reason} while loading its model"
        else:
            self.error = f"did not report ready within {self.settings.start_timeout:g}s"
        self.log.error(
            "model {model} {version} failed to start",
            error=self.error,
        )
        return False

    def _became_ready(self, info: dict[str, Any]) -> None:
        self.signature = Signature.from_wire(info["signature"])
        self.providers = info["providers"]
        self.ready_info = info
        self.started_at = time.monotonic()
        self.error = None
        self.log.info(
            "Model {model} {version} loaded",
            pid=self.pid,
            providers=",".join(self.providers),
            load_ms=round(info["load_seconds"] * 1e3, 1),
            warmup_ms=round(info["warmup_seconds"] * 1e3, 1),
            samples=info["samples"],
        )
        if info["warmup_error"]:
            self.log.warning("model {model} {version}: warm-up run on zeros failed: {error}",
                             error=info["warmup_error"])  # fmt: skip
        if self.spec.session.device == "cuda" and "CUDAExecutionProvider" not in self.providers:
            self.log.warning(
                "model {model} {version}: CUDA is not available, running on CPU",
            )

    async def _proc_exit(self) -> None:
        """Wait for the READY process to end (a stop, or a death), then account for it."""
        code = await self._watch()
        self._set_channels(0)  # the kernel closed its ends: the clients see EOF
        reason, error_code = self._exit_reason(code)
        died = self.state in (S.READY, S.DRAINING) and not self._stop.is_set()
        if died and self.state is S.READY:
            # leave READY before failing what was in flight: those answers pump the queue,
            # which must not pick this worker again
            await self._set(S.BACKOFF)
        why = f"{self.label}: worker pid {self.pid} {reason} while running this request"
        error = MoltError(error_code, why, {"model": self.spec.model, "version": self.spec.version})
        if self.exits and self.pid is not None:
            self.exits.record(self.spec.model, self.pid, error)
        self._fail_inflight(error)
        if died:
            self.error = f"worker pid {self.pid} {reason}"
            self.log.error(
                "model {model} {version} worker died",
                pid=self.pid,
                reason=reason,
            )
            if self.state is S.DRAINING:
                self._stop.set()

    # --- liveness ---------------------------------------------------------------------------

    async def _watch(self) -> int:
        """Wait for the READY process to exit, killing it if it hangs; its exit code."""
        assert self._proc is not None
        self._killed = None
        self._beat_at, self._oldest_run = time.monotonic(), None
        if self._handoff:
            asyncio.get_running_loop().add_reader(self._handoff.fileno(), self._read_beats)
        while True:
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(self._proc.wait(), self.settings.heartbeat)
            if not self._killed and (why := self._why_hung()):
                self._hang(why)

    def _read_beats(self) -> None:
        """Take every heartbeat waiting (the latest counts); EOF ends the watch on it."""
        while self._handoff:
            try:
                data = self._handoff.recv(64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close_handoff()
                return
            self._beat_at, self._oldest_run = time.monotonic(), msgpack.unpackb(data)["beat"]

    def _why_hung(self) -> str | None:
        self._read_beats()  # beats our own busy loop did not read yet are not silence
        silent = time.monotonic() - self._beat_at
        if self._stop.is_set() or self.state is not S.READY:
            return None  # stopping or draining: stop_timeout and drain_timeout decide
        if silent > self.settings.hung_after:
            return f"no heartbeat for {silent:.1f}s: stopped or deadlocked"
        run = (self._oldest_run or 0.0) + silent
        if self._oldest_run is not None and run > self.scheduling.run_timeout:
            return f"a run took {run:.1f}s, over run_timeout {self.scheduling.run_timeout:g}s"
        return None

    def _hang(self, why: str) -> None:
        """Kill a hung worker (SIGKILL reaches a stopped process too); _watch reaps it."""
        self.log.error("model {model} {version} worker hung; killing it", pid=self.pid, why=why)
        self._kill(f"as hung ({why})", ErrorCode.WORKER_HUNG)

    def restart(self, why: str) -> bool:
        """Kill a serving process that must start over (its health checks fail): it is
        restarted as one that died, its running requests get WORKER_FAILED saying why.
        False when it is not serving, or on its way out already."""
        if self.state is not S.READY or self._killed or self._proc is None:
            return False
        self.log.error("model {model} {version}: restarting worker pid {pid}: {why}",
                       pid=self.pid, why=why)  # fmt: skip
        self._kill(f"by moltbotd to restart it ({why})", ErrorCode.WORKER_FAILED)
        return True

    def _kill(self, how: str, code: ErrorCode) -> None:
        self._killed = (how, code)
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGKILL)

    def _close_handoff(self) -> None:
        if self._handoff:
            with contextlib.suppress(ValueError, OSError):  # never registered, or closed
                asyncio.get_running_loop().remove_reader(self._handoff.fileno())
            self._handoff.close()
            self._handoff = None

    def _was_stable(self) -> bool:
        up = self.started_at is not None and time.monotonic() - self.started_at
        return bool(up and up >= self.settings.restart.stable_after)

    async def _backoff(self, failures: int) -> None:
        if self.state is not S.BACKOFF:
            await self._set(S.BACKOFF)
        delay = min(
            self.settings.restart.backoff * 2 ** (failures - 1), self.settings.restart.backoff_max
        )
        self.counters.restarts += 1
        self.log.warning(
            "model {model} {version} restarting in {delay:g}s",
            delay=delay,
            failures=failures,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)

    async def stop(self) -> None:
        """Stop for good: close the channel, give the process stop_timeout, then SIGKILL."""
        self._stop.set()
        if self.state in (S.READY, S.DRAINING, S.STARTING):
            await self._set(S.STOPPING)
            await self._kill_and_reap(grace=self.settings.stop_timeout)
        if self._task:
            await self._task
        if self.state is S.FATAL:
            await self._set(S.STOPPED)

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests, send the direct channels' clients elsewhere, wait for what
        is in flight and for the channels to close; False if the deadline passed."""
        if self.state is S.READY:
            await self._set(S.DRAINING)
        self.close_channels("the version is being replaced", timeout)
        if self.spec.state and self.serving_channel():  # its sessions, to the next version
            self._channel.transport.write(encode_frame({"hand_over": True}))  # type: ignore[union-attr]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # one deadline for both
                await self._idle.wait()
                await self._no_channels.wait()
        return not self._inflight and not self.channels

    # --- direct channels ----------------------------------------------------------------

    def attach(self, sock: socket.socket, uid: int) -> None:
        """Hand the worker its end of a direct channel for a client of `uid` (ours is
        closed by the caller), within max_channels and max_channels_per_uid."""
        if self.state is not S.READY or self._handoff is None:
            raise self.unavailable()
        if why := channel_refusal(uid, self.by_uid, asdict(self.scheduling)):
            raise self._refuse_channel(why)
        try:  # never wait on the loop for a worker that is not reading its handoffs
            socket.send_fds(self._handoff, [HANDOFF.pack(uid)], [sock.fileno()],
                            socket.MSG_DONTWAIT)  # fmt: skip
        except BlockingIOError:
            raise self._refuse_channel("it has not yet taken the channels handed to it") from None
        except (BrokenPipeError, ConnectionResetError):  # it exited: no one reads there
            raise self.unavailable() from None
        except OSError as exc:  # ENOBUFS, ETOOMANYREFS...: this channel only
            raise self._refuse_channel(f"its handoff failed: {exc.strerror or exc}") from None
        self.by_uid[uid] += 1
        self._set_channels(self.channels + 1)

    def _refuse_channel(self, why: str) -> MoltError:
        self._refusals.add(why)
        return MoltError(ErrorCode.RESOURCE_EXHAUSTED, f"{self.label}: {why}; send its"
                         " requests to this socket", {"reason": why})  # fmt: skip

    def _log_refusals(self, why: str, count: int) -> None:
        self.log.warning("refused {count} direct channel(s) since the last warning: {why}",
                         count=count, why=why)  # fmt: skip

    def close_channels(self, why: str, within: float) -> None:
        """Ask the worker to send its channels' clients back to moltbotd's socket."""
        if self.channels and self.serving_channel():
            message = {"close_channels": why, "within": within}
            self._channel.transport.write(encode_frame(message))

    async def ask(self, order: dict[str, Any]) -> dict[str, Any]:
        """A question for the worker (its sessions), answered on the control socket."""
        if self.state is not S.READY or not self.serving_channel():
            raise self.unavailable()
        number = next(self._asks)
        self._asked[number] = answer = asyncio.get_running_loop().create_future()
        try:
            self._channel.transport.write(encode_frame({"ask": number, **order}))  # type: ignore[union-attr]
            async with asyncio.timeout(ASK_TIMEOUT):
                reply = await answer
        except TimeoutError:
            raise MoltError(ErrorCode.WORKER_HUNG, f"{self.label} (pid {self.pid}) did not"
                            f" answer within {ASK_TIMEOUT:.0f}s") from None  # fmt: skip
        finally:
            del self._asked[number]
        if "error" in reply:
            raise MoltError(ErrorCode.BAD_REQUEST, f"{self.label}: {reply['error']}")
        return reply["result"]

    def set_scheduling(self, scheduling: Scheduling) -> None:
        self.scheduling = scheduling
        if self.state is S.READY and self.serving_channel():
            message = {"scheduling": asdict(scheduling)}
            self._channel.transport.write(encode_frame(message))

    def _set_channels(self, count: int) -> None:
        self.channels = count
        if count:
            self._no_channels.clear()
        else:
            self.by_uid.clear()
            self._no_channels.set()

    def _stats(self, stats: dict[str, Any]) -> None:
        """The worker's counts since its last report: its direct requests, its batches and
        its queue."""
        self.counters.requests += stats["requests"]
        self.counters.errors += stats["errors"]
        if stats["requests"]:
            self.last_used = time.monotonic()
        self._set_channels(stats["channels"])
        self.by_uid = Counter(stats["by_uid"])
        if "queued" in stats:  # a refused channel's report says nothing of the queue
            self.queued, self.queued_by_priority = stats["queued"], stats["by_priority"]
        if "sessions" in stats:
            self.sessions = stats["sessions"]
        if "cache" in stats:
            cache = stats["cache"]
            self.counters.cache_hits += cache["hits"]
            self.counters.cache_misses += cache["misses"]
            self.cache_held = (cache["bytes"], cache["entries"])
        if self.on_stats:
            self.on_stats(stats)

    async def _kill_and_reap(self, grace: float = 0.0) -> None:
        for link in (self._channel, self._requests):
            if link and link.transport:
                link.transport.close()  # EOF: a healthy worker exits on its own
        self._close_handoff()
        self._set_channels(0)  # the process closes them as it ends
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            if grace:
                self.log.warning(
                    "model {model} {version} did not stop within {grace:g}s; killing it",
                    grace=grace,
                    pid=proc.pid,
                )
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            await proc.wait()

    async def _set(self, new: WorkerState) -> None:
        self._enter(new)
        await self._notify()

    def _enter(self, new: WorkerState) -> None:
        check_transition(self.state, new)
        old, self.state = self.state, new
        self.log.debug("model {model} {version} {old} -> {new}", old=str(old), new=str(new))
        if self.on_state:
            self.on_state(self)

    async def wait_ready(self, timeout: float) -> None:
        """Wait while the worker starts or backs off; raise if it cannot serve."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(
                        lambda: (
                            self.state not in (S.STARTING, S.BACKOFF, S.STOPPED)
                            or self._stop.is_set()
                        )
                    ),
                    timeout,
                )
        if self.state is not S.READY:
            raise self.unavailable()

    def unavailable(self) -> MoltError:
        why = f": {self.error}" if self.error else ""
        return MoltError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"{self.label} is not serving (worker {self.state}){why}",
            {"model": self.spec.model, "version": self.spec.version, "state": self.state.value},
        )

    # --- requests ----------------------------------------------------------------------

    def relay(self, params: dict[str, Any], done: Done, orphaned: Callable[[], None],
              counted: bool = True) -> None:  # fmt: skip
        """Relay a socket request (an infer's params, its model and version set) to the
        worker's queue; done(outcome) gets its packed outputs or its error, a MoltError
        if the process dies while it runs; orphaned() is told instead if the process dies
        before it started (it may run elsewhere). A request not `counted` (the daemon's
        own: a health check) is left out of the counters and does not make it used."""
        if not self.serving:
            raise self.unavailable()
        relay_id = next(self._ids)
        if counted:
            self.last_used = time.monotonic()
        else:
            self._unseen.add(relay_id)
        self._inflight[relay_id] = done
        self._orphans[relay_id] = orphaned
        self._idle.clear()
        message = {"id": relay_id, "op": "infer", "params": params}
        self._requests.send(encode_frame(message))  # type: ignore[union-attr]

    def on_answer(self, answer: Parsed) -> None:
        """A relayed request's answer; one the worker refused (never queued) is counted
        nowhere, as on a direct channel."""
        relay_id, ending, outcome = answer
        if ending is Ending.STARTED:
            for started in outcome:  # type: ignore[union-attr]
                self._orphans.pop(started, None)
            return
        self._orphans.pop(relay_id, None)
        done = self._inflight.pop(relay_id, None)
        if relay_id in self._unseen:
            self._unseen.discard(relay_id)
        elif ending is not Ending.REFUSED:
            self.counters.requests += 1
            self.counters.errors += ending is Ending.FAILED
        if not self._inflight:
            self._idle.set()
        if done:
            done(outcome)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def on_message(self, message: dict[str, Any] | MoltError) -> None:
        if isinstance(message, MoltError):
            self.log.error("model {model} {version} sent a bad frame", error=str(message))
            return
        if "stats" in message:
            self._stats(message["stats"])
        elif "phase" in message:
            if self.on_phase:
                self.on_phase(message["phase"])
        elif "answer" in message:
            answer = self._asked.get(message["answer"])
            if answer is not None and not answer.done():
                answer.set_result(message)
        elif self._handshake and not self._handshake.done():
            self._handshake.set_result(message)

    def _exit_reason(self, code: int) -> tuple[str, ErrorCode]:
        """How the process ended; a kill by the kernel's OOM killer in its group says so."""
        if self._killed:
            how, error_code = self._killed
            return f"was killed {how}", error_code
        if code == -signal.SIGKILL and self.cgroup and self.cgroup.oom_kills() > self._oom_kills:
            limit = memory_limit_text(self.spec.limits)
            return f"was killed by its memory limit {limit}", ErrorCode.RESOURCE_EXHAUSTED
        return _describe_exit(code), ErrorCode.WORKER_FAILED

    def _fail_inflight(self, error: MoltError) -> None:
        """Answer what ran when the process died with `error` (one instance each); what
        never ran goes back to the pool's queue."""
        inflight, self._inflight = self._inflight, {}
        orphans, self._orphans = self._orphans, {}
        for answer in self._asked.values():
            if not answer.done():
                answer.set_exception(MoltError(error.code, error.message, error.details))
        unseen, self._unseen = self._unseen, set()
        self._idle.set()
        self.queued, self.queued_by_priority = 0, {}  # the process is gone, its queue too
        # the latest first: each orphan goes back to the front of the pool's queue
        for relay_id, done in reversed(inflight.items()):
            try:
                if relay_id in orphans:  # it never ran: it may run on the next process
                    orphans[relay_id]()
                    continue
                failed = MoltError(error.code, error.message, error.details)
                if relay_id not in unseen:
                    self.counters.errors += 1
                    if self.on_failed:
                        self.on_failed(failed)
                done(failed)
            except Exception:  # one answer's failure must not lose the others' or kill us
                self.log.exception("model {model} {version}: answering a failed request raised")

    async def _relay_output(self, proc: asyncio.subprocess.Process) -> None:
        """onnxruntime and Python write to the worker's stdout/stderr: log it, tagged."""
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.log.warning("{line}", line=line, pid=proc.pid)

    def status(self) -> dict[str, Any]:
        up = time.monotonic() - self.started_at if self.started_at else None
        return {
            "version": self.spec.version,
            "state": self.shown_state.value,
            "pid": self.pid,
            "error": self.error,
            "providers": self.providers,
            "inflight": self.inflight,
            # relayed requests its worker said it runs (the others wait in its queue)
            "running": len(self._inflight) - len(self._orphans),
            "channels": self.channels,
            "uptime": up if self.state in (S.READY, S.DRAINING) else None,
            "requests": self.counters.requests,
            "errors": self.counters.errors,
            "restarts": self.counters.restarts,
            "signature": self.signature.to_wire() if self.signature else None,
            "sessions": self.sessions,
            "session": asdict(self.spec.session),
            "limits": describe(self.spec.limits, self.spec.memory_auto),
        }


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
