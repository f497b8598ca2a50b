"""A stateful model's sessions: the state each conversation carries from one request to
its next, kept by the worker so that the client sends only its new input.

A version's model.yaml declares state pairs (`state:`): an output that feeds an input on
the same session's next request, and the input's first value (zeros). A session's
state lives in one of three places:

- hot: in this worker's memory, an LRU bounded by `sessions.hot_bytes`;
- spilled: idle for `spill_after` (or pushed out of the LRU), compressed with zstd into
  `DIR/ID.state` (write, rename), counted against `disk_bytes`; restored when the
  session comes back;
- gone: idle for `ttl`, ended, or among the least recently used spilled ones once the
  disk budget is spent.

DIR is the model's folder for one state signature (`state_key`), so a version with the
same state pairs finds the sessions another version left (a switch), and one with other
pairs starts afresh. While a session is hot, `DIR/ID.hot` names the worker's pid: a
worker that starts and finds the mark of a pid that is gone knows that session's newest
turns died with it (SIGKILL, an OOM kill), marks it `ID.lost`, and its next request is
refused SESSION_LOST instead of going on from an older state. A mark of a live pid (the
old version during a switch) is waited for: told it is being replaced (`hand_over`), that
worker spills each session as soon as its request in flight is answered.

A session's requests run one at a time, in order (`admit`, `release`, under the hub's
lock); requests of different sessions run together in one batch, their states
concatenated along the first dimension.
"""

import contextlib
import hashlib
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zstandard

from moltbotd.scheduler import Pending
from moltbotd.wire.protocol import WIRE_DTYPES, ErrorCode, MoltError, decode_tensor, encode_value
from moltbotd.wire.signature import Signature, format_shape
from moltbotd.wire.units import format_size

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # also a file name
MAX_WAITING = 64  # requests of one session queued behind the one it runs
HELD_WAIT = 10.0  # seconds a request waits for another worker to spill its session
HANDING_OVER = 0.02  # seconds between spills while the next version waits for them
DISK_SCAN_EVERY = 10.0  # seconds between scans of the spilled sessions (a stat each)
SHOWN = 100  # sessions `sessions` describes by default, the least idle first
State = dict[str, np.ndarray]  # input name -> the value it gets on the next request


class StateError(Exception):
    """model.yaml's `state:` does not fit the model: the version cannot load."""


@dataclass(frozen=True)
class StateSpec:
    """One state pair, checked against the model's signature."""

    input: str
    output: str
    dtype: str
    shape: tuple[int, ...]  # of the first value: zeros

    def initial(self) -> np.ndarray:
        return np.zeros(self.shape, WIRE_DTYPES[self.dtype])

    def to_wire(self) -> dict[str, Any]:
        return {"input": self.input, "output": self.output, "dtype": self.dtype,
                "shape": list(self.shape)}  # fmt: skip


def resolve(pairs: list[dict[str, Any]], signature: Signature) -> tuple[StateSpec, ...]:
    """model.yaml's pairs as StateSpecs: the input and the output exist with one dtype,
    and the first value's shape (given, or the input's with dynamic dimensions as 1) fits
    the input."""
    outputs = {spec.name: spec for spec in signature.outputs}
    specs = []
    for pair in pairs:
        name, out = pair["input"], pair["output"]
        into, source = signature.by_name.get(name), outputs.get(out)
        if into is None or source is None:
            missing = f"no input {name!r}" if into is None else f"no output {out!r}"
            raise StateError(f"state: the model has {missing}")
        if into.dtype is None or into.dtype != source.dtype:
            raise StateError(f"state: output {out!r} ({source.type}) cannot feed input"
                             f" {name!r} ({into.type})")  # fmt: skip
        dims = into.shape or ()
        produced = source.shape or ()
        if not _may_feed(produced, dims):
            raise StateError(f"state: output {out!r} (shape {format_shape(produced)}) cannot"
                             f" feed input {name!r} (shape {format_shape(dims)})")  # fmt: skip
        shape = tuple(pair.get("shape") or [d if isinstance(d, int) else 1 for d in dims])
        fixed = [d if isinstance(d, int) else None for d in dims]
        if len(shape) != len(dims) or any(
            f not in (None, s) for f, s in zip(fixed, shape, strict=True)
        ):
            raise StateError(f"state: shape {format_shape(shape)} does not fit input"
                             f" {name!r} ({format_shape(dims)})")  # fmt: skip
        specs.append(StateSpec(name, out, into.dtype, shape))
    return tuple(specs)


