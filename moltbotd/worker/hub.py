"""The worker's one queue: every request waits here, whichever way it came.

Requests relayed by moltbotd (its socket's clients) and requests read from direct
channels are checked by the intake thread that read them and pushed here the moment
they arrive; a lane that is free takes the next batch (scheduler.Queue: priorities,
max_queue, batch forming). So batching (`timeout_ms`, `preferred_sizes`), priorities,
deadlines and max_queue mean the same on both paths. A batch waits to fill only while
another lane runs: a worker with nothing running takes what is there at once, so
batches grow with the load and a lone request never waits for company.

One lock guards the queue, the counts and every channel's unsent answers; runs happen
outside it. A thread of its own keeps time: it answers each request at its deadline,
queued or running (a result that comes later is dropped), and sends the worker's counts
and queue depth to moltbotd while they change, even while every lane is in a long run.
"""

import heapq
import itertools
import os
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from moltbotd.config import Batching
from moltbotd.scheduler import Pending, Queue, deadline_exceeded
from moltbotd.wire.histogram import PHASES, Histogram
from moltbotd.wire.protocol import MoltError
from moltbotd.worker.cache import ResultCache
from moltbotd.worker.sessions import Sessions

# A thread that failed leaves requests nobody answers: the whole worker exits
# (EX_SOFTWARE), so its clients see EOF and the supervisor restarts it.
EXIT_LANE_FAILED = 70
REPORT_EVERY = 0.25  # seconds between stats messages while requests come
MAX_WAITS = 256  # queue times per stats message (a sample, for the percentiles)
MAX_SLOW = 16  # slow requests described per stats message; the others only counted
MAX_STAMPS = 32768  # timed requests kept (about 3 MB) before they are counted at once
NAN = float("nan")
# answered requests' deadlines stay in the heap until due, or until it doubles past this
SWEEP_AT = 2048


def fatal_thread(serve: Callable[[], None], name: str) -> threading.Thread:
    """A thread whose failure ends the worker, with its traceback on stderr."""

    def run() -> None:
        try:
            serve()
        except BaseException:
            try:
                traceback.print_exc()
            finally:
                os._exit(EXIT_LANE_FAILED)

    return threading.Thread(target=run, name=name, daemon=True)


class Sendable(Protocol):
    """A channel with answers to send (direct.Stream)."""

    out: bytearray
    ended: bool

    def flush(self) -> None: ...

    def stalled(self) -> None: ...


RAN = ("queue", "batch", "compute")  # the phases of a request that ran


def _phases(item: Pending, done: float, end: float) -> tuple[float, tuple[float, ...], float]:
    """A request's phases: arrival to answer, RAN's (none for one answered before it ran,
    at a deadline), and transfer. `done` is when its outcome came, `end` when its answer
    was framed (a slow request's; Counts.fold does the same on arrays)."""
    arrived, started = item.arrived, item.started
    transfer = (arrived - item.received) + (end - done)
    if started is None:
        return end - arrived, (), transfer
    taken = started if item.taken is None else item.taken
    return end - arrived, (taken - arrived, started - taken, done - started), transfer


def outcome_code(outcome: Any) -> str:
    """How metrics name an answer: "OK" (packed outputs) or its error's code."""
    return outcome.code.value if isinstance(outcome, MoltError) else "OK"


