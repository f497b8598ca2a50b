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
import ctypes
import functools
import selectors
import signal
import socket
import threading
import time
from operator import methodcaller
from typing import Any

import msgpack
import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from moltbotd.malloc import keep_freed_memory
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
from moltbotd.worker.lanes import Batch, Lanes, Place, Result

EXIT_LOAD_FAILED = 3  # gunicorn's idea: a model that cannot load is not a crash to retry
_PR_SET_PDEATHSIG = 1
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


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when the daemon dies, even by SIGKILL: no orphans."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


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


def run(session: Any, names: list[str], inputs: dict[str, Any],
        wanted: list[str] | None) -> dict[str, Any]:  # fmt: skip
    """The outputs `wanted` (all of the model's `names` when None), encoded."""
    feeds = {name: decode_tensor(t) for name, t in inputs.items()}
    values = session.run(wanted, feeds)
    return {name: encode_value(v) for name, v in zip(wanted or names, values, strict=True)}


def classify(exc: Exception) -> ErrorCode:
    # onnxruntime raises InvalidArgument for inputs the model rejects at run time
    return (
        ErrorCode.INVALID_INPUT if isinstance(exc, InvalidArgument) else ErrorCode.INFERENCE_FAILED
    )


def run_samples(session: Any, signature: Signature, samples: list[dict[str, Any]]) -> None:
    """Run model.yaml's warm-up samples; a sample that fails means the version is broken."""
    for number, sample in enumerate(samples, 1):
        where = f"warm-up sample {number} of {len(samples)}"
        try:
            feeds = check_inputs(where, signature, sample)
            run(session, [spec.name for spec in signature.outputs], feeds, None)
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
                    obey(lanes, message)


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


def obey(lanes: Lanes, message: dict[str, Any]) -> None:
    """An order from the daemon, for the direct channels or the whole queue."""
    if "close_channels" in message:
        lanes.tell(methodcaller("close_all", message["close_channels"], message["within"]))
    elif "scheduling" in message:
        lanes.configure(message["scheduling"])


def run_batch(session: Any, names: list[str], batch: Batch, concat: bool) -> list[Result]:
    """Each request's result: run one by one, or concatenated and run once. `names`: the
    model's outputs (asked for once: onnxruntime builds the list anew at every call)."""
    if concat and len(batch) > 1:
        # one request may be at fault: then each runs alone, so only it fails
        with contextlib.suppress(Exception):
            return run_together(session, names, batch)
    return [run_one(session, names, inputs, outputs, place) for inputs, outputs, place in batch]


def run_one(session: Any, names: list[str], inputs: dict[str, Any], wanted: list[str] | None,
            place: Place) -> Result:  # fmt: skip
    try:
        return pack(run(session, names, inputs, wanted or None), place)
    except Exception as exc:  # a failed run is the request's error, not the worker's
        return {"code": classify(exc), "message": str(exc)}


def run_together(session: Any, outputs: list[str], batch: Batch) -> list[Result]:
    """Concatenate along the first dimension, run once, split every output back."""
    wanted = batch[0][1] or None
    names = wanted or outputs
    feeds = {name: join_tensors([item[0][name] for item in batch]) for name in batch[0][0]}
    rows = [next(iter(inputs.values()))["shape"][0] for inputs, _, _ in batch]
    values = session.run(wanted, feeds)
    total = sum(rows)
    if not all(isinstance(v, np.ndarray) and v.shape[:1] == (total,) for v in values):
        raise ValueError("an output does not have the batch as its first dimension")
    parts = zip(*(split_tensor(v, rows) for v in values), strict=True)
    return [pack(dict(zip(names, maps, strict=True)), place)
            for maps, (_, _, place) in zip(parts, batch, strict=True)]  # fmt: skip


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
        session, signature, ready = load_and_warm(channel, spec)
    except LoadFailed as exc:
        channel.send({"failed": str(exc)})
        return EXIT_LOAD_FAILED
    channel.send({"ready": ready})
    runs = heartbeat.Runs()
    names = [spec.name for spec in signature.outputs]
    runner = runs.track(functools.partial(run_batch, session, names))
    heartbeat.start(handoff, runs, spec["heartbeat"])
    settings = spec["direct"]
    hub = Hub(f"model {settings['model']} {settings['version']}", settings["scheduling"],
              settings["histograms"], settings["slow_request"])  # fmt: skip
    channels = Channels(settings, signature, hub)
    # trusted like the control channel: any frame the header allows
    stream = RelayStream(relay, 2**32 - 1)
    lanes = Lanes(channels, runner, spec["channel_threads"], stream, channel.send,
                  settings["scheduling"])  # fmt: skip
    try:
        serve(channel, handoff, lanes, settings)
    finally:
        lanes.stop()
    return 0


def load_and_warm(
    channel: DaemonLink, spec: dict[str, Any]
) -> tuple[Any, Signature, dict[str, Any]]:
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
    loaded = time.monotonic()
    channel.send({"phase": "warming"})
    warmup_error = None
    if spec["samples"]:
        run_samples(session, signature, spec["samples"])
    else:
        warmup_error = warm_up(session, signature)
    ready = {"signature": signature.to_wire(), "providers": providers,
             "load_seconds": loaded - started, "warmup_error": warmup_error,
             "samples": len(spec["samples"]),
             "warmup_seconds": time.monotonic() - loaded}  # fmt: skip
    return session, signature, ready