def _may_feed(produced: tuple[Any, ...], taken: tuple[Any, ...]) -> bool:
    """Whether an output of one shape may be an input of another: as many dimensions, and
    no two fixed sizes that differ."""
    return len(produced) == len(taken) and all(
        not (isinstance(a, int) and isinstance(b, int)) or a == b
        for a, b in zip(produced, taken, strict=True)
    )


def state_key(specs: tuple[StateSpec, ...]) -> str:
    """What must match for a version to go on with another version's sessions."""
    text = repr(sorted((s.input, s.output, s.dtype, s.shape) for s in specs))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_id(value: Any) -> str:
    if not isinstance(value, str) or not SESSION_ID.match(value):
        raise MoltError(ErrorCode.BAD_REQUEST, "session must be 1 to 128 letters, digits,"
                        " '.', '_' or '-', starting with a letter or digit;"
                        f" got {value!r}"[:300])  # fmt: skip
    return value


class Codecs(threading.local):
    """One zstd context per thread (lanes, the janitor), made once: a context is about a
    megabyte, and one made per spill would leave the heap in pieces."""

    def __init__(self) -> None:
        self.made: tuple[Any, Any] | None = None

    def compressor(self) -> "zstandard.ZstdCompressor":
        return self._made()[0]

    def decompressor(self) -> "zstandard.ZstdDecompressor":
        return self._made()[1]

    def _made(self) -> tuple[Any, Any]:
        if self.made is None:
            self.made = (zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor())
        return self.made


class Conversation:
    """One session as the worker knows it: its state once loaded, and its requests."""

    __slots__ = ("busy", "generation", "id", "nbytes", "spilling", "state", "turns", "used",
                 "waiting")  # fmt: skip

    def __init__(self, session: str) -> None:
        self.id = session
        self.state: State | None = None  # None: not loaded (new, or on disk)
        self.nbytes = 0
        self.turns = 0
        self.used = time.time()
        self.busy: Pending | None = None  # the request of it that is queued or running
        self.waiting: deque[Pending] = deque()
        self.generation = 0  # a reset or an end while a request ran: its result is not kept
        self.spilling = False  # a thread is writing it to disk


