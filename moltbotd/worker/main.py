"""The worker process: `python -m moltbotd.worker CONTROL HANDOFF RELAY` owns one
onnxruntime session.

Spawned as a fresh interpreter (never forked from the threaded daemon), with three
socket ends from the supervisor. On CONTROL it gets one `load` message, says it is
`warming` once the model loaded, answers `ready` with the model's signature or `failed`
with the loader's or a warm-up sample's error, then takes orders (close the direct
channels, new scheduling settings) and sends its counts until CONTROL closes. HANDOFF
brings direct channels (and carries the heartbeat back); RELAY brings the requests of
moltbotd's socket. Its intake and lanes (lanes.py) serve RELAY and the direct channels
alike, from one queue (hub.py).
"""

import contextlib
import functools
import itertools
import selectors
import signal
import socket
import threading
import time
from dataclasses import dataclass
from operator import methodcaller
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from moltbotd.lifeline import die_with_parent
from moltbotd.malloc import keep_freed_memory
from moltbotd.scheduler import Pending
from moltbotd.wire.handoff import HANDOFF
from moltbotd.wire.protocol import (
    RECV_BYTES,
    STRING_DTYPE,
    WIRE_DTYPES,
    ErrorCode,
    FrameDecoder,
    MoltError,
    decode_tensor,
    encode_frame,
    encode_value,
    join_tensors,
    split_tensor,
)
from moltbotd.wire.signature import Signature, check_inputs, spec_from_ort
from moltbotd.worker import heartbeat
from moltbotd.worker.direct import Channels, Poller, RelayStream, Stream
from moltbotd.worker.hub import Hub
from moltbotd.worker.lanes import Done, Lanes, Place, Result
from moltbotd.worker.sessions import Janitor, Sessions, State, StateError, StateSpec, resolve
from moltbotd.worker.sessions import state_key as key_of

Job = tuple[dict[str, Any], list[str] | None, Place, State | None]  # inputs, outputs, place
EXIT_LOAD_FAILED = 3  # gunicorn's idea: a model that cannot load is not a crash to retry
_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


