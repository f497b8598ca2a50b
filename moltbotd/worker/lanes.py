"""Lanes: the threads of one worker that serve its direct channels.

With `channel_threads: N` a worker serves its direct channels on N lanes, each a thread
with a Direct of its own: its channels, its queue, its counts; a channel stays on the
lane it was given to. The worker's main thread answers the daemon (its batches, orders)
and opens each new channel (offers its region) before it gives it to the lane with the
fewest, so a lane's long run delays that lane's requests, never a channel's opening.
Every lane runs the worker's one onnxruntime session (its run is thread-safe and
releases the GIL), so N clients keep N cores computing with one copy of the weights
(docs/architecture.md has the measurements); the daemon's batches run on the main
thread beside them. The main thread speaks to a lane only through the lane's inbox.
The channels held, by uid, are counted under one lock: the main thread refuses a channel
past max_channels or max_channels_per_uid (the daemon's bounds, checked here again).
"""

import contextlib
import os
import selectors
import socket
import threading
import traceback
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from moltbotd.wire.handoff import Throttled, channel_refusal
from moltbotd.worker.direct import Counts, Direct, Stream, print_refusals, refuse

# A lane that failed leaves channels nobody answers: the whole worker exits (EX_SOFTWARE),
# so its clients see EOF and the supervisor restarts it, as when the main loop fails.
EXIT_LANE_FAILED = 70

Order = Callable[[Direct], None]  # what a lane's thread does to its Direct
Send = Callable[[dict[str, Any]], None]  # a message to the daemon
Closed = Callable[[Stream], None]  # told of each channel a lane closed


class Lane:
    """A thread serving the direct channels given to it, until told to stop."""

    def __init__(self, direct: Direct, report: Send, closed: Closed, number: int) -> None:
        self.direct = direct
        self.report = report
        self.closed = closed
        self.inbox: deque[Order | None] = deque()
        # channels given by the main thread and taken by the lane's: one writer each
        self.given = self.taken = 0
        self.wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        direct.poller.selector.register(self.wake, selectors.EVENT_READ, self)
        self.thread = threading.Thread(target=self._run, name=f"lane-{number}", daemon=True)

    @property
    def load(self) -> int:
        """Its channels, counting those on their way. Read from another thread: the
        counters before the streams, so that a channel taken meanwhile is counted
        twice rather than not at all."""
        on_the_way = self.given - self.taken
        return on_the_way + len(self.direct.streams)

    def give(self, stream: Stream) -> None:
        self.given += 1
        self.tell(lambda direct: self._take(direct, stream))

    def _take(self, direct: Direct, stream: Stream) -> None:
        direct.attach(stream)
        self.taken += 1

    def tell(self, order: Order | None) -> None:
        """Have the lane's thread carry out `order` on its Direct; None stops it."""
        self.inbox.append(order)
        os.eventfd_write(self.wake, 1)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:
            try:
                traceback.print_exc()
            finally:
                os._exit(EXIT_LANE_FAILED)

    def _serve(self) -> None:
        direct = self.direct
        while True:
            for source in direct.poller.wait(direct.timeout()):
                if source is not self:
                    direct.ready(source)
                elif not self._obey():
                    return
            direct.run()
            for stream in direct.flush():
                self.closed(stream)
            if report := direct.report():
                self.report(report)

    def _obey(self) -> bool:
        """Carry out the orders that came; False once told to stop."""
        os.eventfd_read(self.wake)
        while self.inbox:
            if (order := self.inbox.popleft()) is None:
                return False
            order(self.direct)
        return True


class Lanes:
    """The lanes, seen from the main thread: where a new channel goes, orders for all,
    and the reports, each with the whole worker's channels."""

    def __init__(self, directs: list[Direct], send: Send, scheduling: dict[str, Any]) -> None:
        self.send = send
        self.scheduling = scheduling
        # a count taken under the lock is sent under it: the daemon keeps the latest
        self.lock = threading.Lock()
        self.held: Counter[int] = Counter()  # channels by uid, counting those on their way
        self.refusals = Throttled(print_refusals)
        self.lanes = [Lane(direct, self._report, self._closed, number)
                      for number, direct in enumerate(directs, 1)]  # fmt: skip
        for lane in self.lanes:  # once self.lanes is there: their reports read it
            lane.thread.start()

    def refused(self, sock: socket.socket, uid: int) -> bool:
        """Refuse (and close) a new channel past the bounds; True if it was."""
        with self.lock:
            why = channel_refusal(uid, self.held, self.scheduling)
        if why is None:
            return False
        refuse(sock, why, self.refusals)
        self._report({"stats": Counts().to_wire()})  # the daemon counted it when it granted it
        return True

    def attach(self, stream: Stream) -> None:
        """Give a new channel to the lane with the fewest, counting those on their way."""
        with self.lock:
            self.held[stream.uid] += 1
        min(self.lanes, key=lambda lane: lane.load).give(stream)

    def configure(self, scheduling: dict[str, Any]) -> None:
        """New scheduling settings (a reload): the bounds here, the rest in every lane."""
        self.scheduling = scheduling
        self.tell_all(lambda direct: direct.configure(scheduling))

    def tell_all(self, order: Order) -> None:
        """Have every lane carry out `order` (closing its channels, new settings)."""
        for lane in self.lanes:
            lane.tell(order)

    def stop(self) -> None:
        """End each lane's thread once it has run what it holds (the supervisor's
        SIGKILL after stop_timeout bounds that)."""
        for lane in self.lanes:
            lane.tell(None)
        for lane in self.lanes:
            lane.thread.join()

    def _closed(self, stream: Stream) -> None:
        with self.lock:
            self.held[stream.uid] -= 1
            if not self.held[stream.uid]:
                del self.held[stream.uid]

    def _report(self, report: dict[str, Any]) -> None:
        with self.lock:
            report["stats"]["channels"] = self.held.total()
            report["stats"]["by_uid"] = dict(self.held)
            # the daemon closed the channel: the worker is stopping
            with contextlib.suppress(OSError):
                self.send(report)