class Sessions:
    """Every session of this worker's model. `lock` guards the maps (and `busy` and
    `waiting` are the hub lock's); no I/O under it but a mark's creation or removal."""

    def __init__(self, specs: tuple[StateSpec, ...], settings: dict[str, Any],
                 directory: Path, label: str) -> None:  # fmt: skip
        self.specs = specs
        self.settings = settings
        self.dir = directory
        self.label = label
        self.lock = threading.Lock()
        self.known: dict[str, Conversation] = {}  # loaded, or with a request in flight
        self.hot: OrderedDict[str, Conversation] = OrderedDict()  # loaded: the LRU
        self.hot_bytes = 0
        self.scanned = 0.0  # when the disk's sessions were last counted against the budgets
        self.disk = {"spilled": 0, "lost": 0, "disk_bytes": 0}  # as last scanned
        self.handing_over = False  # being replaced: every session spills once it is idle
        self._codecs = Codecs()
        self.counts = {"restored": 0, "spilled": 0, "expired": 0, "dropped": 0, "lost": 0}
        directory.mkdir(parents=True, exist_ok=True)
        self._mark_the_dead()

    # --- the gate: a session's requests one at a time (under the hub's lock) -----------

    def admit(self, item: Pending, session: str) -> bool:
        """Whether `item` may be queued now; else it waits behind its session's request
        (its deadline is looked at when its turn comes)."""
        with self.lock:
            conv = self.known.get(session) or self.known.setdefault(session, Conversation(session))
        item.conversation = conv
        if conv.busy is None:
            conv.busy = item
            return True
        if len(conv.waiting) >= MAX_WAITING:
            raise MoltError(ErrorCode.OVERLOADED, f"{self.label}: session {session} already"
                            f" has {MAX_WAITING} requests waiting for their turn")  # fmt: skip
        conv.waiting.append(item)
        return False

    def release(self, item: Pending, push: Any) -> None:
        """`item` is done (answered, and its run over): queue its session's next request."""
        conv = item.conversation
        if conv is None or conv.busy is not item:
            return
        conv.busy = None
        while conv.waiting and conv.busy is None:
            following = conv.busy = conv.waiting.popleft()
            try:
                push(following)
            except MoltError as exc:  # OVERLOADED: its answer releases nothing
                conv.busy = None
                following.answer(exc)
        if conv.busy is None:
            with self.lock:
                self._forget_if_idle(conv)

    # --- the lanes: a state out for a run, the next one back ------------------------------

    def checkout(self, conv: Conversation | None) -> tuple[State, int]:
        """The state a request runs with, and the generation its result must match; a
        request without a session starts from the first value and keeps nothing."""
        if conv is None:
            return self.initial(), -1
        with self.lock:
            state, generation = conv.state, conv.generation
        if state is not None:
            return state, generation
        state, spilled = self._load(conv.id)
        with self.lock:
            if conv.state is None and conv.generation == generation:
                self._mark(conv.id, "hot", str(os.getpid()).encode())
                self._keep(conv, state)
        if spilled:
            with contextlib.suppress(FileNotFoundError):
                spilled.unlink()  # stale from now on: the hot mark covers the session
        self.make_room()
        return state, generation

    def too_big(self, session: str, state: State) -> MoltError | None:
        """The error for a state that would not fit in hot_bytes on its own."""
        nbytes, limit = sum(value.nbytes for value in state.values()), self.settings["hot_bytes"]
        if nbytes <= limit:
            return None
        return MoltError(ErrorCode.RESOURCE_EXHAUSTED, f"{self.label}: session {session}'s state"
                         f" would be {format_size(nbytes)}, over sessions.hot_bytes"
                         f" {format_size(limit)}; the request's result was not kept")  # fmt: skip

    def commit(self, conv: Conversation | None, state: State | None, generation: int) -> None:
        if conv is None or state is None:
            return
        with self.lock:
            if conv.generation != generation:
                return  # reset or ended while it ran
            self._keep(conv, state)
            conv.turns += 1
            conv.used = time.time()

    def initial(self) -> State:
        return {spec.input: spec.initial() for spec in self.specs}

    def _keep(self, conv: Conversation, state: State) -> None:
        """Hold `state` hot (under the lock), most recently used."""
        nbytes = sum(value.nbytes for value in state.values())
        self.hot_bytes += nbytes - conv.nbytes
        conv.state, conv.nbytes = state, nbytes
        self.hot[conv.id] = conv
        self.hot.move_to_end(conv.id)

    def _load(self, session: str) -> tuple[State, Path | None]:
        """A session's state from disk (restored) and its file, or the first value (a new
        session)."""
        if self._path(session, "lost").exists():
            raise MoltError(ErrorCode.SESSION_LOST, f"{self.label}: session {session} was lost:"
                            " the worker holding its newest state ended before it was saved;"
                            " reset it (moltctl reset-session) or end it"[:300],
                            {"session": session})  # fmt: skip
        self._wait_for_holder(session)
        path = self._path(session, "state")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return self.initial(), None
        saved = msgpack.unpackb(self._codecs.decompressor().decompress(data))
        with self.lock:
            self.counts["restored"] += 1
            if (conv := self.known.get(session)) is not None:
                conv.turns = saved["turns"]
        return {name: decode_tensor(tensor) for name, tensor in saved["state"].items()}, path

    def _wait_for_holder(self, session: str) -> None:
        """Another live worker (the old version in a switch) holds it hot: wait for it to
        spill it as it stops."""
        mark, due = self._path(session, "hot"), time.monotonic() + HELD_WAIT
        while (holder := _read_pid(mark)) not in (None, os.getpid()) and _alive(holder):
            if time.monotonic() > due:
                raise MoltError(ErrorCode.MODEL_UNAVAILABLE, f"{self.label}: session {session}"
                                f" is still held by worker pid {holder}, which is stopping;"
                                " retry it")  # fmt: skip
            time.sleep(0.01)

    # --- orders from moltbotd: list, end, reset -------------------------------------------

    def end(self, session: str, reset: bool) -> bool:
        """Forget a session's state (reset: it starts over at its next request; end: and
        its files go); False when no such session exists."""
        with self.lock:
            conv = self.known.get(session)
            found = conv is not None and (conv.state is not None or conv.busy is not None)
            if conv is not None:
                conv.generation += 1
                self._drop(conv)
        for kind in ("state", "lost", "hot"):
            with contextlib.suppress(FileNotFoundError):
                self._path(session, kind).unlink()
                found = True
        return found

    def describe(self, limit: int) -> dict[str, Any]:
        """Counts, bytes and the `limit` least idle sessions, for `moltctl sessions`."""
        now = time.time()
        with self.lock:
            hot = [(c.id, "hot", c.nbytes, c.used, c.turns) for c in self.hot.values()]
            counts, hot_bytes = dict(self.counts), self.hot_bytes
        on_disk = self._on_disk(now)
        rows = hot + [(sid, kind, size, used, None) for sid, (kind, size, used) in on_disk.items()]
        rows.sort(key=lambda row: -row[3])
        return {
            "hot": len(hot), "hot_bytes": hot_bytes, "hot_limit": self.settings["hot_bytes"],
            "spilled": sum(kind == "spilled" for kind, _, _ in on_disk.values()),
            "lost": sum(kind == "lost" for kind, _, _ in on_disk.values()),
            "disk_bytes": sum(size for _, size, _ in on_disk.values()),
            "disk_limit": self.settings["disk_bytes"], "counts": counts,
            "state": [spec.to_wire() for spec in self.specs], "directory": str(self.dir),
            "sessions": [{"session": sid, "where": kind, "bytes": size, "idle": now - used,
                          "turns": turns} for sid, kind, size, used, turns in rows[:limit]],
        }  # fmt: skip

    def gauges(self) -> dict[str, Any]:
        """What the worker's reports carry (metrics, status): cheap, no disk scan; the
        disk's figures are the janitor's last scan's."""
        with self.lock:
            return {"hot": len(self.hot), "hot_bytes": self.hot_bytes, **self.disk,
                    "counts": dict(self.counts)}  # fmt: skip

    # --- the janitor: spill the idle, expire the old, keep within the budgets -------------

    def tidy(self) -> bool:
        """Spill hot sessions idle for spill_after, or least recently used past hot_bytes;
        forget those idle past ttl; keep the disk within disk_bytes. Whether anything was
        done (the daemon's figures changed)."""
        now = time.time()
        spill_after, ttl = self.settings["spill_after"], self.settings["ttl"]
        if self.handing_over:
            spill_after = 0.0
        with self.lock:
            over = self.hot_bytes - self.settings["hot_bytes"]
            chosen = []
            for conv in self.hot.values():  # the least recently used first
                idle = now - conv.used
                if conv.busy is None and (idle >= spill_after or idle >= ttl or over > 0):
                    chosen.append(conv)
                    over -= conv.nbytes
        for conv in chosen:
            if now - conv.used >= ttl:
                self.end(conv.id, reset=False)
                self.counts["expired"] += 1
            else:
                self.spill(conv)
        if chosen or now - self.scanned >= DISK_SCAN_EVERY:
            self.scanned = now
            self._expire_on_disk(now)
            return True
        return False

    def spill(self, conv: Conversation) -> None:
        """Write a hot session's state to disk and let go of it (unless it ran meanwhile)."""
        with self.lock:
            if conv.state is None or conv.spilling:
                return
            conv.spilling = True
            state, turns, used, generation = conv.state, conv.turns, conv.used, conv.generation
        try:
            path = self._write(conv.id, turns, state, used)
            with self.lock:
                if conv.busy is not None or conv.generation != generation or conv.turns != turns:
                    path.unlink()  # it came back meanwhile: the hot state is the newer
                    return
                self._drop(conv)
                self.counts["spilled"] += 1
                with contextlib.suppress(FileNotFoundError):
                    self._path(conv.id, "hot").unlink()  # under the lock: a restore marks anew
        finally:
            conv.spilling = False

    def make_room(self) -> None:
        """Spill the least recently used idle sessions until the hot ones fit in hot_bytes:
        the lane that brought a session in pays for it, so the budget holds under any load
        (the janitor alone could fall behind)."""
        while True:
            with self.lock:
                if self.hot_bytes <= self.settings["hot_bytes"]:
                    return
                victim = next((c for c in self.hot.values() if c.busy is None), None)
            if victim is None:
                return  # every hot session has a request in flight
            self.spill(victim)

    def _write(self, session: str, turns: int, state: State, used: float) -> Path:
        """The state, compressed, in place of the session's file: a crash of this process
        leaves the old file or the new one. Not fsynced: a spill outlives the worker and
        moltbotd, not a power loss (fsyncs would cap spills at the disk's flush rate)."""
        tensors = {name: encode_value(value) for name, value in state.items()}
        record = {"session": session, "turns": turns, "state": tensors}
        data = self._codecs.compressor().compress(msgpack.packb(record))
        path = self._path(session, "state")
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.utime(tmp, (used, used))  # its age on disk is its session's idle time
        os.replace(tmp, path)
        return path

    def spill_all(self) -> None:
        """At a stop: every hot session to disk, for the next worker or version."""
        with self.lock:
            chosen = list(self.hot.values())
        for conv in chosen:
            self.spill(conv)

    def _drop(self, conv: Conversation) -> None:
        """Forget a session's hot state (under the lock)."""
        if self.hot.pop(conv.id, None) is not None:
            self.hot_bytes -= conv.nbytes
        conv.state, conv.nbytes = None, 0
        self._forget_if_idle(conv)

    def _forget_if_idle(self, conv: Conversation) -> None:
        if conv.state is None and conv.busy is None and not conv.waiting:
            self.known.pop(conv.id, None)

    def _on_disk(self, now: float) -> dict[str, tuple[str, int, float]]:
        """Sessions spilled or lost: id -> (where, bytes, last used)."""
        found = {}
        with os.scandir(self.dir) as entries:
            for entry in entries:
                sid, _, kind = entry.name.rpartition(".")
                if kind in ("state", "lost") and not sid.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        stat = entry.stat()
                        where = "spilled" if kind == "state" else "lost"
                        found[sid] = (where, stat.st_size, stat.st_mtime)
        return found

    def _expire_on_disk(self, now: float) -> None:
        on_disk = self._on_disk(now)
        oldest_first = sorted(on_disk.items(), key=lambda item: item[1][2])
        total = sum(size for _, size, _ in on_disk.values())
        for sid, (where, size, used) in oldest_first:
            expired = now - used >= self.settings["ttl"]
            if not expired and total <= self.settings["disk_bytes"]:
                break
            with contextlib.suppress(FileNotFoundError):
                self._path(sid, "state" if where == "spilled" else "lost").unlink()
            del on_disk[sid]
            total -= size
            self.counts["expired" if expired else "dropped"] += 1
        lost = sum(where == "lost" for where, _, _ in on_disk.values())
        with self.lock:
            self.disk = {"spilled": len(on_disk) - lost, "lost": lost, "disk_bytes": total}

    # --- files ----------------------------------------------------------------------------

    def _path(self, session: str, kind: str) -> Path:
        return self.dir / f"{session}.{kind}"

    def _mark(self, session: str, kind: str, data: bytes) -> None:
        fd = os.open(self._path(session, kind), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def _mark_the_dead(self) -> None:
        """Sessions a dead worker held hot are lost: their newest turns died with it."""
        for mark in self.dir.glob("*.hot"):
            holder = _read_pid(mark)
            if holder is None or holder == os.getpid() or not _alive(holder):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(mark, mark.with_suffix(".lost"))
                    self._path(mark.stem, "state").unlink(missing_ok=True)
                    self.counts["lost"] += 1


def _read_pid(mark: Path) -> int | None:
    try:
        return int(mark.read_bytes() or b"0") or None
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Janitor:
    """The worker's thread that tidies its sessions every second, until stopped; it
    counts what is on disk at least every DISK_SCAN_EVERY."""

    def __init__(self, sessions: Sessions, changed: Callable[[], None]) -> None:
        self.sessions = sessions
        self.changed = changed  # a report with the new figures goes to the daemon
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sessions", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(HANDING_OVER if self.sessions.handing_over else 1.0):
            try:
                if self.sessions.tidy():
                    self.changed()
            except OSError as exc:  # a full disk: the sessions stay hot, and it says so
                print(f"{self.sessions.label}: sessions: cannot spill: {exc}", flush=True)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.sessions.spill_all()