class DaemonLink:
    """Blocking frame I/O over the control socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # The daemon enforces max_frame_bytes on clients; here any frame the header allows.
        self.decoder = FrameDecoder(2**32 - 1)
        self.pending: list[Any] = []
        self.lock = threading.Lock()

    def receive(self) -> dict[str, Any] | None:
        messages = self.receive_all()
        if messages is None:
            return None
        message, self.pending = messages[0], messages[1:]
        return message

    def receive_all(self) -> list[dict[str, Any]] | None:
        """Every message that has arrived (waiting for one at least); None at EOF."""
        while not self.pending:
            data = self._read()
            if not data:
                return None
            self.pending.extend(self.decoder.feed(data))
        messages, self.pending = self.pending, []
        for message in messages:
            if isinstance(message, MoltError):
                raise message  # the supervisor wrote a bad frame: a bug, so die loudly
        return messages

    def receive_ready(self) -> list[dict[str, Any]] | None:
        """The whole messages one read brings (the socket is readable: it does not
        block), maybe none; None at EOF."""
        data = self._read()
        if not data:
            return None
        self.pending.extend(self.decoder.feed(data))
        return self.receive_all() if self.pending else []

    def _read(self) -> bytes:
        """What arrived; b"" at EOF. A daemon that closes the channel while our reports
        wait unread in it resets it: that is its EOF too, not a crash."""
        try:
            return self.sock.recv(RECV_BYTES)
        except ConnectionResetError:
            return b""

    def send(self, *messages: dict[str, Any]) -> None:
        """One write for all of them: a syscall costs more than the bytes. Lanes send
        their reports too: the lock keeps each write whole."""
        data = b"".join(map(encode_frame, messages))
        with self.lock:
            self.sock.sendall(data)


def load_session(spec: dict[str, Any]) -> tuple[Any, list[str]]:
    ort.disable_telemetry_events()
    ort.set_default_logger_severity(3)  # errors only: ort's warnings are noise in the journal
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["intra_op_threads"]
    options.inter_op_num_threads = spec["inter_op_threads"]
    spinning = "1" if spec["spinning"] else "0"
    for pool in ("intra_op", "inter_op"):
        options.add_session_config_entry(f"session.{pool}.allow_spinning", spinning)
    options.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, _OPT_LEVELS[spec["graph_optimization"]]
    )
    providers = ["CPUExecutionProvider"]
    if spec["device"] == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(spec["path"], options, providers=providers)
    return session, session.get_providers()


@dataclass(frozen=True)
class Served:
    """The loaded session and what a run asks of it: the outputs a client gets by
    default, and a stateful model's state pairs and sessions."""

    session: Any
    names: list[str]  # every output (asked for once: onnxruntime builds its list anew)
    states: tuple[StateSpec, ...] = ()
    sessions: Sessions | None = None

    @functools.cached_property
    def shown(self) -> list[str]:
        """The outputs a client gets when it names none: all but the state's."""
        feeding = {spec.output for spec in self.states}
        return [name for name in self.names if name not in feeding]

    def outputs(self, wanted: list[str] | None) -> tuple[list[str], list[str] | None]:
        """The outputs answered, and those the run asks for (None: all of them)."""
        shown = wanted or self.shown
        if not self.states:
            return shown, wanted or None
        return shown, shown + [s.output for s in self.states if s.output not in shown]

    def run(self, inputs: dict[str, Any], wanted: list[str] | None,
            state: State | None) -> tuple[dict[str, Any], State | None]:  # fmt: skip
        """The outputs a client asked for, encoded, and the session's next state."""
        feeds = {name: decode_tensor(t) for name, t in inputs.items()}
        if state:
            feeds.update(state)
        shown, asked = self.outputs(wanted)
        values = dict(zip(asked or self.names, self.session.run(asked, feeds), strict=True))
        following = {s.input: values[s.output] for s in self.states} if self.states else None
        return {name: encode_value(values[name]) for name in shown}, following


def classify(exc: Exception) -> ErrorCode:
    # onnxruntime raises InvalidArgument for inputs the model rejects at run time
    return (
        ErrorCode.INVALID_INPUT if isinstance(exc, InvalidArgument) else ErrorCode.INFERENCE_FAILED
    )


def run_samples(served: Served, signature: Signature, samples: list[dict[str, Any]]) -> None:
    """Run model.yaml's warm-up samples (a stateful model's from its first state); a sample
    that fails means the version is broken."""
    first = served.sessions.initial() if served.sessions else None
    for number, sample in enumerate(samples, 1):
        where = f"warm-up sample {number} of {len(samples)}"
        try:
            served.run(check_inputs(where, signature, sample), None, first)
        except MoltError as exc:
            raise LoadFailed(exc.message) from None
        except Exception as exc:
            raise LoadFailed(f"{where} failed: {type(exc).__name__}: {exc}") from None


class LoadFailed(Exception):
    """The model cannot serve: its file does not load, or a warm-up sample fails."""


def warm_up(session: Any, signature: Signature) -> str | None:
    """Without samples: one run on zeros shaped by the signature (dynamic dimensions as 1),
    so the first request does not pay for onnxruntime's lazy initialisation; returns why
    it failed (a model may reject zeros yet serve real inputs: the caller decides)."""
    if any(spec.dtype is None for spec in signature.inputs):
        return "skipped: an input is not a tensor"
    feeds = {
        spec.name: np.zeros(
            [d if isinstance(d, int) else 1 for d in spec.shape or ()],
            dtype=object if spec.dtype == STRING_DTYPE else WIRE_DTYPES[spec.dtype],
        )
        for spec in signature.inputs
    }
    for spec in signature.inputs:
        if spec.dtype == STRING_DTYPE:
            feeds[spec.name].fill("")
    try:
        session.run(None, feeds)
    except Exception as exc:  # a model may reject zeros: it still serves real inputs
        return f"{type(exc).__name__}: {exc}"
    return None