class Counts:
    """What happened since the last report. requests and errors count the direct
    channels' queued requests only (moltbotd counts those it relayed); codes count every
    answer, refusals included, and phases every queued request, once, whichever path it
    came on."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.sizes: Counter[int] = Counter()
        self.waits: list[float] = []
        self.codes: Counter[str] = Counter()  # "OK" or the error's code
        self.phases = {phase: Histogram() for phase in PHASES}
        self.stamps: list[tuple[float, ...]] = []  # timed requests not yet in phases
        self.slow: list[dict[str, Any]] = []  # requests over the slow threshold, described
        self.slow_more = 0  # and those past MAX_SLOW, counted
        self.changed = False

    def answered(self, outcome: Any, counted: bool) -> None:
        if counted:
            self.requests += 1
            self.errors += not isinstance(outcome, bytes)
        self.codes[outcome_code(outcome)] += 1

    def slow_one(self, outcome: Any, item: Pending, done: float, end: float) -> None:
        if len(self.slow) >= MAX_SLOW:
            self.slow_more += 1
            return
        request, ran, transfer = _phases(item, done, end)
        phases = dict(zip(RAN, ran, strict=False)) | {"transfer": transfer}
        shown = {f"{name}_ms": round(seconds * 1e3, 3) for name, seconds in phases.items()}
        self.slow.append({"request_id": item.trace, "code": outcome_code(outcome),
                          "ms": round(request * 1e3, 3), **shown})  # fmt: skip

    def timed(self, item: Pending, done: float, end: float) -> None:
        """Keep a request's times, to be counted into the histograms by fold(), outside
        the hub's lock this runs under (a monotonic time is never 0: `or NAN` marks
        the phases a request never reached)."""
        self.stamps.append((item.received, item.arrived, item.taken or NAN,
                            item.started or NAN, done, end))  # fmt: skip
        if len(self.stamps) >= MAX_STAMPS:
            self.fold()

    def fold(self) -> None:
        """The kept times into the histograms, all at once: _phases' arithmetic on
        arrays, one searchsorted per phase."""
        if not self.stamps:
            return
        received, arrived, taken, started, done, end = np.array(self.stamps).T
        self.stamps = []
        ran = ~np.isnan(started)
        taken = np.where(np.isnan(taken), started, taken)[ran]
        phases = self.phases
        phases["request"].observe_many(end - arrived)
        phases["queue"].observe_many(taken - arrived[ran])
        phases["batch"].observe_many(started[ran] - taken)
        phases["compute"].observe_many(done[ran] - started[ran])
        phases["transfer"].observe_many((arrived - received) + (end - done))

    def ran(self, batch: list[Pending], concat: bool, now: float) -> None:
        if concat:
            self.sizes[len(batch)] += 1
        if len(self.waits) < MAX_WAITS:
            self.waits.extend(now - item.arrived for item in batch[: MAX_WAITS - len(self.waits)])

    def to_wire(self) -> dict[str, Any]:
        self.fold()
        return {"requests": self.requests, "errors": self.errors,
                "sizes": dict(self.sizes), "waits": self.waits, "codes": dict(self.codes),
                "phases": {name: h.to_wire() for name, h in self.phases.items()},
                "slow": self.slow, "slow_more": self.slow_more}  # fmt: skip


class Hub:
    """The queue the intake pushes into and the lanes take batches from."""

    def __init__(self, label: str, scheduling: dict[str, Any], histograms: bool = True,
                 slow_after: float = 0.0) -> None:  # fmt: skip
        self.label = label
        self.histograms = histograms  # count each request's phases (metrics.histograms)
        self.slow_after = slow_after  # seconds; a request slower is described (0: never)
        self.timing = histograms or bool(slow_after)  # answers are timed
        self.send: Callable[[dict[str, Any]], None] = lambda report: None  # Lanes sets it
        self.lock = threading.Lock()
        self.queue = Queue(scheduling["max_queue"])
        self.lanes = 1  # how many take batches (Lanes sets it)
        # a stateful model's sessions: its requests pass their gate under this lock
        self.sessions: Sessions | None = None
        self.cache = ResultCache(scheduling["cache"])  # looked up and filled under the lock
        self.running = 0  # lanes in a run
        self.stopping = False
        self.touched: set[Sendable] = set()  # channels answered into, not yet flushed
        self.counts = Counts()
        self.reported = time.monotonic()
        self._work = threading.Condition(self.lock)  # lanes wait on it for a batch
        self._deadlines: list[tuple[float, int, Pending]] = []
        self._order = itertools.count()  # ties in the heap never compare two Pendings
        self._timer = threading.Condition(self.lock)
        self._swept = SWEEP_AT
        self.configure(scheduling)
        fatal_thread(self._keep_time, "timekeeper").start()

    def configure(self, scheduling: dict[str, Any]) -> None:
        """The model's scheduling settings (max_queue is this instance's share)."""
        with self.lock:
            self.batching = Batching(**scheduling["batching"])
            self.queue.limit = scheduling["max_queue"]
            self.cache.configure(scheduling["cache"])
            self._work.notify_all()  # a batch waiting to fill may go now

    @property
    def concat(self) -> bool:
        return self.batching.max_batch_size > 1

    # --- under the lock -------------------------------------------------------------------

    def push(self, item: Pending) -> None:
        """Queue a checked request (OVERLOADED when the queue is full); its deadline is
        watched from now."""
        # requests the idle lanes are about to take do not wait: not counted against it
        self.queue.push(item, self.label, free=max(0, self.lanes - self.running))
        self._work.notify()
        self.note()  # the depth is reported
        if item.deadline is not None:
            first = self._deadlines[0][0] if self._deadlines else None
            heapq.heappush(self._deadlines, (item.deadline, next(self._order), item))
            if first is None or item.deadline < first:
                self._timer.notify()

    def ran(self) -> None:
        """A lane's run ended (its answers given): a batch that waited to fill may go."""
        self.running -= 1
        if self.queue:
            self._work.notify()

    def flush(self) -> None:
        """Send the answers written since the last flush; a channel whose socket is full
        (or whose client is done) is left to the intake, which watches it for room (or
        closes it)."""
        for stream in self.touched:
            stream.flush()
            if stream.out or stream.ended:
                stream.stalled()
        self.touched.clear()

    def note(self) -> None:
        """Something the daemon sees changed (a count, the depth, the channels): a report
        goes within REPORT_EVERY."""
        if not self.counts.changed:
            self.counts.changed = True
            self._timer.notify()

    def note_locked(self) -> None:
        """note(), from a thread that does not hold the lock (the sessions' janitor)."""
        with self.lock:
            self.note()

    def refused(self, error: MoltError) -> None:
        """A request answered without being queued (a failed check, a full queue)."""
        self.counts.codes[error.code.value] += 1
        self.note()

    def answered(self, outcome: Any, item: Pending, counted: bool, done: float) -> None:
        """Count an answer, now framed; its outcome came at `done` (0.0: not timed)."""
        self.counts.answered(outcome, counted)
        if done:
            end = time.monotonic()
            if self.histograms:
                self.counts.timed(item, done, end)
            if self.slow_after and end - item.arrived > self.slow_after:
                self.counts.slow_one(outcome, item, done, end)
        self.note()

    # --- the lanes --------------------------------------------------------------------------

    def next_batch(self) -> list[Pending] | None:
        """Wait for the next batch a lane runs, now marked running; None once stopping.
        A batch waits to fill (timeout_ms, preferred_sizes) only while another runs."""
        held: float | None = None  # since when this free lane holds a batch back to fill
        with self.lock:
            while not self.stopping:
                now = time.monotonic()
                batch, due = self.queue.take(self.batching, now, idle=not self.running)
                if batch:
                    self.running += 1
                    self.note()
                    self.counts.ran(batch, self.concat, now)
                    for item in batch:
                        item.taken = now if held is None else max(item.arrived, held)
                        item.started = now
                        if item.on_start:
                            item.on_start()
                    self.flush()  # the relay learns what now runs, before it runs
                    if self.queue:  # more to run: another lane may take it
                        self._work.notify()
                    return batch
                if due is not None and held is None:
                    held = now
                self._work.wait(None if due is None else max(0.0, due - now))
            return None

    def stop(self) -> None:
        """Every lane's next_batch returns None."""
        with self.lock:
            self.stopping = True
            self._work.notify_all()

    # --- the timekeeper's thread ----------------------------------------------------------

    def _keep_time(self) -> None:
        with self.lock:
            while True:
                now = time.monotonic()
                self._expire(now)
                if self.counts.changed and now - self.reported >= REPORT_EVERY:
                    self._report(now)
                due = [self._deadlines[0][0]] if self._deadlines else []
                if self.counts.changed:
                    due.append(self.reported + REPORT_EVERY)
                self._timer.wait(max(0.0, min(due) - now) if due else None)

    def _expire(self, now: float) -> None:
        """Answer every request whose deadline passed (queued: it leaves the queue)."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, item = heapq.heappop(self._deadlines)
            if not item.answered:
                queued = self.queue.remove(item)
                item.answer(deadline_exceeded(self.label, item, now, queued))
        self.flush()
        if len(self._deadlines) > 2 * self._swept:
            self._deadlines = [e for e in self._deadlines if not e[2].answered]
            heapq.heapify(self._deadlines)
            self._swept = max(SWEEP_AT, len(self._deadlines))

    def _report(self, now: float) -> None:
        """Send the counts since the last report, with the queue's depth: the daemon's
        status, autoscaling and idle checks see the worker through these. Sent without
        the lock: the control socket may block."""
        self.reported = now
        counts, self.counts = self.counts, Counts()
        queued, by_priority = len(self.queue), self.queue.depths()
        self.lock.release()  # the lanes answer on while the counts are folded and sent
        stats = {**counts.to_wire(), "queued": queued, "by_priority": by_priority}
        if self.sessions:
            stats["sessions"] = self.sessions.gauges()
        if self.cache.on or self.cache.entries:
            stats["cache"] = self.cache.report()
        try:
            self.send({"stats": stats})
        finally:
            self.lock.acquire()
