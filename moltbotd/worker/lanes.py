"""The worker's threads for requests: one intake that reads every channel, and the
lanes that run what it queued.

The intake reads moltbotd's relay and every direct channel, checks what arrives and
pushes it into the worker's one queue (hub.py): a request is queued the moment it
arrives (its deadline running, its priority weighed, max_queue counting it), even while
every lane runs. `channel_threads: N` lanes take batches from that queue, whichever
channel they came on, run them on the worker's one onnxruntime session (its run is
thread-safe and releases the GIL, so N lanes keep N cores computing with one copy of the
weights: docs/architecture.md has the measurements) and send the answers.

The main thread does control only: it opens each new direct channel (offers its region)
before it hands it to the intake, and passes moltbotd's orders on, through the intake's
inbox. The channels held, by uid, are counted under one lock: the main thread refuses a
channel past max_channels or max_channels_per_uid (the daemon's bounds, checked here
again).
"""

import contextlib
import os
import selectors
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from moltbotd.scheduler import Pending, deadline_exceeded
from moltbotd.wire.handoff import Throttled, channel_refusal
from moltbotd.wire.protocol import ErrorCode, MoltError
from moltbotd.worker.direct import Channels, Stream, print_refusals, refuse_channel
from moltbotd.worker.hub import Counts, Hub, fatal_thread

Result = bytes | dict[str, Any]  # a request's outputs, packed for the client; or its error
Place = Callable[[dict[str, Any]], dict[str, Any]] | None  # lays out a request's outputs
# a request's result, and what keeps its session's next state once it is answered
Done = tuple[Result, Callable[[], None] | None]
Runner = Callable[[list[Pending], bool], list[Done]]
Order = Callable[[Channels], None]  # what the intake's thread does to its channels
Send = Callable[[dict[str, Any]], None]  # a message to the daemon
Closed = Callable[[Stream], None]  # told of each channel the intake closed


class Intake:
    """The thread that reads every channel, until told to stop."""

    def __init__(self, channels: Channels, closed: Closed) -> None:
        self.channels = channels
        self.closed = closed
        self.inbox: deque[Order | None] = deque()
        self.wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        channels.poller.selector.register(self.wake, selectors.EVENT_READ, self)
        self.thread = fatal_thread(self._serve, "intake")

    def give(self, stream: Stream) -> None:
        """Read a new channel from now on."""
        self.tell(lambda channels: channels.attach(stream, lambda: self.look_at(stream)))

    def look_at(self, stream: Stream) -> None:
        """Have the intake look at a channel again (room to write, or done): a lane sent
        its answers and could not send them all, or found its client gone."""
        self.tell(lambda channels: channels.watch(stream))

    def tell(self, order: Order | None) -> None:
        """Have the intake's thread carry out `order` on the channels; None stops it."""
        self.inbox.append(order)
        os.eventfd_write(self.wake, 1)

    def _serve(self) -> None:
        channels = self.channels
        while True:
            for source in channels.poller.wait(channels.timeout()):
                if source is not self:
                    channels.ready(source)
                elif not self._obey():
                    return
            for stream in channels.sweep():
                self.closed(stream)

    def _obey(self) -> bool:
        """Carry out the orders that came; False once told to stop."""
        os.eventfd_read(self.wake)
        while self.inbox:
            if (order := self.inbox.popleft()) is None:
                return False
            order(self.channels)
        return True


class Lane:
    """A thread running the queue's batches until the hub stops."""

    def __init__(self, hub: Hub, runner: Runner, number: int) -> None:
        self.hub = hub
        self.runner = runner
        self.thread = fatal_thread(self._serve, f"lane-{number}")

    def _serve(self) -> None:
        while (batch := self.hub.next_batch()) is not None:
            self._run(batch)

    def _run(self, batch: list[Pending]) -> None:
        """Run a batch; answer each request unless its deadline answered it meanwhile (then
        its session keeps its old state: the client never saw this turn)."""
        hub = self.hub
        results = self.runner(batch, hub.concat)
        with hub.lock:
            now = time.monotonic()
            for item, (result, keep) in zip(batch, results, strict=True):
                if not item.live(now):  # the client stopped waiting: a late result is dropped
                    item.answer(deadline_exceeded(hub.label, item, now, queued=False))
                elif isinstance(result, bytes):
                    if keep is not None and not item.answered:
                        keep()
                    item.answer(result)
                    if item.cache_key is not None:
                        hub.cache.put(item.cache_key, result)
                else:
                    message = f"{hub.label}: {result['message']}"
                    item.answer(MoltError(ErrorCode(result["code"]), message))
                if item.conversation is not None:
                    hub.sessions.release(item, hub.push)  # type: ignore[union-attr]
            hub.ran()
            hub.flush()


class Lanes:
    """The intake and the lanes, seen from the main thread: new channels, orders, and
    the reports, each with the whole worker's channels."""

    def __init__(self, channels: Channels, runner: Runner, count: int, relay: Stream,
                 send: Send, scheduling: dict[str, Any]) -> None:  # fmt: skip
        self.send = send
        self.scheduling = scheduling
        self.hub = channels.hub
        # a count taken under the lock is sent under it: the daemon keeps the latest
        self.lock = threading.Lock()
        self.held: Counter[int] = Counter()  # channels by uid, counting those on their way
        self.refusals = Throttled(print_refusals)
        self.intake = Intake(channels, self._closed)
        self.lanes = [Lane(self.hub, runner, number) for number in range(1, count + 1)]
        self.intake.give(relay)
        self.hub.send, self.hub.lanes = self._report, count
        for thread in (self.intake.thread, *(lane.thread for lane in self.lanes)):
            thread.start()

    def refused(self, sock: socket.socket, uid: int) -> bool:
        """Refuse (and close) a new channel past the bounds; True if it was."""
        with self.lock:
            why = channel_refusal(uid, self.held, self.scheduling)
        if why is None:
            return False
        refuse_channel(sock, why, self.refusals)
        self._report({"stats": Counts().to_wire()})  # the daemon counted it when it granted it
        return True

    def attach(self, stream: Stream) -> None:
        """Hand a new channel to the intake, counted at once."""
        with self.lock:
            self.held[stream.uid] += 1
        self.intake.give(stream)

    def configure(self, scheduling: dict[str, Any]) -> None:
        """New scheduling settings (a reload, a new share of max_queue): the bounds here,
        the queue's in the hub, the rest in the intake."""
        self.scheduling = scheduling
        self.hub.configure(scheduling)
        self.tell(lambda channels: channels.configure(scheduling))

    def tell(self, order: Order) -> None:
        """Have the intake carry out `order` (closing the channels, new settings)."""
        self.intake.tell(order)

    def stop(self) -> None:
        """End the threads once each lane has run its batch (the supervisor's SIGKILL
        after stop_timeout bounds that)."""
        self.hub.stop()
        self.intake.tell(None)
        for thread in (self.intake.thread, *(lane.thread for lane in self.lanes)):
            thread.join()

    def _closed(self, stream: Stream) -> None:
        if not stream.counted:
            return  # moltbotd's relay: it is not a client's channel
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