def serve(channel: DaemonLink, handoff: socket.socket, lanes: Lanes,
          settings: dict[str, Any]) -> None:  # fmt: skip
    """Take the daemon's orders and open the direct channels it hands over, for the lanes,
    until the control channel closes. `settings`: the channels' (max_frame_bytes,
    scheduling)."""
    poller = Poller()
    poller.selector.register(channel.sock, selectors.EVENT_READ, channel)
    poller.selector.register(handoff, selectors.EVENT_READ, handoff)
    handoff.setblocking(False)  # read until empty (recv_fds ignores MSG_DONTWAIT)
    while True:
        # channels handed over first: an order to close channels must find them attached
        for source in sorted(poller.wait(None), key=lambda source: source is not handoff):
            if source is handoff:
                take_handoffs(poller, handoff, lanes, settings["max_frame_bytes"])
            elif (messages := channel.receive_ready()) is None:
                return
            else:
                for message in messages:
                    obey(lanes, message, channel)


def take_handoffs(poller: Poller, handoff: socket.socket, lanes: Lanes, max_frame: int) -> None:
    """Open every channel the daemon handed over (offer its region; one per datagram,
    with its client's uid) and give each to a lane, unless it is past the bounds. The
    handoff socket does not block."""
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(handoff, HANDOFF.size, 1)
        except BlockingIOError:
            return
        for fd in fds:
            sock, [uid] = socket.socket(fileno=fd), HANDOFF.unpack(data)
            if not lanes.refused(sock, uid):
                lanes.attach(Stream(sock, max_frame, uid))
        if not data:  # the daemon is stopping us: its channel's EOF follows
            poller.selector.unregister(handoff)
            return


def obey(lanes: Lanes, message: dict[str, Any], channel: DaemonLink) -> None:
    """An order from the daemon, for the direct channels, the whole queue or the
    sessions (those are questions: the answer carries the order's `ask`)."""
    if "close_channels" in message:
        lanes.tell(methodcaller("close_all", message["close_channels"], message["within"]))
    elif "scheduling" in message:
        lanes.configure(message["scheduling"])
    elif "hand_over" in message and lanes.hub.sessions:
        lanes.hub.sessions.handing_over = True  # the janitor spills each session it can
    elif "sessions" in message:
        channel.send({"answer": message["ask"], **ask_sessions(lanes.hub.sessions,
                                                               message["sessions"])})  # fmt: skip


def ask_sessions(sessions: Sessions | None, order: dict[str, Any]) -> dict[str, Any]:
    """`sessions` (list), `end_session`, `reset_session`: the result, or the error."""
    if sessions is None:
        return {"error": "it keeps no sessions: its model.yaml declares no `state:`"}
    if "list" in order:
        return {"result": sessions.describe(order["list"])}
    found = sessions.end(order["session"], reset=order["reset"])
    return {"result": {"session": order["session"], "found": found}}


def run_batch(served: Served, batch: list[Pending], concat: bool) -> list[Done]:
    """Each request's result, and what keeps its session's next state: run one by one,
    or concatenated and run once."""
    sessions = served.sessions
    if sessions is None:
        jobs = [(item.inputs, item.outputs, item.place, None) for item in batch]
        return [(result, None) for result, _ in run_jobs(served, jobs, concat)]
    done: list[Done | None] = [None] * len(batch)
    taken, jobs = [], []
    for number, item in enumerate(batch):
        try:
            state, generation = sessions.checkout(item.conversation)
        except MoltError as exc:  # lost, or held by a worker that does not let go
            done[number] = ({"code": exc.code, "message": exc.message}, None)
            continue
        taken.append((number, item.conversation, generation))
        jobs.append((item.inputs, item.outputs, item.place, state))
    for (number, conv, generation), (result, state) in zip(
        taken, run_jobs(served, jobs, concat), strict=True
    ):
        done[number] = keep_state(sessions, conv, generation, result, state)
    return done  # type: ignore[return-value]


def keep_state(sessions: Sessions, conv: Any, generation: int, result: Result,
               state: State | None) -> Done:  # fmt: skip
    """A stateful request's result, and what keeps its next state once it is answered."""
    if conv is None or state is None or not isinstance(result, bytes):
        return result, None
    if (error := sessions.too_big(conv.id, state)) is not None:
        return {"code": error.code, "message": error.message}, None
    return result, functools.partial(sessions.commit, conv, state, generation)


def run_jobs(served: Served, jobs: list[Job], concat: bool) -> list[tuple[Result, State | None]]:
    if concat and len(jobs) > 1:
        # one request may be at fault: then each runs alone, so only it fails
        with contextlib.suppress(Exception):
            return run_together(served, jobs)
    return [run_one(served, *job) for job in jobs]


def run_one(served: Served, inputs: dict[str, Any], wanted: list[str] | None, place: Place,
            state: State | None) -> tuple[Result, State | None]:  # fmt: skip
    try:
        outputs, following = served.run(inputs, wanted or None, state)
        return pack(outputs, place), following
    except Exception as exc:  # a failed run is the request's error, not the worker's
        return {"code": classify(exc), "message": str(exc)}, None


def run_together(served: Served, jobs: list[Job]) -> list[tuple[Result, State | None]]:
    """Concatenate along the first dimension (states too), run once, split every output
    back."""
    shown, asked = served.outputs(jobs[0][1] or None)
    feeds = {name: join_tensors([job[0][name] for job in jobs]) for name in jobs[0][0]}
    for name in jobs[0][3] or ():
        feeds[name] = np.concatenate([job[3][name] for job in jobs])  # type: ignore[index]
    rows = [next(iter(inputs.values()))["shape"][0] for inputs, _, _, _ in jobs]
    values = dict(zip(asked or served.names, served.session.run(asked, feeds), strict=True))
    total = sum(rows)
    if not all(isinstance(v, np.ndarray) and v.shape[:1] == (total,) for v in values.values()):
        raise ValueError("an output does not have the batch as its first dimension")
    parts = zip(*(split_tensor(values[name], rows) for name in shown), strict=True)
    ends = list(itertools.accumulate(rows))[:-1]
    states = [dict(zip([s.input for s in served.states], slices, strict=True))
              for slices in zip(*(np.split(values[s.output], ends) for s in served.states),
                                strict=True)] or [None] * len(jobs)  # fmt: skip
    return [
        (pack(dict(zip(shown, maps, strict=True)), job[2]), _copied(state))
        for maps, job, state in zip(parts, jobs, states, strict=True)
    ]


def _copied(state: State | None) -> State | None:
    """A session's rows on their own: a view would keep the whole batch's output alive."""
    return None if state is None else {name: value.copy() for name, value in state.items()}


def pack(outputs: dict[str, Any], place: Place) -> bytes:
    """A request's outputs as its answer carries them: large ones in its channel's region
    when it asked for that (`place`)."""
    return msgpack.packb(place(outputs) if place else outputs)


def main(argv: list[str]) -> int:
    die_with_parent()
    keep_freed_memory()
    # Ctrl-C in a terminal reaches the whole process group: the daemon decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = DaemonLink(socket.socket(fileno=int(argv[1])))
    handoff = socket.socket(fileno=int(argv[2]))
    relay = socket.socket(fileno=int(argv[3]))
    spec = channel.receive()
    if spec is None:
        return 0
    try:
        return load_and_serve(channel, handoff, relay, spec)
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the daemon closed our channel (it stopped us while loading): not a crash


def load_and_serve(channel: DaemonLink, handoff: socket.socket, relay: socket.socket,
                   spec: dict[str, Any]) -> int:  # fmt: skip
    try:
        served, signature, ready = load_and_warm(channel, spec)
    except LoadFailed as exc:
        channel.send({"failed": str(exc)})
        return EXIT_LOAD_FAILED
    channel.send({"ready": ready})
    runs = heartbeat.Runs()
    runner = runs.track(functools.partial(run_batch, served))
    heartbeat.start(handoff, runs, spec["heartbeat"])
    settings = spec["direct"]
    hub = Hub(f"model {settings['model']} {settings['version']}", settings["scheduling"],
              settings["histograms"], settings["slow_request"])  # fmt: skip
    hub.sessions = served.sessions
    janitor = Janitor(served.sessions, hub.note_locked) if served.sessions else None
    channels = Channels(settings, signature, hub)
    # trusted like the control channel: any frame the header allows
    stream = RelayStream(relay, 2**32 - 1)
    lanes = Lanes(channels, runner, spec["channel_threads"], stream, channel.send,
                  settings["scheduling"])  # fmt: skip
    try:
        serve(channel, handoff, lanes, settings)
    finally:
        lanes.stop()
        if janitor:
            janitor.stop()  # every hot session to disk, for the next worker
    return 0


def load_and_warm(
    channel: DaemonLink, spec: dict[str, Any]
) -> tuple[Served, Signature, dict[str, Any]]:
    """The loaded, warmed model; the signature clients see (a stateful model's without
    the inputs its sessions feed); the ready message."""
    started = time.monotonic()
    try:
        session, providers = load_session(spec)
    except Exception as exc:
        raise LoadFailed(f"{type(exc).__name__}: {exc}".strip()) from None
    signature = Signature(
        tuple(map(spec_from_ort, session.get_inputs())),
        tuple(map(spec_from_ort, session.get_outputs())),
    )
    if spec["batched"] and (problem := signature.batch_problem()):
        raise LoadFailed(f"batching is configured (max_batch_size above 1), but {problem}")
    served, shown = with_sessions(session, signature, spec)
    loaded = time.monotonic()
    channel.send({"phase": "warming"})
    warmup_error = None
    if spec["samples"]:
        run_samples(served, shown, spec["samples"])
    else:
        warmup_error = warm_up(session, signature)
    ready = {"signature": shown.to_wire(), "providers": providers,
             "load_seconds": loaded - started, "warmup_error": warmup_error,
             "samples": len(spec["samples"]),
             "warmup_seconds": time.monotonic() - loaded}  # fmt: skip
    if served.sessions:
        ready["state"] = {"key": key_of(served.states),
                          "pairs": [s.to_wire() for s in served.states]}  # fmt: skip
    return served, shown, ready


def with_sessions(session: Any, signature: Signature,
                  spec: dict[str, Any]) -> tuple[Served, Signature]:  # fmt: skip
    """The model served, with its sessions when model.yaml declares `state:`; and its
    signature less the inputs the sessions feed."""
    names = [output.name for output in signature.outputs]
    if not spec["state"]:
        return Served(session, names), signature
    try:
        states = resolve(spec["state"], signature)
    except StateError as exc:
        raise LoadFailed(str(exc)) from None
    label = f"model {spec['direct']['model']} {spec['direct']['version']}"
    folder = Path(spec["sessions_dir"]) / key_of(states)
    try:
        sessions = Sessions(states, spec["direct"]["scheduling"]["sessions"], folder, label)
    except OSError as exc:
        raise LoadFailed(f"sessions: cannot use {folder}: {exc.strerror or exc}") from None
    fed = {state.input for state in states}
    shown = Signature(tuple(i for i in signature.inputs if i.name not in fed), signature.outputs)
    return Served(session, names, states, sessions), shown
